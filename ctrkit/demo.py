"""A self-contained tour of the cross layers: the synthetic study of DCN-V2 (Wang et al. 2020, §5.1).

The label is a planted polynomial of explicit 2nd- and 3rd-order feature crosses. A 2-layer full-rank
:class:`~ctrkit.layers.Cross` network represents every such polynomial exactly (layer ``l`` reaches order
``l + 1``), while a ReLU DNN must approximate the multiplications piecewise-linearly. Both models get the
same parameter budget, optimizer, batches and number of steps. Needs only Keras (no Beam, no TFT).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

NUM_FEATURES = 12
BATCH_SIZE = 256
TRAIN_ROWS = 16_384
EVAL_ROWS = 4_096
LEARNING_RATE = 0.01


def planted_crosses(x: np.ndarray) -> np.ndarray:
    """The label: a sum of 2nd- and 3rd-order crosses of the features, shape ``(n, 1)``."""
    y = (
        x[:, 0] * x[:, 1]
        + 0.8 * x[:, 2] * x[:, 3] * x[:, 4]
        - 0.6 * x[:, 5] ** 2
        + x[:, 6] * x[:, 7] * x[:, 8]
        - 0.5 * x[:, 9] * x[:, 10]
        + 0.3 * x[:, 11]
    )
    return y.reshape(-1, 1).astype("float32")


def synthetic_data(seed: int, rows: int, num_features: int = NUM_FEATURES) -> tuple[np.ndarray, np.ndarray]:
    """Features uniform in [-1, 1] and their planted-cross label."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(rows, num_features)).astype("float32")
    return x, planted_crosses(x)


def _dnn_width(num_features: int, budget: int) -> int:
    """Width h of a 2-hidden-layer ReLU DNN whose parameter count h² + (d + 3) h + 1 is closest to ``budget``."""
    b = num_features + 3
    h = (-b + math.sqrt(b * b - 4 * (1 - budget))) / 2
    return min((max(1, math.floor(h)), math.ceil(h)), key=lambda w: abs(w * w + b * w + 1 - budget))


def build_models(num_features: int = NUM_FEATURES, seed: int = 0) -> tuple[Any, Any]:
    """The 2-layer cross network and the ReLU DNN of (nearly) equal parameter count, both ending in Dense(1)."""
    import keras

    from ctrkit.layers import CrossNetwork

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((num_features,))
    cross = keras.Model(inputs, keras.layers.Dense(1)(CrossNetwork(num_layers=2, kind="full")(inputs)), name="cross")
    width = _dnn_width(num_features, cross.count_params())
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((num_features,))
    h = keras.layers.Dense(width, activation="relu")(inputs)
    h = keras.layers.Dense(width, activation="relu")(h)
    dnn = keras.Model(inputs, keras.layers.Dense(1)(h), name="dnn")
    return cross, dnn


def _train(model: Any, x: np.ndarray, y: np.ndarray, steps: int, seed: int) -> None:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss="mse")
    order = np.random.default_rng(seed + 1)  # same batch sequence for both models
    for _ in range(steps):
        idx = order.integers(0, len(x), size=BATCH_SIZE)
        model.train_on_batch(x[idx], y[idx])


def cross_vs_dnn(steps: int = 300, seed: int = 0) -> dict[str, float | int]:
    """Train both models for ``steps`` Adam steps on the same batches; return their held-out MSE.

    Returns:
        ``dict(cross_loss, dnn_loss, cross_params, dnn_params)``; losses are mean squared errors on
        ``EVAL_ROWS`` fresh rows.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x, y = synthetic_data(seed, TRAIN_ROWS)
    x_eval, y_eval = synthetic_data(seed + 10_000, EVAL_ROWS)
    cross, dnn = build_models(seed=seed)
    result: dict[str, float | int] = {}
    for key, model in (("cross", cross), ("dnn", dnn)):
        _train(model, x, y, steps, seed)
        pred = np.asarray(model(x_eval, training=False))  # one call; predict() would retrace per model
        result[f"{key}_loss"] = float(np.mean((pred - y_eval) ** 2))
        result[f"{key}_params"] = int(model.count_params())
    return result
