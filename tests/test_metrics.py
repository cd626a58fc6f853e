"""Progressive-validation metrics against direct computations."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ctrkit.metrics import (
    AUC_BINS,
    ProgressiveValidation,
    StreamingMetrics,
    auc_bins,
    auc_exact,
    downsampling_correction,
    ece,
)


def _data(n: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = 1 / (1 + np.exp(-rng.normal(-1.5, 1.2, n)))
    y = (rng.random(n) < p).astype(np.float64)
    return p, y


def test_streaming_metrics_match_batch_formulas() -> None:
    p, y = _data()
    m = StreamingMetrics()
    for i in range(0, len(p), 777):  # uneven batches
        m.update(p[i : i + 777], y[i : i + 777])
    r = m.result()
    logloss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    ctr = y.mean()
    assert r["examples"] == len(p)
    assert r["logloss"] == pytest.approx(logloss, rel=1e-9)
    assert r["ne"] == pytest.approx(logloss / -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr)), rel=1e-9)
    assert r["calibration"] == pytest.approx(p.sum() / y.sum(), rel=1e-9)
    assert r["ece"] == pytest.approx(ece(p, y), rel=1e-9)
    assert abs(r["auc"] - auc_exact(p, y)) < 1e-4


def test_ece_is_ten_equal_width_bins_worked_by_hand() -> None:
    """ECE = Σ_b |Σ_{i∈b} p_i − Σ_{i∈b} y_i| / n over 10 bins [0, 0.1), …, [0.9, 1.0]; checked against a
    computation by hand, not against ctrkit's own ece() (one bin or 20 would pass such a comparison)."""
    p = np.array([0.05, 0.05, 0.12, 0.18, 0.55, 0.95, 1.0])
    y = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    # bin 0: |0.1 − 1| = 0.9; bin 1 (0.12 and 0.18; 20 bins would split them): |0.3 − 1| = 0.7;
    # bin 5: |0.55 − 1| = 0.45; bin 9 (0.95 and 1.0): |1.95 − 2| = 0.05
    want = (0.9 + 0.7 + 0.45 + 0.05) / 7
    assert ece(p, y) == pytest.approx(want, abs=1e-12)
    m = StreamingMetrics()
    m.update(p[:3], y[:3])
    m.update(p[3:], y[3:])
    assert m.result()["ece"] == pytest.approx(want, abs=1e-12)
    # Calibrated overall but not within its bins (one bin would read |Σp − Σy| / n = 0 here):
    p2, y2 = np.array([0.05, 0.05, 0.95, 0.95]), np.array([1.0, 0.0, 0.0, 1.0])
    assert ece(p2, y2) == pytest.approx((0.9 + 0.9) / 4, abs=1e-12)


def test_auc_exact_against_pairwise_definition() -> None:
    p, y = _data(400, seed=1)
    p = np.round(p, 2)  # force ties
    pos, neg = p[y > 0.5], p[y <= 0.5]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auc_exact(p, y) == pytest.approx(pairs, abs=1e-12)


def test_perfectly_calibrated_stream_has_ratio_near_one_and_small_ece() -> None:
    p, y = _data(200000, seed=2)
    m = StreamingMetrics()
    m.update(p, y)
    assert abs(m.result()["calibration"] - 1) < 0.02
    m2 = StreamingMetrics()
    m2.update(np.minimum(p * 2, 1), y)  # over-predicts
    assert m2.result()["calibration"] > 1.5
    assert m2.result()["ece"] > 5 * m.result()["ece"]


def test_undefined_metrics_are_none_not_nan() -> None:
    m = StreamingMetrics()
    m.update([0.2, 0.3], [0, 0])
    r = m.result()
    assert r["auc"] is None and r["calibration"] is None and r["ne"] is None
    assert StreamingMetrics().result()["logloss"] is None


