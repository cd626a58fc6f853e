"""Distillation: a teacher's logits as soft labels for the student's distillation head.

The student's main head keeps learning the clicks; its distillation head (sharing the body) learns the
teacher's temperature-softened probabilities, so the body gets the teacher's lower-variance targets without
the served logit being pulled away from the click labels:

    L = Σ_i s_i · [ BCE(y_i, σ(z_i)) + λ · c_i · T² · BCE(σ(t_i / T), σ(d_i / T)) ] / B

with z the main logit, d the distillation logit, t the teacher logit, T the temperature, λ the weight,
c_i = |2σ(t_i) − 1| the teacher's confidence (1 when confidence weighting is off) and s_i the selection
weight below (1 when selection is off). T² keeps the gradient scale independent of T (Hinton et al. 2015).

Teacher-guided selection keeps the examples the teacher finds hard: example i is kept with probability
q_i = min(1, c · ℓ_i), ℓ_i = BCE(y_i, σ(t_i)), and weighted by s_i = 1/q_i, so E[s_i] = 1 and the expected
loss equals the full-batch loss (Horvitz–Thompson): high-loss examples are always kept, easy ones are
sampled. The scale c is set so that the expected kept count is exactly what was asked for,
Σ_i min(1, c · ℓ_i) = fraction · B (water-filling). Taking c = fraction · B / Σℓ instead, as an earlier
version did, loses the mass clipped at 1 and keeps fewer examples than asked when the losses are skewed
(0.144 · B instead of 0.25 · B for B = 4096 losses ~ lognormal(0, 2), 0.41 · B instead of 0.9 · B for a
confident teacher; tests/test_distill_selection.py). With the losses sorted in decreasing order
ℓ_(1) ≥ … ≥ ℓ_(B) and T_k = Σ_{j>k} ℓ_(j), if the k largest saturate then c = (fraction · B − k) / T_k; the
right k is the smallest one whose next loss does not saturate, (fraction · B − k) · ℓ_(k+1) ≤ T_k. That test
is false for a prefix of k and true from there on (it holds for every k ≥ fraction · B), so k is found with
one sort, one cumulative sum and one comparison over the batch, no loop. Rescaling keeps E[s_i] = 1: only
which examples are likely kept changes, and every q_i stays > 0.

Teachers: a ctrkit run directory (its ``model.keras``), a ``.keras`` file, or a SavedModel whose default
``serve`` signature takes the transformed feature dict (e.g. a ``keras.export.ExportArchive`` of a ctrkit
model) and returns a dict with ``"logits"``; or, without a teacher model, the manifest's teacher-logit
column.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from ctrkit.errors import InputError

__all__ = [
    "distillation_loss",
    "selection_probabilities",
    "selection_weights",
    "load_teacher",
    "teacher_snapshots",
    "teacher_schedule",
]


def distillation_loss(
    student_logits: tf.Tensor, teacher_logits: tf.Tensor, temperature: float = 1.0, confidence_weighting: bool = False
) -> tf.Tensor:
    """Per-example distillation loss, shape (B,): :func:`ctrkit.layers.distillation_loss` on flat logits."""
    from ctrkit import layers

    d = tf.reshape(student_logits, [-1])
    t = tf.reshape(tf.cast(teacher_logits, d.dtype), [-1])
    return layers.distillation_loss(t, d, temperature=temperature, confidence_weighting=confidence_weighting)


def _keep_probabilities(labels: tf.Tensor, teacher_logits: tf.Tensor, fraction: float) -> tf.Tensor:
    """q_i = min(1, c · ℓ_i) with Σ_i q_i = fraction · B, in float64, for fraction < 1."""
    y = tf.reshape(tf.cast(labels, tf.float32), [-1])
    t = tf.reshape(tf.cast(teacher_logits, tf.float32), [-1])
    # + 1e-6: every example keeps a positive keep probability, which unbiasedness needs.
    teacher_loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=t) + 1e-6
    # Solved in float64: a float32 cumulative sum over a 4096 batch can be off by up to B · 2^-24 ≈ 2.4e-4
    # relative, and the batch is small enough for the cost not to matter.
    loss = tf.cast(teacher_loss, tf.float64)
    target = fraction * tf.cast(tf.size(loss), tf.float64)  # fraction · B expected kept examples
    ordered = tf.sort(loss, direction="DESCENDING")
    tail = tf.cumsum(ordered, reverse=True)  # tail[k] = T_k, the sum without the k largest (0-based)
    k = tf.cast(tf.range(tf.size(loss)), tf.float64)
    # The number of saturated examples is the first k whose next loss stays unsaturated under c_k; every
    # k ≥ fraction · B passes, so argmax (the first True) always finds one.
    unsaturated = (target - k) * ordered <= tail
    saturated = tf.argmax(tf.cast(unsaturated, tf.int32), output_type=tf.int32)
    scale = (target - tf.cast(saturated, tf.float64)) / tail[saturated]
    return tf.minimum(scale * loss, tf.constant(1.0, tf.float64))


def selection_probabilities(labels: tf.Tensor, teacher_logits: tf.Tensor, fraction: float) -> tf.Tensor:
    """Keep probabilities q_i = min(1, c · ℓ_i) of teacher-guided selection, with Σ_i q_i = fraction · B."""
    if fraction >= 1.0:
        return tf.ones_like(tf.reshape(tf.cast(labels, tf.float32), [-1]))
    return tf.cast(_keep_probabilities(labels, teacher_logits, fraction), tf.float32)


def selection_weights(labels: tf.Tensor, teacher_logits: tf.Tensor, fraction: float, seed: tf.Tensor) -> tf.Tensor:
    """Importance weights s_i ∈ {0} ∪ [1, ∞) of teacher-guided selection; ``seed`` is a shape-[2] int tensor.

    Example i is kept with probability q_i (:func:`selection_probabilities`) and weighted 1/q_i when kept, so
    E[s_i] = 1 for every example.
    """
    if fraction >= 1.0:
        return tf.ones_like(tf.reshape(tf.cast(labels, tf.float32), [-1]))
    q = _keep_probabilities(labels, teacher_logits, fraction)
    keep = tf.random.stateless_uniform(tf.shape(q), seed=seed) < tf.cast(q, tf.float32)
    # 1/q in float64: a graph-mode float32 reciprocal is 1-2 ulp off, which made always-kept examples 0.99999994.
    return tf.where(keep, tf.cast(1.0 / q, tf.float32), 0.0)


def load_teacher(path: str) -> Callable[[dict[str, tf.Tensor]], tf.Tensor]:
    """A callable features → teacher logits (B,), from a run dir, a ``.keras`` file or a SavedModel."""
    import keras

    import ctrkit.layers  # noqa: F401 - registers the custom layers for deserialization

    if os.path.isdir(path) and os.path.exists(os.path.join(path, "model.keras")):
        path = os.path.join(path, "model.keras")
    if path.endswith(".keras"):
        if not os.path.exists(path):
            raise InputError(f"teacher model {path} not found")
        model = keras.saving.load_model(path, compile=False)

        def score(features: dict[str, tf.Tensor]) -> tf.Tensor:
            return tf.reshape(model(features, training=False)["logits"], [-1])

        score.model = model  # type: ignore[attr-defined]
        return score
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb")):
        loaded = tf.saved_model.load(path)
        fn: Any = getattr(loaded, "serve", None) or loaded.signatures.get("serving_default")
        if fn is None:
            raise InputError(f"teacher SavedModel {path} has neither a `serve` endpoint nor a serving_default signature")
        _refuse_raw_input_teacher(path, fn)

        def score_sm(features: dict[str, tf.Tensor]) -> tf.Tensor:
            out = fn(features)
            if not isinstance(out, dict) or "logits" not in out:
                raise InputError(f"teacher SavedModel {path} must return a dict with 'logits'")
            return tf.reshape(out["logits"], [-1])

        score_sm.model = loaded  # type: ignore[attr-defined]
        return score_sm
    if not os.path.exists(path):
        raise InputError(f"teacher {path!r} does not exist (distill.teacher: a ctrkit run directory, a .keras file "
                         "or a SavedModel directory)")
    raise InputError(
        f"teacher {path!r} is neither a ctrkit run directory (with model.keras), a .keras file nor a SavedModel"
    )


def _refuse_raw_input_teacher(path: str, fn: Any) -> None:
    """A teacher scores the trainer's *transformed* features; a serving export (``ctrkit export``, TF Serving
    style) takes serialized raw ``tf.Example``s and failed at the first step with a binding traceback."""
    # A signature has its own input signature; a restored `serve` endpoint has one per traced function, and
    # takes its inputs positionally as often as by name.
    concrete = [fn] if hasattr(fn, "structured_input_signature") else list(getattr(fn, "concrete_functions", []))
    for function in concrete:
        specs = [s for s in tf.nest.flatten(function.structured_input_signature) if isinstance(s, tf.TensorSpec)]
        if len(specs) == 1 and specs[0].dtype == tf.string and specs[0].shape.rank == 1:
            raise InputError(
                f"teacher SavedModel {path} takes serialized tf.Examples ({specs[0].name or 'one string tensor'}), "
                "as a serving export does; the teacher scores transformed features: give the teacher's run "
                "directory (its model.keras), or a SavedModel whose `serve` endpoint takes the transformed feature "
                "dict")


def teacher_snapshots(run_dir: str) -> dict[str, str]:
    """Window name → the teacher model saved right after that window, from a ctrkit run directory.

    The trainer logs each finished window with its step in ``metrics.jsonl`` and, without an exporter, saves
    ``models/<step>.keras`` at export intervals; a teacher run meant for ``teacher_as_of: previous_window`` is
    trained with ``export.every_windows: 1`` so every window has its snapshot.
    """
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(metrics):
        raise InputError(f"teacher {run_dir!r} is not a ctrkit run directory (no metrics.jsonl)")
    snapshots = {}
    with open(metrics, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("type") != "window":
                continue
            path = os.path.join(run_dir, "models", f"{rec['step']:09d}.keras")
            if os.path.exists(path):
                snapshots[rec["name"]] = path
    if not snapshots:
        raise InputError(
            f"teacher run {run_dir!r} saved no per-window models (models/<step>.keras): train it with "
            "export.every_windows: 1 and no exporter, or use distill.teacher_as_of: final"
        )
    return snapshots


def teacher_schedule(window_names: list[str], snapshots: dict[str, str]) -> list[str | None]:
    """For each window, the teacher snapshot saved after the window right before it (None: no teacher yet).

    The first window, and any window whose predecessor the teacher never finished, gets None: the student then
    trains on clicks alone there rather than on a teacher that has seen the window's labels.
    """
    return [snapshots.get(window_names[i - 1]) if i > 0 else None for i in range(len(window_names))]
