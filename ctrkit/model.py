"""Model assembly: config + manifest → a Keras 3 DCN-V2 model obeying the trainer → exporter contract.

    transformed features ─► FeatureEmbedding ─► x0 ─► DCN (cross ∥/→ DNN) ─► h
    h ─► Dense(1) "main_logit" ─► calibration layer ─► "logits" ─► sigmoid ─► "probabilities"
    h ─► DistillationHead ─► "distill_logits"         (distill.enabled)
    h ─► Dense(1) "rank_head" ─► "rank_logits"          (model.rank_head)

Outputs also include ``"uncalibrated_logits"`` (the main logit before calibration), which the trainer's
click loss uses, so training the body never pushes on the calibration layer. The calibration layer
(named ``"calibration"``) starts frozen; ``ctrkit calibrate`` freezes the body and unfreezes it.
Vocabulary sizes come from the manifest only.
"""
from __future__ import annotations

from typing import Any

import keras

from ctrkit.config import Config, ConfigError
from ctrkit.manifest import Manifest

__all__ = ["build_model", "embedding_layer", "calibration_layer", "set_calibration_trainable", "CALIBRATION_LAYER"]

CALIBRATION_LAYER = "calibration"
EMBEDDING_LAYER = "feature_embedding"


def _inputs(manifest: Manifest) -> dict[str, keras.KerasTensor]:
    inputs = {}
    for f in manifest.features:
        if f.kind == "numeric":
            inputs[f.name] = keras.Input(shape=(), dtype="float32", name=f.name)
        elif f.multivalent:
            inputs[f.name] = keras.Input(shape=(None,), dtype="int64", name=f.name)
        else:
            inputs[f.name] = keras.Input(shape=(), dtype="int64", name=f.name)
    return inputs


def _embedding_dims(config: Config, manifest: Manifest) -> int | dict[str, int]:
    overrides = config.model.embedding_dims
    vocab = manifest.vocab_sizes()
    unknown = sorted(set(overrides) - set(vocab))
    if unknown:
        raise ConfigError(
            f"model.embedding_dims: {unknown} are not categorical features of the data; they are {sorted(vocab)}"
        )
    if not overrides:
        return config.model.embedding_dim
    return {name: overrides.get(name, config.model.embedding_dim) for name in vocab}


def _calibration(config: Config, manifest: Manifest, logit: Any, inputs: dict[str, Any]) -> Any:
    from ctrkit import layers

    cal = config.calibration
    if cal.kind in ("none",):
        # Keep a named (identity) layer so every model has the same calibration hook.
        return keras.layers.Identity(dtype="float32", name=CALIBRATION_LAYER)(logit)
    if cal.kind == "temperature":
        return layers.TemperatureScaling(name=CALIBRATION_LAYER)(logit)
    if cal.kind == "piecewise":
        # Logit interpolation starts as the identity: until `ctrkit calibrate` fits it, progressive validation
        # and every export serve the model's own predictions (probability interpolation bent them).
        return layers.PiecewiseLinearCalibration(
            num_keypoints=cal.num_keypoints, output_logit=True, interpolation="logit", name=CALIBRATION_LAYER
        )(logit)
    # bias: one learned offset per segment id of a categorical feature
    feature = cal.segment_feature
    vocab = manifest.vocab_sizes()
    if feature not in vocab:
        raise ConfigError(f"calibration.segment_feature: {feature!r} is not a categorical feature; they are {sorted(vocab)}")
    if any(f.multivalent for f in manifest.features if f.name == feature):
        raise ConfigError(f"calibration.segment_feature: {feature!r} is multi-valued; segments need one id per row")
    if cal.num_segments and cal.num_segments < vocab[feature]:
        # An id at or above num_segments fails the layer's range check at the first batch holding one.
        raise ConfigError(f"calibration.num_segments: {cal.num_segments} is less than the {vocab[feature]} ids of "
                          f"{feature!r} in the data; leave it unset (one segment per id) or raise it")
    num_segments = cal.num_segments or vocab[feature]
    return layers.BiasCalibration(num_segments=num_segments, name=CALIBRATION_LAYER)(logit, inputs[feature])


def build_model(config: Config, manifest: Manifest) -> keras.Model:
    """Build the (uncompiled) model described by ``config`` for the features in ``manifest``.

    Call ``keras.utils.set_random_seed`` first for reproducible initial weights.
    """
    from ctrkit import layers

    if not manifest.features:
        raise ConfigError("the manifest lists no features")
    m = config.model
    inputs = _inputs(manifest)
    embedding = layers.FeatureEmbedding(
        vocab_sizes=manifest.vocab_sizes(),
        embedding_dim=_embedding_dims(config, manifest),
        numeric_features=[f.name for f in manifest.numeric_features],
        multivalued_features=[f.name for f in manifest.features if f.multivalent],
        name=EMBEDDING_LAYER,
    )
    x0 = embedding(inputs)
    hidden = layers.DCN(
        structure=m.structure,
        num_cross_layers=m.cross_layers,
        cross_kind=m.cross_kind,
        projection_dim=m.projection_dim,
        num_experts=m.num_experts,
        low_rank=m.low_rank,
        dnn_units=() if m.structure == "cross_only" else tuple(m.dnn_units),
        dropout=m.dropout,
        activation=m.activation,
        name="dcn",
    )(x0)
    # The served head and what follows it stay float32 under a global mixed policy (Keras' advice for outputs):
    # a bfloat16 probability has ~3 significant digits (only 85 of 200 served values distinct, measured).
    raw_logit = keras.layers.Dense(1, dtype="float32", name="main_logit")(hidden)
    logits = _calibration(config, manifest, raw_logit, inputs)
    outputs = {
        "logits": logits,
        "probabilities": keras.layers.Activation("sigmoid", dtype="float32", name="probabilities")(logits),
        "uncalibrated_logits": raw_logit,
    }
    if config.distill.enabled:
        outputs["distill_logits"] = layers.DistillationHead(name="distill_head")(hidden)
    if m.rank_head:
        outputs["rank_logits"] = keras.layers.Dense(1, dtype="float32", name="rank_head")(hidden)
    model = keras.Model(inputs=inputs, outputs=outputs, name=config.name)
    set_calibration_trainable(model, False)
    return model


def embedding_layer(model: keras.Model) -> Any:
    """The model's FeatureEmbedding layer (its ``embedding_tables`` get sparse updates)."""
    return model.get_layer(EMBEDDING_LAYER)


def calibration_layer(model: keras.Model) -> keras.layers.Layer:
    return model.get_layer(CALIBRATION_LAYER)


def set_calibration_trainable(model: keras.Model, calibrating: bool) -> None:
    """``calibrating=True``: only the calibration layer trains (body frozen); False: the reverse."""
    for layer in model.layers:
        layer.trainable = (layer.name == CALIBRATION_LAYER) == calibrating
