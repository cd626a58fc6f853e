"""Fit the calibration layer on a held-out stream with the base model frozen.

The model's ``"uncalibrated_logits"`` output does not depend on the calibration layer, so the held-out
stream is scored once and the layer is fitted with full-batch steps on the cached ``(logit, segment id,
label)`` triples, which cost almost nothing next to scoring. Only the layer named ``"calibration"`` changes; every other weight is frozen.

Closed-form alternative for a model trained on negative-downsampled data (negatives kept at rate w):
``q = p / (p + (1 − p) / w)``, which in logit space is ``logit(q) = logit(p) + log w``: exactly a
:class:`~ctrkit.layers.TemperatureScaling` with ``a = 1, b = log w`` (or every segment bias = log w for
:class:`~ctrkit.layers.BiasCalibration`), so the correction is served inside the same model.
"""
from __future__ import annotations

import contextlib
import math
import os
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ctrkit.config import CalibrationConfig, ConfigError
from ctrkit.data import iterate_batches
from ctrkit.errors import InputError
from ctrkit.manifest import Manifest
from ctrkit.metrics import StreamingMetrics

__all__ = ["score_stream", "fit_calibration", "apply_downsampling_correction", "downsampling_corrected",
           "replace_run_model", "windows_trained_on"]


_SCORERS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


class _Predict:
    """The scoring call of one model, as an object: TensorFlow counts traces towards its "frequent
    retracing" warning per Python function ``__code__``, so one nested function shared by every model made
    a run that scored five models once each warn, though none was traced more than once per batch shape.
    An object without ``__code__`` is counted on its own."""

    def __init__(self, model: Any) -> None:
        self.model = weakref.ref(model)  # a strong reference would keep the model's _SCORERS entry alive

    def __call__(self, features: Any) -> Any:
        out = self.model()(features, training=False)
        return out["probabilities"], out["uncalibrated_logits"]


def _scorer(model: Any) -> Any:
    """One compiled inference function per model: a new ``tf.function`` per call retraced every time (and
    TensorFlow warned about frequent retracing once a run had scored a few streams)."""
    import tensorflow as tf

    if model not in _SCORERS:
        _SCORERS[model] = tf.function(_Predict(model), reduce_retracing=True)
    return _SCORERS[model]


def score_stream(
    model: Any,
    manifest: Manifest,
    windows: Sequence[int] | None = None,
    batch_size: int = 4096,
    segment: str | None = None,
    progress: str | None = None,
) -> dict[str, np.ndarray]:
    """Score windows with ``model`` (inference mode): labels, served probabilities, uncalibrated logits.

    ``progress``: a label for a progress bar of examples scored (on stderr); ``None`` shows none.
    """
    from tqdm import tqdm

    predict = _scorer(model)
    labels, probs, logits, segs = [], [], [], []
    selected = range(len(manifest.windows)) if windows is None else windows
    bar = tqdm(total=sum(manifest.windows[i].rows for i in selected), desc=progress, unit="ex",
               disable=progress is None, dynamic_ncols=True, leave=False)
    for batch in iterate_batches(manifest, batch_size, windows=windows):
        p, z = predict(batch.features)
        bar.update(batch.count)
        labels.append(batch.labels.numpy())
        probs.append(p.numpy().reshape(-1))
        logits.append(z.numpy().reshape(-1))
        if segment:
            segs.append(batch.features[segment].numpy())
    bar.close()
    if not labels:
        raise InputError("the held-out stream is empty")
    out = {"labels": np.concatenate(labels), "probabilities": np.concatenate(probs), "logits": np.concatenate(logits)}
    if segment:
        out["segments"] = np.concatenate(segs)
    return out


def windows_trained_on(run_dir: str, data_dir: str, manifest: Manifest, windows: Sequence[int]) -> list[str]:
    """The names of the ``windows`` of ``data_dir`` that the run in ``run_dir`` trained on: not held out for it.

    Judged from the run's ``run.json`` (its data directory and window names); windows of another pipeline
    output count as held out.
    """
    from ctrkit.trainer import read_run_info, trained_on_data

    info = read_run_info(run_dir)
    if not trained_on_data(info, data_dir):
        return []
    trained = set(info.get("windows") or [])
    return [manifest.windows[i].name for i in windows if manifest.windows[i].name in trained]