def test_progressive_validation_state_round_trip_and_window_reset() -> None:
    p, y = _data(5000, seed=3)
    pv = ProgressiveValidation()
    pv.update(p[:3000], y[:3000])
    first = pv.end_window()
    pv.update(p[3000:4000], y[3000:4000])
    restored = ProgressiveValidation()
    restored.load_state({k: v.copy() for k, v in pv.state().items()})
    for obj in (pv, restored):
        obj.update(p[4000:], y[4000:])
    a, b = pv.end_window(), restored.end_window()
    assert a == b
    assert first["window"]["examples"] == 3000
    assert a["window"]["examples"] == 2000 and a["cumulative"]["examples"] == 5000
    whole = StreamingMetrics()
    whole.update(p, y)
    assert a["cumulative"]["logloss"] == pytest.approx(whole.result()["logloss"])


def test_downsampling_correction_recovers_true_probability() -> None:
    # A model trained with negatives kept at rate w predicts p' = p / (p + (1 - p) w); the correction inverts it.
    p = np.linspace(0.01, 0.99, 50)
    w = 0.1
    biased = p / (p + (1 - p) * w)
    np.testing.assert_allclose(downsampling_correction(biased, w), p, rtol=1e-12)
    with pytest.raises(ValueError, match="rate"):
        downsampling_correction(p, 0.0)


