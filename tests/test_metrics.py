"""Progressive-validation metrics against direct computations."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ctrkit.metrics import ProgressiveValidation, StreamingMetrics, auc_exact, downsampling_correction, ece


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
