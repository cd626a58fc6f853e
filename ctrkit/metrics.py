"""Streaming CTR metrics for progressive validation.

Every batch is scored by the model *before* the model trains on it, so the running metrics over the
stream are an honest estimate of how the model does on data it has not seen (progressive validation,
McMahan et al. 2013, "Ad Click Prediction: a View from the Trenches").

Metrics, all computed from additive sufficient statistics so they can be merged, checkpointed and
restored exactly:
  * AUC from a 2^16-bin histogram of predicted probability per class (ties within a bin count one half;
    the error against the exact AUC is below 1e-4 for CTR-range predictions)
  * log loss, and normalized entropy NE = log loss / H(base CTR), H(c) = −c log c − (1−c) log(1−c)
    with c the base CTR of the same examples (He et al. 2014)
  * calibration ratio Σp / Σy (1.0 is perfectly calibrated in aggregate)
  * expected calibration error over 10 equal-width probability bins: Σ_b |Σ_{i∈b} p_i − y_i| / n
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["StreamingMetrics", "ProgressiveValidation", "auc_exact", "ece", "downsampling_correction"]

AUC_BINS = 1 << 16
ECE_BINS = 10
_EPS = 1e-7


class StreamingMetrics:
    """Additive statistics of (probability, label) pairs; :meth:`result` turns them into metrics."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.sum_p = 0.0
        self.sum_y = 0.0
        self.sum_logloss = 0.0
        self.auc_pos = np.zeros(AUC_BINS, np.int64)
        self.auc_neg = np.zeros(AUC_BINS, np.int64)
        self.ece_p = np.zeros(ECE_BINS, np.float64)
        self.ece_y = np.zeros(ECE_BINS, np.float64)

    def update(self, probabilities: Any, labels: Any) -> None:
        p = np.asarray(probabilities, np.float64).reshape(-1)
        y = np.asarray(labels, np.float64).reshape(-1)
        if p.shape != y.shape:
            raise ValueError(f"{p.shape[0]} predictions but {y.shape[0]} labels")
        if p.size == 0:
            return
        if not np.all(np.isfinite(p)):
            raise ValueError("non-finite predicted probability")
        pc = np.clip(p, _EPS, 1 - _EPS)
        self.count += p.size
        self.sum_p += float(p.sum())
        self.sum_y += float(y.sum())
        self.sum_logloss += float(-(y * np.log(pc) + (1 - y) * np.log1p(-pc)).sum())
        bins = np.minimum((p * AUC_BINS).astype(np.int64), AUC_BINS - 1)
        pos = y > 0.5
        self.auc_pos += np.bincount(bins[pos], minlength=AUC_BINS)
        self.auc_neg += np.bincount(bins[~pos], minlength=AUC_BINS)
        eb = np.minimum((p * ECE_BINS).astype(np.int64), ECE_BINS - 1)
        self.ece_p += np.bincount(eb, weights=p, minlength=ECE_BINS)
        self.ece_y += np.bincount(eb, weights=y, minlength=ECE_BINS)

    def merge(self, other: StreamingMetrics) -> None:
        for name in ("count", "sum_p", "sum_y", "sum_logloss", "auc_pos", "auc_neg", "ece_p", "ece_y"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def result(self) -> dict[str, float | int | None]:
        """Metrics as JSON-safe numbers; a metric undefined on these examples (e.g. AUC with one class) is None."""
        n = self.count
        out: dict[str, float | int | None] = {"examples": n}
        if n == 0:
            return {**out, "auc": None, "logloss": None, "ne": None, "calibration": None, "ece": None, "ctr": None}
        ctr = self.sum_y / n
        logloss = self.sum_logloss / n
        c = min(max(ctr, _EPS), 1 - _EPS)
        entropy = -(c * math.log(c) + (1 - c) * math.log(1 - c))
        pos, neg = self.auc_pos.sum(), self.auc_neg.sum()
        if pos and neg:
            neg_below = np.cumsum(self.auc_neg) - self.auc_neg
            auc = float((self.auc_pos * (neg_below + 0.5 * self.auc_neg)).sum() / (pos * neg))
        else:
            auc = None
        out.update(
            auc=auc,
            logloss=logloss,
            ne=logloss / entropy if 0 < ctr < 1 else None,
            calibration=self.sum_p / self.sum_y if self.sum_y > 0 else None,
            ece=float(np.abs(self.ece_p - self.ece_y).sum() / n),
            ctr=ctr,
            mean_p=self.sum_p / n,
        )
        return out

    # -- checkpointing --------------------------------------------------------------------------
    def state(self, prefix: str) -> dict[str, np.ndarray]:
        scalars = np.array([self.count, self.sum_p, self.sum_y, self.sum_logloss], np.float64)
        return {
            f"{prefix}/scalars": scalars,
            f"{prefix}/auc_pos": self.auc_pos,
            f"{prefix}/auc_neg": self.auc_neg,
            f"{prefix}/ece_p": self.ece_p,
            f"{prefix}/ece_y": self.ece_y,
        }

    def load_state(self, state: dict[str, np.ndarray], prefix: str) -> None:
        count, self.sum_p, self.sum_y, self.sum_logloss = (float(v) for v in state[f"{prefix}/scalars"])
        self.count = int(count)
        self.sum_p, self.sum_y, self.sum_logloss = float(self.sum_p), float(self.sum_y), float(self.sum_logloss)
        for name in ("auc_pos", "auc_neg", "ece_p", "ece_y"):
            setattr(self, name, np.array(state[f"{prefix}/{name}"]))


class ProgressiveValidation:
    """Per-window and cumulative :class:`StreamingMetrics` of an online run."""

    def __init__(self) -> None:
        self.window = StreamingMetrics()
        self.cumulative = StreamingMetrics()

    def update(self, probabilities: Any, labels: Any) -> None:
        p = np.asarray(probabilities).reshape(-1)
        y = np.asarray(labels).reshape(-1)
        # Both are updated per batch (not merged at window end) so cumulative readings exist mid-window.
        self.window.update(p, y)
        self.cumulative.update(p, y)

    def end_window(self) -> dict[str, Any]:
        result = {"window": self.window.result(), "cumulative": self.cumulative.result()}
        self.window.reset()
        return result

    def state(self) -> dict[str, np.ndarray]:
        return {**self.window.state("pv_window"), **self.cumulative.state("pv_cumulative")}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.window.load_state(state, "pv_window")
        self.cumulative.load_state(state, "pv_cumulative")


def auc_exact(probabilities: Any, labels: Any) -> float:
    """Exact ROC AUC by ranking (ties count one half); the reference the histogram AUC is tested against."""
    p = np.asarray(probabilities, np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1) > 0.5
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), np.float64)
    sorted_p = p[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        raise ValueError("AUC needs both classes")
    return float((ranks[y].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def ece(probabilities: Any, labels: Any, bins: int = ECE_BINS) -> float:
    """Expected calibration error over ``bins`` equal-width probability bins."""
    p = np.asarray(probabilities, np.float64).reshape(-1)
    y = np.asarray(labels, np.float64).reshape(-1)
    b = np.minimum((p * bins).astype(np.int64), bins - 1)
    return float(np.abs(np.bincount(b, p, bins) - np.bincount(b, y, bins)).sum() / len(p))


def downsampling_correction(p: Any, rate: float) -> np.ndarray:
    """Undo negative downsampling in closed form: q = p / (p + (1 − p) / w), w = kept fraction of negatives."""
    if not 0 < rate <= 1:
        raise ValueError(f"downsampling rate must be in (0, 1], got {rate}")
    p = np.asarray(p, np.float64)
    return p / (p + (1 - p) / rate)