def _summary(p: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    m = StreamingMetrics()
    m.update(p, y)
    r = m.result()
    return {k: r[k] for k in ("examples", "calibration", "ece", "logloss", "auc", "ne")}


def apply_downsampling_correction(model: Any, rate: float) -> None:
    """Set the calibration layer to the closed-form negative-downsampling correction logit + log(rate)."""
    from ctrkit import layers
    from ctrkit.model import calibration_layer

    if not 0 < rate <= 1:
        raise ConfigError(f"calibration.downsampling_rate: must be in (0, 1], got {rate}")
    layer = calibration_layer(model)
    if isinstance(layer, layers.TemperatureScaling):
        if layer.bias is None:
            raise ConfigError("downsampling correction needs a TemperatureScaling with a bias")
        layer.scale.assign(1.0)
        layer.bias.assign(math.log(rate))
    elif isinstance(layer, layers.BiasCalibration):
        layer.segment_bias.assign(np.full(layer.segment_bias.shape, math.log(rate), np.float32))
    else:
        raise ConfigError(
            f"the closed-form downsampling correction needs calibration.kind 'temperature' or 'bias', "
            f"the model has {type(layer).__name__}"
        )


@contextlib.contextmanager
def downsampling_corrected(model: Any, rate: float | None) -> Iterator[Any]:
    """``model`` with the closed-form downsampling correction in its calibration layer (see
    :func:`apply_downsampling_correction`) inside the block, its own calibration weights again after it.
    ``rate`` None: the model as it is."""
    if rate is None:
        yield model
        return
    from ctrkit.model import calibration_layer

    layer = calibration_layer(model)
    saved = layer.get_weights()
    apply_downsampling_correction(model, rate)
    try:
        yield model
    finally:
        layer.set_weights(saved)


def fit_calibration(
    model: Any,
    manifest: Manifest,
    config: CalibrationConfig,
    windows: Sequence[int] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Fit (or, with ``downsampling_rate``, set) the calibration layer on ``windows`` of ``manifest``.

    Returns a report with the calibration ratio Σp/Σy, ECE, log loss and AUC on that stream before and after.
    ``progress`` shows a progress bar (on stderr) while the stream is scored, before and after the fit.
    """
    return fit_calibration_scored(model, manifest, config, windows, progress)[0]


def fit_calibration_scored(
    model: Any,
    manifest: Manifest,
    config: CalibrationConfig,
    windows: Sequence[int] | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """:func:`fit_calibration`, also returning the scored streams before and after (for reliability plots)."""
    import keras
    import tensorflow as tf

    from ctrkit.model import calibration_layer, set_calibration_trainable

    if config.kind == "none":
        raise ConfigError("calibration.kind is 'none': the model has no calibration layer to fit")
    layer = calibration_layer(model)
    segment = config.segment_feature if config.kind == "bias" else None
    stream = score_stream(model, manifest, windows, config.batch_size, segment,
                          progress="scoring before calibration" if progress else None)
    y = stream["labels"]
    before = _summary(stream["probabilities"], y)

    if config.downsampling_rate is not None:
        apply_downsampling_correction(model, config.downsampling_rate)
        method = f"closed form, downsampling rate {config.downsampling_rate}"
    elif segment:
        _fit_segment_biases(layer, stream["logits"], y, stream["segments"], config)
        method = (f"fitted {type(layer).__name__} with {config.steps} full-batch steps, segments shrunk toward "
                  f"one global correction (segment_prior_rows {config.segment_prior_rows:g})")
    else:
        set_calibration_trainable(model, True)
        try:
            opt = keras.optimizers.Adam(config.learning_rate)
            z_all = tf.constant(stream["logits"].reshape(-1, 1), tf.float32)
            y_all = tf.constant(y.reshape(-1, 1), tf.float32)
            variables = layer.trainable_variables

            @tf.function(reduce_retracing=True)
            def step(z, yb):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=yb, logits=layer(z)))
                opt.apply(tape.gradient(loss, variables), variables)
                return loss

            # The layer has a handful of weights and the logits are cached: full-batch steps converge
            # reliably (the bias gradient Σ(p − y) vanishes at the optimum, so Σp = Σy there).
            for _ in range(config.steps):
                step(z_all, y_all)
        finally:
            set_calibration_trainable(model, False)
        method = f"fitted {type(layer).__name__} with {config.steps} full-batch steps"

    after_stream = score_stream(model, manifest, windows, config.batch_size,
                                progress="scoring after calibration" if progress else None)
    after = _summary(after_stream["probabilities"], after_stream["labels"])
    report = {"method": method, "kind": config.kind, "examples": int(len(y)), "before": before, "after": after}
    if config.downsampling_rate is not None:
        # The correction predicts the click rate before downsampling. *If* the held-out windows were
        # downsampled like the training data, they lack the negatives it accounts for, and their ratio reads
        # low after it (0.59 at rate 0.25 in the test); weighting their negatives by 1/rate restores them.
        # Nothing records whether they were, so both figures are reported.
        rate = config.downsampling_rate
        before["calibration_if_held_out_downsampled"] = _reweighted_ratio(stream["probabilities"], y, rate)
        after["calibration_if_held_out_downsampled"] = _reweighted_ratio(after_stream["probabilities"],
                                                                         after_stream["labels"], rate)
    return report, stream, after_stream


def _fit_segment_biases(layer: Any, logits: np.ndarray, labels: np.ndarray, segments: np.ndarray,
                        config: CalibrationConfig) -> None:
    """Set a :class:`~ctrkit.layers.BiasCalibration`'s ``c[s] = g + δ_s``: one global correction ``g`` and
    per-segment deviations ``δ`` under a Gaussian prior, by full-batch Adam on the cached logits:

    ```
    minimise  mean_i BCE(y_i, z_i + g + δ[s_i])  +  τ / (2N) · Σ_s δ_s²,   τ = k · ȳ(1 − ȳ)
    ```

    ``k`` is ``segment_prior_rows``: the prior weighs as much as ``k`` rows at the stream's click rate ``ȳ``,
    so a segment's deviation is shrunk by about ``n_s / (n_s + k)``. Without it, the correction of a segment
    with a few held-out rows and no click runs towards −∞ (only the step budget stops it) and scores that
    segment's later traffic near 0; a segment absent from the stream keeps ``g``, not 0.
    """
    import keras
    import tensorflow as tf

    n = len(labels)
    rate = float(np.clip(np.mean(labels), 1e-6, 1 - 1e-6))
    penalty = tf.constant(config.segment_prior_rows * rate * (1 - rate) / (2 * n), tf.float32)
    z_all = tf.constant(logits.reshape(-1), tf.float32)
    y_all = tf.constant(labels.reshape(-1), tf.float32)
    s_all = tf.constant(np.asarray(segments).reshape(-1).astype(np.int64))
    # The layer checks the ids' range (and names the row) before anything is fitted.
    layer(z_all[:, None], s_all)
    # Started at the unpenalised global solution: moved by Adam together with the deviations, the global
    # term's first hundreds of steps drag every deviation along, and those of small segments (whose gradient
    # is tiny) had not come back after 500 steps (0.8 logit short for a 5-row segment under a shift of -2).
    global_bias = tf.Variable(_global_offset(logits, labels), dtype=tf.float32)
    deviations = tf.Variable(tf.zeros(layer.segment_bias.shape, tf.float32))
    variables = [global_bias, deviations]
    opt = keras.optimizers.Adam(config.learning_rate)

    @tf.function
    def step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            out = z_all + global_bias + tf.gather(deviations, s_all)
            loss = (tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y_all, logits=out))
                    + penalty * tf.reduce_sum(tf.square(deviations)))
        opt.apply(tape.gradient(loss, variables), variables)
        return loss

    for _ in range(config.steps):
        step()
    layer.segment_bias.assign(tf.cast(global_bias + deviations, layer.segment_bias.dtype))


def _global_offset(logits: np.ndarray, labels: np.ndarray) -> float:
    """``g`` with Σσ(z + g) = Σy (Newton's method; the sum is monotone in g), bounded to ±30 when no
    finite one exists (no click, or only clicks)."""
    z = np.asarray(logits, np.float64).reshape(-1)
    clicks = float(np.sum(labels))
    g = 0.0
    for _ in range(100):
        p = 1 / (1 + np.exp(-(z + g)))
        step = (p.sum() - clicks) / max(float((p * (1 - p)).sum()), 1e-12)
        g = float(np.clip(g - np.clip(step, -5.0, 5.0), -30.0, 30.0))
        if abs(step) < 1e-10:
            break
    return g


def _reweighted_ratio(p: np.ndarray, y: np.ndarray, rate: float) -> float | None:
    """Σp / Σy with each negative counted 1/rate times (the population before negative downsampling)."""
    p, y = np.asarray(p, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
    weight = np.where(y > 0.5, 1.0, 1.0 / rate)
    clicks = float(np.sum(weight * y))
    return float(np.sum(weight * p)) / clicks if clicks > 0 else None


def replace_run_model(model: Any, run_dir: str) -> str:
    """Make the calibrated ``model`` the run's model: ``RUN/model.keras`` is what ``ctrkit export`` and
    ``ctrkit compare`` read (a warm start restores the checkpoints, which stay uncalibrated). The model it
    replaces is kept, once, as ``RUN/model_uncalibrated.keras``. Returns the path written."""
    import shutil

    from ctrkit.trainer import RUN_MODEL, UNCALIBRATED_MODEL, save_run_model

    keep = os.path.join(run_dir, UNCALIBRATED_MODEL)
    if not os.path.exists(keep):
        # Copied under another name and renamed: an interrupted copy left a truncated file under the final
        # name, which every later calibrate took for the kept model, so the model as trained was lost.
        tmp = keep + ".tmp"
        shutil.copy2(os.path.join(run_dir, RUN_MODEL), tmp)
        os.replace(tmp, keep)
    return save_run_model(model, run_dir)

