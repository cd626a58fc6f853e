"""Post-hoc calibration of a logit: temperature (Platt) scaling, monotone piecewise-linear, per-segment bias.

Each layer sits on top of a trained base model and is fitted on data the base model was not trained on,
with the base model frozen (``base.trainable = False``). Each can itself be frozen or unfrozen through
``layer.trainable`` without touching the base model.

All three compute in float32 unless given an explicit ``dtype``, also under a mixed-precision policy
(``"mixed_float16"``, ``"mixed_bfloat16"``): their input is cast to float32 and their output is float32.
In 16 bits a probability within ~2.4e-4 of 1 (float16; ~2e-3 in bfloat16) rounds to 1 and its logit
to ``inf``; the layers hold a handful of weights, so float32 costs nothing.
"""
from __future__ import annotations

from typing import Any, Sequence

import keras
import numpy as np
from keras import ops

from ctrkit.layers import _validation as check
from ctrkit.layers.embedding import (_concrete, _is_jax_tracer, _is_tf_graph, _lookup, check_in_jax_trace,
                                     integer_ids)


# Machine epsilon per dtype (1 − ε is exactly representable and below 1, so a clip to [ε, 1 − ε] stays
# strictly inside (0, 1)), and the smallest normal number (a floor that keeps a log finite).
_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
_TINY = {"float16": 2.0**-14, "bfloat16": 2.0**-126, "float32": 2.0**-126, "float64": 2.0**-1022}


