"""Model assembly: config + manifest -> a Keras 3 model obeying the trainer -> exporter contract."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from ctrkit.config import Config, ConfigError
from ctrkit.manifest import Manifest, TransformedFeature, Window
from ctrkit.model import build_model, calibration_layer, embedding_layer, set_calibration_trainable

VOCAB = {"c0": 11, "c1": 7, "tags": 5}


def _manifest() -> Manifest:
    feats = (
        TransformedFeature("c0", "categorical", vocab_size=VOCAB["c0"]),
        TransformedFeature("c1", "categorical", vocab_size=VOCAB["c1"]),
        TransformedFeature("tags", "categorical", vocab_size=VOCAB["tags"], multivalent=True),
        TransformedFeature("n0", "numeric"),
    )
    return Manifest(features=feats, label="label", windows=(Window("w0", ("x",), 1),), rows_read=1, rows_written=1, rows_rejected=0)


def _batch(n: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tags = rng.integers(-1, VOCAB["tags"], (n, 3)).astype(np.int64)
    return {
        "c0": rng.integers(0, VOCAB["c0"], n).astype(np.int64),
        "c1": rng.integers(0, VOCAB["c1"], n).astype(np.int64),
        "tags": tags,
        "n0": rng.normal(size=n).astype(np.float32),
    }


def _config(**model) -> Config:
    base = {"embedding_dim": 3, "cross_layers": 2, "dnn_units": [8, 4]}
    return Config.from_dict({"model": {**base, **model}})


@pytest.mark.parametrize(
    "model_kw",
    [
        {"cross_kind": "full", "structure": "parallel"},
        {"cross_kind": "low_rank", "projection_dim": 2, "structure": "stacked"},
        {"cross_kind": "mixture", "num_experts": 2, "low_rank": 2, "structure": "cross_only", "dnn_units": []},
        {"cross_kind": "full", "structure": "stacked", "activation": "smelu"},
    ],
)
def test_outputs_follow_the_contract(model_kw: dict) -> None:
    model = build_model(_config(**model_kw), _manifest())
    out = model(_batch(), training=False)
    assert {"logits", "probabilities", "uncalibrated_logits"} <= set(out)
    for key in ("logits", "probabilities"):
        assert tuple(out[key].shape) == (6, 1) and out[key].dtype == "float32"
    np.testing.assert_allclose(out["probabilities"], 1 / (1 + np.exp(-np.asarray(out["logits"]))), rtol=1e-5)
    # Calibration starts at the identity.
    np.testing.assert_allclose(out["logits"], out["uncalibrated_logits"], rtol=1e-6)
    assert "distill_logits" not in out and "rank_logits" not in out


def test_embedding_sizes_come_from_the_manifest() -> None:
    model = build_model(_config(embedding_dims={"c0": 5}), _manifest())
    tables = embedding_layer(model).embedding_tables
    assert {k: tuple(v.shape) for k, v in tables.items()} == {"c0": (11, 5), "c1": (7, 3), "tags": (5, 3)}
    with pytest.raises(ConfigError, match="model.embedding_dims"):
        build_model(_config(embedding_dims={"nope": 5}), _manifest())


def test_auxiliary_heads_and_calibration_freezing() -> None:
    cfg = Config.from_dict({"model": {"embedding_dim": 3, "dnn_units": [8], "rank_head": True}, "distill": {"enabled": True}})
    model = build_model(cfg, _manifest())
    out = model(_batch())
    assert tuple(out["distill_logits"].shape) == (6, 1) and tuple(out["rank_logits"].shape) == (6, 1)
    cal = calibration_layer(model)
    assert not cal.trainable and cal.weights
    assert not {id(w) for w in cal.weights} & {id(w) for w in model.trainable_weights}
    set_calibration_trainable(model, True)
    assert {id(w) for w in model.trainable_weights} == {id(w) for w in cal.weights}
    set_calibration_trainable(model, False)
    assert embedding_layer(model).trainable and not cal.trainable


@pytest.mark.parametrize("kind", ["piecewise", "bias", "none"])
def test_calibration_kinds(kind: str) -> None:
    cal = {"kind": kind, "segment_feature": "c1"} if kind == "bias" else {"kind": kind}
    cfg = Config.from_dict({"model": {"embedding_dim": 3, "dnn_units": [8]}, "calibration": cal})
    out = build_model(cfg, _manifest())(_batch())
    assert tuple(out["logits"].shape) == (6, 1)
    assert np.all(np.isfinite(out["logits"]))
    # Every kind starts as the identity: an unfitted calibrator must not bend what PV and exports see.
    np.testing.assert_allclose(out["logits"], out["uncalibrated_logits"], rtol=1e-5, atol=1e-5)


def test_bias_calibration_needs_a_categorical_segment() -> None:
    cfg = Config.from_dict({"calibration": {"kind": "bias", "segment_feature": "n0"}})
    with pytest.raises(ConfigError, match="segment_feature"):
        build_model(cfg, _manifest())


def test_bias_calibration_segments_must_cover_the_feature_ids() -> None:
    """Fewer segments than ids failed at the first batch holding a larger id, with an assertion traceback."""
    cfg = Config.from_dict({"calibration": {"kind": "bias", "segment_feature": "c0", "num_segments": VOCAB["c0"] - 1}})
    with pytest.raises(ConfigError, match=rf"calibration\.num_segments: {VOCAB['c0'] - 1} is less than the "
                                          rf"{VOCAB['c0']} ids of 'c0'"):
        build_model(cfg, _manifest())
    cfg = Config.from_dict({"calibration": {"kind": "bias", "segment_feature": "c0", "num_segments": VOCAB["c0"] + 5}})
    assert build_model(cfg, _manifest()).get_layer("calibration").num_segments == VOCAB["c0"] + 5


def test_keras_file_round_trip(tmp_path) -> None:
    model = build_model(_config(activation="smelu"), _manifest())
    batch = _batch(seed=4)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    np.testing.assert_allclose(loaded(batch)["probabilities"], model(batch)["probabilities"], rtol=1e-6)


@pytest.mark.parametrize("kind", ["none", "temperature", "piecewise", "bias"])
def test_under_a_mixed_policy_the_served_outputs_stay_float32(kind: str) -> None:
    """Left to the global policy, the logit, its calibration and the probability were bfloat16 (3 digits)."""
    cal = {"kind": kind, "segment_feature": "c1"} if kind == "bias" else {"kind": kind}
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_model(Config.from_dict({"model": {"embedding_dim": 3, "cross_layers": 1, "dnn_units": [8],
                                                        "rank_head": True},
                                              "calibration": cal}), _manifest())
        out = model(_batch(64))
    finally:
        keras.config.set_dtype_policy("float32")
    assert model.get_layer("dcn").compute_dtype == "bfloat16"  # the body follows the policy
    for name in ("logits", "probabilities", "uncalibrated_logits", "rank_logits"):
        assert out[name].dtype == "float32", name
    p = np.asarray(out["probabilities"]).reshape(-1)
    assert len(np.unique(p)) == len(p)  # bfloat16 probabilities of 64 random rows tie
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-np.asarray(out["logits"], np.float64).reshape(-1))), rtol=1e-6)


def test_train_refuses_a_global_mixed_policy(tmp_path) -> None:
    from ctrkit.trainer import train

    keras.config.set_dtype_policy("mixed_float16")
    try:
        with pytest.raises(ConfigError, match=r"global Keras dtype policy is 'mixed_float16'.*set_dtype_policy\('float32'\)"):
            train(Config(), str(tmp_path / "data"), str(tmp_path / "run"), progress=False)
    finally:
        keras.config.set_dtype_policy("float32")
    assert not (tmp_path / "run").exists()
