"""Reproducibility: how much do two runs' predictions differ on the same data?

Prediction difference (Shamir et al. 2020, "Anti-Distillation: Improving Reproducibility of Deep
Networks"; Shamir & Lin 2022, "Real World Large Scale Recommendation Systems Reproducibility and Smooth
Activations"):

    PD = (1/N) Σ_i |p1_i − p2_i| / ((p1_i + p2_i) / 2)

the mean relative difference of two models' click probabilities. Two runs that differ only in the seed
should have a small PD; smooth activations (SmeLU) lower it against ReLU.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ctrkit.manifest import Manifest
from ctrkit.trainer import RUN_MODEL, UNCALIBRATED_MODEL, is_calibrated

__all__ = ["prediction_difference", "compare_runs", "compare_models", "UNCALIBRATED_MODEL"]


def prediction_difference(p1: Any, p2: Any) -> float:
    """PD = mean |p1 − p2| / ((p1 + p2) / 2) over examples."""
    a = np.asarray(p1, np.float64).reshape(-1)
    b = np.asarray(p2, np.float64).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two equally long non-empty prediction vectors, got {a.size} and {b.size}")
    mean = (a + b) / 2
    return float(np.mean(np.abs(a - b) / np.maximum(mean, 1e-12)))


def compare_models(
    model_a: Any,
    model_b: Any,
    manifest: Manifest,
    windows: Sequence[int] | None = None,
    batch_size: int = 4096,
    progress: bool = False,
) -> dict[str, Any]:
    """PD and each model's metrics on the same windows (``progress``: a progress bar per model, on stderr)."""
    from ctrkit.calibrate import score_stream
    from ctrkit.metrics import StreamingMetrics

    a = score_stream(model_a, manifest, windows, batch_size, progress="scoring run A" if progress else None)
    b = score_stream(model_b, manifest, windows, batch_size, progress="scoring run B" if progress else None)
    out: dict[str, Any] = {
        "examples": int(len(a["labels"])),
        "pd": prediction_difference(a["probabilities"], b["probabilities"]),
        "mean_abs_diff": float(np.mean(np.abs(a["probabilities"] - b["probabilities"]))),
    }
    for name, s in (("a", a), ("b", b)):
        m = StreamingMetrics()
        m.update(s["probabilities"], s["labels"])
        r = m.result()
        out[name] = {k: r[k] for k in ("auc", "logloss", "calibration", "ece")}
    return out


def compare_runs(
    run_a: str,
    run_b: str,
    data_dir: str,
    windows: Sequence[int] | None = None,
    batch_size: int = 4096,
    uncalibrated: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """:func:`compare_models` on the final models of two ctrkit run directories.

    Both runs must have been trained on data with DATA's vocabularies. A calibrated run (``ctrkit calibrate``
    keeps ``model_uncalibrated.keras`` beside it) against an uncalibrated one is refused: PD would measure
    the calibration, not the training. ``uncalibrated=True`` compares the models as trained.
    """
    from ctrkit.errors import InputError
    from ctrkit.trainer import check_model_fits_data, load_run_model, vocabulary_fingerprint

    manifest = Manifest.load(data_dir)
    fingerprint = vocabulary_fingerprint(manifest)
    if not uncalibrated and is_calibrated(run_a) != is_calibrated(run_b):
        calibrated, plain = (run_a, run_b) if is_calibrated(run_a) else (run_b, run_a)
        raise InputError(
            f"{calibrated} holds a calibrated model and {plain} does not, so PD would mostly measure the "
            "calibration; compare the models as trained (--uncalibrated) or calibrate both"
        )
    models = []
    for run in (run_a, run_b):
        model = load_run_model(run, UNCALIBRATED_MODEL if uncalibrated and is_calibrated(run) else RUN_MODEL)
        check_model_fits_data("compare:", run, model, manifest, fingerprint,
                              "Compare on data preprocessed with that run's transform (ctrkit preprocess ... --transform-fn).")
        models.append(model)
    out = compare_models(models[0], models[1], manifest, windows, batch_size, progress)
    return {"run_a": os.path.abspath(run_a), "run_b": os.path.abspath(run_b), "data": os.path.abspath(data_dir),
            "uncalibrated": uncalibrated, **out}
