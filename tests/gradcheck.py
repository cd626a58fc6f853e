"""Finite-difference gradient checks shared by the layer tests."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def assert_weight_grads_match(loss: Callable[[], Any], variables: Sequence[Any], grads: Sequence[Any],
                              eps: float = 1e-6, rtol: float = 1e-6) -> None:
    """Central differences of ``loss`` w.r.t. the first, middle and last entry of each variable must equal
    the autodiff gradient (float64 layers, so eps=1e-6 leaves ~1e-10 truncation error)."""
    for var, grad in zip(variables, grads):
        base = var.numpy()
        for fi in (0, base.size // 2, base.size - 1):
            idx = np.unravel_index(fi, base.shape)
            vals = []
            for sign in (1, -1):
                w = base.copy()
                w[idx] += sign * eps
                var.assign(w)
                vals.append(float(loss()))
            var.assign(base)
            numeric = (vals[0] - vals[1]) / (2 * eps)
            assert abs(numeric - grad.numpy()[idx]) < rtol * max(1.0, abs(numeric)), (var.path, idx)
