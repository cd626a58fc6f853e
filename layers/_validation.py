"""Shared argument and shape checks, so every layer fails with the same kind of message."""
from __future__ import annotations

from typing import Any


def positive_int(layer: str, name: str, value: Any, allow_none: bool = False) -> int | None:
    """Return ``value`` as an int > 0, or raise ``ValueError`` naming the layer and argument."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{layer}: `{name}` must be a positive integer{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def non_negative_float(layer: str, name: str, value: Any) -> float:
    """Return ``value`` as a float >= 0 (``None`` reads as 0, as in keras-rs), or raise ``ValueError``."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{layer}: `{name}` must be a non-negative number, got {value!r}")
    return float(value)


def last_dim(layer: str, shape: Any, what: str = "x0") -> int:
    """The static last dimension of ``shape``; raises if the rank is < 2 or the dimension is unknown."""
    if shape is None or len(shape) < 2:
        raise ValueError(f"{layer}: `{what}` must have shape (batch, ..., features), got shape {shape}")
    d = shape[-1]
    if d is None:
        raise ValueError(f"{layer}: the last dimension of `{what}` must be known when the layer is built, got {shape}")
    return int(d)


def same_shape(layer: str, x0: Any, x: Any) -> None:
    """Raise if ``x0`` and ``x`` disagree on a statically known dimension."""
    s0, s1 = tuple(x0.shape), tuple(x.shape)
    if len(s0) != len(s1) or any(a is not None and b is not None and a != b for a, b in zip(s0, s1)):
        raise ValueError(f"{layer}: `x0` and `x` must have the same shape, got x0 {s0} and x {s1}")