def _float32_by_default(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Base-layer kwargs with ``dtype="float32"`` unless the caller chose a dtype (policy)."""
    if kwargs.get("dtype") is None:
        kwargs = {**kwargs, "dtype": "float32"}
    return kwargs


def _as_logit_column(layer: str, logit: Any) -> Any:
    """Accept ``(B,)`` or ``(B, 1)`` logits and return ``(B, 1)``."""
    if len(logit.shape) == 1:
        return ops.expand_dims(logit, -1)
    if len(logit.shape) != 2 or logit.shape[-1] not in (1, None):
        raise ValueError(f"{layer}: expects logits of shape (batch,) or (batch, 1), got {logit.shape}")
    return logit


@keras.saving.register_keras_serializable(package="ctrkit")
class TemperatureScaling(keras.layers.Layer):
    """Platt / temperature scaling of a logit.

    ```
    z' = a · z + b        (temperature T = 1 / a)
    ```

    Initialised to the identity (``a = 1``, ``b = 0``). With ``use_bias=False`` it is pure temperature
    scaling, which changes confidence but not the ranking. ``a`` is kept non-negative so the calibrated
    logit stays monotone in the input.

    Args:
        use_bias: learn the offset ``b``. Defaults to ``True``.
        **kwargs: base layer arguments. ``dtype`` defaults to ``"float32"`` whatever the global policy.

    Call arguments:
        logit: ``(batch,)`` or ``(batch, 1)``, any float dtype (cast to the layer's compute dtype).

    Returns:
        ``(batch, 1)`` calibrated logit (float32 by default).

    Example:

    ```python
    base.trainable = False
    calibrated = TemperatureScaling()(base(features)["logits"])
    ```

    References:
    - [J. Platt, 1999], probabilistic outputs for support vector machines.
    - [C. Guo et al., 2017](https://arxiv.org/abs/1706.04599), On calibration of modern neural networks.
    - [arXiv:2211.10193](https://arxiv.org/abs/2211.10193), temperature scaling.
    """

    def __init__(self, use_bias: bool = True, **kwargs: Any) -> None:
        super().__init__(**_float32_by_default(kwargs))
        self.use_bias = bool(use_bias)

    def build(self, input_shape: Any) -> None:
        self.scale = self.add_weight(
            name="scale", shape=(), initializer="ones", constraint=keras.constraints.NonNeg()
        )
        self.bias = self.add_weight(name="bias", shape=(), initializer="zeros") if self.use_bias else None

    @property
    def temperature(self) -> float:
        """The fitted temperature ``1 / a`` (``inf`` if ``a`` reached 0)."""
        a = float(ops.convert_to_numpy(self.scale))
        return float("inf") if a == 0 else 1.0 / a

    def call(self, logit: Any) -> Any:
        z = ops.cast(_as_logit_column("TemperatureScaling", logit), self.compute_dtype) * self.scale
        return z + self.bias if self.bias is not None else z

    def compute_output_shape(self, input_shape: Any) -> Any:
        return (input_shape[0], 1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "use_bias": self.use_bias}


@keras.saving.register_keras_serializable(package="ctrkit")
class PiecewiseLinearCalibration(keras.layers.Layer):
    """Monotone piecewise-linear map from a logit to a probability in (0, 1).

    The keypoints ``k_0 < … < k_{n-1}`` are fixed input positions; the output levels ``y_j`` at them are
    the learned weights (the convention of TF Lattice's ``PWLCalibration`` with fixed input keypoints):

    ```
    p = softmax(w)                (w has n+1 entries)
    y_j = Σ_{i≤j} p_i,  j = 0 … n−1      (so 0 < y_0 < … < y_{n-1} < 1 in exact arithmetic)
    f(z) = y_0 + Σ_{j≥1} (y_j − y_{j−1}) · clip((z − k_{j−1}) / (k_j − k_{j−1}), 0, 1)
    ```

    ``f`` interpolates linearly between keypoints, is constant outside ``[k_0, k_{n-1}]`` and increasing
    inside. ``w`` starts so that ``y_j = σ(k_j)``: before fitting, the layer approximates the sigmoid of
    its input.

    With ``interpolation="logit"`` the levels' logits ``L_j = log(y_j / (1 − y_j))`` are interpolated
    instead, and the first and last segments extend beyond the keypoints with their slopes:

    ```
    g(z) = L_0 + Σ_{j≥1} (L_j − L_{j−1}) · clip((z − k_{j−1}) / (k_j − k_{j−1}), 0, 1)
           + s_first · min(z − k_0, 0) + s_last · max(z − k_{n−1}, 0),     f(z) = σ(g(z))
    ```

    ``g`` is still increasing, and since the levels start at ``σ(k_j)`` it starts as the identity
    (``g(z) = z``): a model serving through an unfitted calibrator serves its own predictions. ``L_j`` is
    computed as ``logsumexp(w_0 … w_j) − logsumexp(w_{j+1} … w_n)``, so its gradient stays bounded.

    The returned probability is clipped to ``[ε, 1 − ε]``, ``ε`` the machine epsilon of the compute
    dtype (``2⁻²³ ≈ 1.2e-7`` in float32), so it stays strictly inside (0, 1) for any ``w`` even where a
    level rounds to 0 or 1 (e.g. ``y_{n-1} = 1 − 1e-9``). With ``output_logit=True`` the logit is
    computed without that clip, as ``log f − log(1 − f)`` with ``1 − f = p_n + Σ_{j≥1} p_j (1 − clip(…))``
    summed directly rather than subtracted from 1, so it stays finite and accurate at extreme levels
    (``|logit|`` ≤ ~87 in float32; with ``interpolation="logit"`` the end segments extend, so the logit
    is unbounded, as its input is).

    Args:
        num_keypoints: number ``n ≥ 2`` of keypoints. Defaults to 10.
        input_min: first keypoint (in logit units). Defaults to -6.
        input_max: last keypoint. Defaults to 6.
        keypoints: explicit increasing keypoints (e.g. quantiles of the holdout logits); overrides the
            three arguments above.
        output_logit: return ``log(f / (1 − f))`` instead of ``f``, for heads that must output a logit.
        interpolation: ``"probability"`` (default; the formula above) or ``"logit"`` (interpolate the levels'
            logits, extend the end segments; starts as the identity).
        **kwargs: base layer arguments. ``dtype`` defaults to ``"float32"`` whatever the global policy.

    Call arguments:
        logit: ``(batch,)`` or ``(batch, 1)``, any float dtype (cast to the layer's compute dtype).

    Returns:
        ``(batch, 1)`` calibrated probability (or its logit), float32 by default.

    Example:

    ```python
    prob = PiecewiseLinearCalibration(num_keypoints=20)(base_logit)
    ```

    References:
    - [M. Gupta et al., 2016](https://jmlr.org/papers/v17/15-243.html), Monotonic calibrated interpolated
      look-up tables (piecewise-linear calibrators).
    """

    def __init__(
        self,
        num_keypoints: int = 10,
        input_min: float = -6.0,
        input_max: float = 6.0,
        keypoints: Sequence[float] | None = None,
        output_logit: bool = False,
        interpolation: str = "probability",
        **kwargs: Any,
    ) -> None:
        super().__init__(**_float32_by_default(kwargs))
        if interpolation not in ("probability", "logit"):
            raise ValueError(f"PiecewiseLinearCalibration: `interpolation` must be 'probability' or 'logit', got "
                             f"{interpolation!r}")
        self.interpolation = interpolation
        if keypoints is None:
            n = check.positive_int("PiecewiseLinearCalibration", "num_keypoints", num_keypoints)
            if n < 2:
                raise ValueError(f"PiecewiseLinearCalibration: `num_keypoints` must be >= 2, got {n}")
            lo, hi = check.as_real(input_min), check.as_real(input_max)
            if lo is None or hi is None or not lo < hi:
                raise ValueError(f"PiecewiseLinearCalibration: `input_min` and `input_max` must be finite numbers "
                                 f"with input_min < input_max, got {input_min!r}, {input_max!r}")
            keypoints = np.linspace(lo, hi, n)
        kp = np.asarray(keypoints, dtype="float64")
        if kp.ndim != 1 or len(kp) < 2 or not np.all(np.diff(kp) > 0):
            raise ValueError(f"PiecewiseLinearCalibration: `keypoints` must be >= 2 strictly increasing numbers, got {list(kp)}")
        self.keypoints = [float(v) for v in kp]
        self.num_keypoints = len(self.keypoints)
        self.input_min, self.input_max = self.keypoints[0], self.keypoints[-1]
        self.output_logit = bool(output_logit)

    def _initial_logits(self) -> np.ndarray:
        """log of the steps σ(k_0), σ(k_j) − σ(k_{j−1}), 1 − σ(k_{n−1}): computed in log space, so keypoints far
        out (|k| > 27, where a step underflows) still give levels σ(k_j)."""
        kp = np.asarray(self.keypoints, dtype="float64")
        log_levels = -np.logaddexp(0.0, -kp)  # log σ(k_j)
        inner = log_levels[1:] + np.log(-np.expm1(log_levels[:-1] - log_levels[1:]))
        return np.concatenate([log_levels[:1], inner, -np.logaddexp(0.0, kp[-1:])]).astype("float32")

    def build(self, input_shape: Any) -> None:
        self.level_logits = self.add_weight(
            name="level_logits",
            shape=(self.num_keypoints + 1,),
            initializer=keras.initializers.Constant(self._initial_logits()),
        )

    def levels(self) -> Any:
        """The learned outputs ``y_j`` at the keypoints, shape ``(num_keypoints,)`` (before the ``[ε, 1 − ε]``
        clip of :meth:`call`: a level within rounding of 1 reads as 1 here)."""
        return ops.cumsum(ops.softmax(self.level_logits))[:-1]

    def call(self, logit: Any) -> Any:
        dtype = self.compute_dtype
        z = ops.cast(_as_logit_column("PiecewiseLinearCalibration", logit), dtype)
        kp = ops.convert_to_tensor(self.keypoints, dtype)
        frac = ops.clip((z - kp[:-1]) / (kp[1:] - kp[:-1]), 0.0, 1.0)  # (B, n-1)
        if self.interpolation == "logit":
            return self._logit_interpolation(z, kp, frac, dtype)
        p = ops.softmax(ops.cast(self.level_logits, dtype))  # (n+1,): y_j − y_{j−1} for j = 1 … n−1 is p_j
        # f and 1 − f as two sums of non-negative terms: 1 − f computed as 1 − y would cancel to 0 (and
        # its log to −inf) once a level is within rounding of 1, e.g. y = 1 − 1e-9 in float32.
        below = p[0] + ops.sum(frac * p[1:-1], axis=-1, keepdims=True)  # f
        above = p[-1] + ops.sum((1.0 - frac) * p[1:-1], axis=-1, keepdims=True)  # 1 − f
        if self.output_logit:
            tiny = _TINY.get(dtype, _TINY["float32"])  # a softmax entry can underflow to exactly 0
            return ops.log(ops.maximum(below, tiny)) - ops.log(ops.maximum(above, tiny))
        eps = _EPS.get(dtype, _EPS["float32"])
        return ops.clip(below, eps, 1.0 - eps)

    def _logit_interpolation(self, z: Any, kp: Any, frac: Any, dtype: str) -> Any:
        # L_j = log y_j − log(1 − y_j) = logsumexp(w_0..w_j) − logsumexp(w_{j+1}..w_n): no softmax entry to
        # underflow, and the gradient of each term is a softmax, bounded at any weights.
        w = ops.cast(self.level_logits, dtype)
        n = self.num_keypoints
        upto = np.arange(n + 1)[None, :] <= np.arange(n)[:, None]  # (n, n+1): i ≤ j
        below = ops.convert_to_tensor(np.where(upto, 0.0, -1e30), dtype)  # masks added to w, never combined
        above = ops.convert_to_tensor(np.where(upto, -1e30, 0.0), dtype)  # first (1e30 swamps w in float32)
        levels = ops.logsumexp(w[None, :] + below, axis=1) - ops.logsumexp(w[None, :] + above, axis=1)
        rises = levels[1:] - levels[:-1]
        widths = kp[1:] - kp[:-1]
        g = (levels[0] + ops.sum(frac * rises, axis=-1, keepdims=True)
             + rises[0] / widths[0] * ops.minimum(z - kp[0], 0.0)
             + rises[-1] / widths[-1] * ops.maximum(z - kp[-1], 0.0))
        if self.output_logit:
            return g
        eps = _EPS.get(dtype, _EPS["float32"])
        return ops.clip(ops.sigmoid(g), eps, 1.0 - eps)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return (input_shape[0], 1)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "num_keypoints": self.num_keypoints,
            "input_min": self.input_min,
            "input_max": self.input_max,
            "keypoints": list(self.keypoints),
            "output_logit": self.output_logit,
            "interpolation": self.interpolation,
        }


@keras.saving.register_keras_serializable(package="ctrkit")
class BiasCalibration(keras.layers.Layer):
    """Per-segment additive correction of a logit, keyed by a categorical feature.

    ```
    z' = z + c[s]      (s: segment id in [0, num_segments), c initialised to 0)
    ```

    Fixes systematic over- or under-prediction within segments (e.g. per country or ad format) that a
    global calibrator cannot. An out-of-range segment id raises ``ValueError`` when called eagerly and
    fails a ``tf.debugging`` assertion in a ``tf.function``; give unseen segments an OOV id upstream. Under
    XLA on TensorFlow (``jit_compile=True``, also Keras' ``"auto"`` on a GPU) the assertion is dropped, and
    under ``jax.jit`` ids are checked only with ``check_ids_in_jit=True``: otherwise an out-of-range id gets
    the first or last segment's correction, unreported.

    Args:
        num_segments: number of segment ids.
        check_ids_in_jit: JAX only: also check segment ids under ``jax.jit`` with a host callback, as
            ``FeatureEmbedding``'s argument of that name (and at its cost). Off: an out-of-range id gets
            the first or last segment's correction, unreported.
        **kwargs: base layer arguments. ``dtype`` defaults to ``"float32"`` whatever the global policy.

    Call arguments:
        logit: ``(batch,)`` or ``(batch, 1)``, any float dtype (cast to the layer's compute dtype).
        segment_ids: ``(batch,)`` or ``(batch, 1)`` integer ids.

    Returns:
        ``(batch, 1)`` corrected logit (float32 by default).

    Example:

    ```python
    z = BiasCalibration(num_segments=vocab["country"])(logit, features["country"])
    ```

    References:
    - [H. B. McMahan et al., 2013](https://research.google/pubs/pub41159/), Ad click prediction: a view
      from the trenches (Section 7, calibration corrections per slice).
    """

    def __init__(self, num_segments: int, check_ids_in_jit: bool = False, **kwargs: Any) -> None:
        super().__init__(**_float32_by_default(kwargs))
        self.num_segments = check.positive_int("BiasCalibration", "num_segments", num_segments)
        self.check_ids_in_jit = bool(check_ids_in_jit)

    def build(self, logit_shape: Any, segment_ids_shape: Any = None) -> None:
        self.segment_bias = self.add_weight(name="segment_bias", shape=(self.num_segments,), initializer="zeros")

    def call(self, logit: Any, segment_ids: Any) -> Any:
        z = ops.cast(_as_logit_column("BiasCalibration", logit), self.compute_dtype)
        ids = segment_ids
        if len(ids.shape) == 2 and ids.shape[-1] == 1:
            ids = ops.squeeze(ids, -1)
        if len(ids.shape) != 1:
            raise ValueError(f"BiasCalibration: segment_ids must be (batch,) or (batch, 1), got {segment_ids.shape}")
        ids = integer_ids("BiasCalibration", "segment_ids", ids)
        if None not in (z.shape[0], ids.shape[0]) and z.shape[0] != ids.shape[0]:
            raise ValueError(f"BiasCalibration: {z.shape[0]} logits but {ids.shape[0]} segment ids")
        value = _concrete(ids)
        if value is not None:
            self._raise_if_out_of_range(value)
        elif _is_jax_tracer(ids) and self.check_ids_in_jit:
            check_in_jax_trace(self._raise_if_out_of_range, ids)
        elif _is_tf_graph(ids):
            import tensorflow as tf

            with tf.control_dependencies([
                tf.debugging.assert_less(ids, tf.cast(self.num_segments, ids.dtype), message="BiasCalibration: segment id >= num_segments"),
                tf.debugging.assert_non_negative(ids, message="BiasCalibration: negative segment id"),
            ]):
                ids = tf.identity(ids)
        return z + ops.expand_dims(_lookup(self.segment_bias, ids), -1)  # clamps where ids went unchecked

    def _raise_if_out_of_range(self, value: np.ndarray) -> None:
        bad = (value < 0) | (value >= self.num_segments)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise ValueError(
                f"BiasCalibration: segment id {int(value[row])} in row {row} is outside [0, {self.num_segments})"
            )

    def compute_output_shape(self, logit_shape: Any, segment_ids_shape: Any = None) -> Any:
        return (logit_shape[0], 1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_segments": self.num_segments, "check_ids_in_jit": self.check_ids_in_jit}