# -- AUC histogram accuracy at low CTR ----------------------------------------------------------------------
def _ctr_data(ctr: float, sigma: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated float32 predictions with logits N(μ, σ²), μ set so the mean prediction is ``ctr``."""
    grid = np.random.default_rng(99).standard_normal(100000)
    lo, hi = -40.0, 10.0
    for _ in range(60):  # bisection on μ: mean sigmoid is increasing in μ
        mu = (lo + hi) / 2
        lo, hi = (mu, hi) if np.mean(1 / (1 + np.exp(-(mu + sigma * grid)))) < ctr else (lo, mu)
    rng = np.random.default_rng(seed)
    p = (1 / (1 + np.exp(-(mu + sigma * rng.standard_normal(n))))).astype(np.float32).astype(np.float64)
    return p, (rng.random(n) < p).astype(np.float64)


def _old_p_bins(p: np.ndarray) -> np.ndarray:
    """The earlier binning, uniform in p."""
    return np.minimum((p * AUC_BINS).astype(np.int64), AUC_BINS - 1)


def _histogram_auc(bins: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(AUC with ties in a bin counted one half, the share of positive-negative pairs sharing a bin)."""
    pos = np.bincount(bins[y > 0.5], minlength=AUC_BINS)
    neg = np.bincount(bins[y <= 0.5], minlength=AUC_BINS)
    pairs = pos.sum() * neg.sum()
    return float((pos * (np.cumsum(neg) - neg + 0.5 * neg)).sum() / pairs), float((pos * neg).sum() / pairs)


@pytest.mark.parametrize("ctr", [1e-4, 1e-3, 1e-2, 0.3])
@pytest.mark.parametrize("sigma", [0.3, 2.5])  # poorly (AUC ≈ 0.58) and well separated (AUC ≈ 0.9-0.96)
def test_histogram_auc_matches_exact_auc_at_low_ctr(ctr: float, sigma: float) -> None:
    p, y = _ctr_data(ctr, sigma, int(max(2e5, 200 / ctr)), seed=5)
    m = StreamingMetrics()
    for i in range(0, len(p), 65536):
        m.update(p[i : i + 65536], y[i : i + 65536])
    exact = auc_exact(p, y)
    err = abs(m.result()["auc"] - exact)
    # The bound the module documents: 5e-5; measured here at most 1.2e-5 (CTR 1e-4, σ 0.3, 194 clicks).
    assert err < 5e-5
    # And never more than half the pairs sharing a bin: the histogram only differs from the ranking in ties.
    assert err <= 0.5 * _histogram_auc(auc_bins(p), y)[1] + 1e-12
    if ctr <= 1e-3:
        # The p bins the module used before are more than 5e-5 off here (measured 6.9e-4 to 3.0e-3).
        assert abs(_histogram_auc(_old_p_bins(p), y)[0] - exact) > 5e-5


def test_probabilities_zero_and_one_are_binned_and_bad_ones_raise() -> None:
    # Logits beyond ±16 (p = 0 and 1 included) go to the end bins, so they tie there.
    assert auc_bins(np.array([0.0, 1e-12, 1e-7, 1 - 1e-7, 1 - 1e-12, 1.0])).tolist() == [0, 0, 0] + [AUC_BINS - 1] * 3
    p = np.array([0.0, 0.0, 1e-3, 0.5, 1.0, 1.0])
    y = np.array([0, 1, 1, 0, 0, 1], np.float64)
    m = StreamingMetrics()
    m.update(p, y)
    assert m.result()["auc"] == pytest.approx(auc_exact(p, y), abs=1e-12)  # only equal scores share a bin here
    for bad, match in ((np.nan, "non-finite"), (np.inf, "non-finite"), (-0.1, "outside"), (1.5, "outside")):
        with pytest.raises(ValueError, match=match):
            StreamingMetrics().update([0.2, bad], [0, 1])


def test_merged_metrics_equal_one_pass_and_state_marks_the_binning() -> None:
    p, y = _ctr_data(1e-3, 1.0, 200000, seed=6)
    whole, a, b = StreamingMetrics(), StreamingMetrics(), StreamingMetrics()
    whole.update(p, y)
    a.update(p[:70000], y[:70000])
    b.update(p[70000:], y[70000:])
    a.merge(b)
    np.testing.assert_array_equal(a.auc_pos, whole.auc_pos)
    np.testing.assert_array_equal(a.auc_neg, whole.auc_neg)
    state = whole.state("m")
    assert state["m/auc_pos"].shape == (AUC_BINS,) and state["m/auc_pos"].dtype == np.int64
    mismatched = {**state, "m/auc_logit_range": np.array([-8.0, 8.0])}
    with pytest.raises(ValueError, match="logits"):
        StreamingMetrics().load_state(mismatched, "m")


def test_checkpoint_with_probability_bins_is_converted_on_load() -> None:
    # A checkpoint written before the logit bins has p-binned histograms and no auc_logit_range entry.
    p, y = _data(20000, seed=7)
    old = StreamingMetrics()
    old.update(p[:10000], y[:10000])
    legacy = {k: v for k, v in old.state("m").items() if not k.endswith("auc_logit_range")}
    pos, neg = y[:10000] > 0.5, y[:10000] <= 0.5
    legacy["m/auc_pos"] = np.bincount(_old_p_bins(p[:10000][pos]), minlength=AUC_BINS)
    legacy["m/auc_neg"] = np.bincount(_old_p_bins(p[:10000][neg]), minlength=AUC_BINS)
    restored = StreamingMetrics()
    restored.load_state(legacy, "m")
    assert restored.auc_pos.sum() == pos.sum() and restored.auc_neg.sum() == neg.sum()
    assert restored.auc_pos.dtype == np.int64
    restored.update(p[10000:], y[10000:])
    # Within the old resolution: the old examples only lost their order inside 1.5e-5-wide p bins.
    assert abs(restored.result()["auc"] - auc_exact(p, y)) < 1e-4


if __name__ == "__main__":
    # The table in the ctrkit.metrics docstring: max |histogram AUC − exact AUC| over 3 seeds and 3 logit spreads.
    for ctr in (1e-4, 1e-3, 1.5e-3, 1e-2, 0.3):
        n = int(min(4e6, max(2e5, 400 / ctr)))
        old_err, new_err = [], []
        for sigma in (0.3, 1.0, 2.5):
            for seed in range(3):
                p, y = _ctr_data(ctr, sigma, n, seed)
                exact = auc_exact(p, y)
                old_err.append(abs(_histogram_auc(_old_p_bins(p), y)[0] - exact))
                new_err.append(abs(_histogram_auc(auc_bins(p), y)[0] - exact))
        print(f"CTR {ctr:<7} n {n:>8}  p bins {max(old_err):.1e}  logit bins {max(new_err):.1e}", flush=True)
