"""Shared argument and shape checks, so every layer fails with the same kind of message."""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Iterable, Mapping

import numpy as np


def _is_bool(value: Any) -> bool:
    # bool is an int subclass and np.bool_ has __index__ in older NumPy: True must not read as 1.
    return isinstance(value, (bool, np.bool_))


def positive_int(layer: str, name: str, value: Any, allow_none: bool = False) -> int | None:
    """Return ``value`` as a plain Python int > 0, or raise ``ValueError`` naming the layer and argument.

    Any integral number is accepted (``int``, ``np.int64``, ...; via ``operator.index``), never a bool or
    a float; the result is a Python ``int`` so configs stay JSON-serialisable.
    """
    if value is None and allow_none:
        return None
    n = None
    if not _is_bool(value) and isinstance(value, (numbers.Integral, np.integer)):
        n = operator.index(value)
    if n is None or n < 1:
        raise ValueError(f"{layer}: `{name}` must be a positive integer{' or None' if allow_none else ''}, got {value!r}")
    return int(n)


def as_real(value: Any) -> float | None:
    """``value`` as a Python float if it is a finite real number (``float``, ``int``, ``np.float32``, ...,
    not a bool), else ``None``; the caller checks the range and words the error."""
    if _is_bool(value) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return float(value)


def non_negative_float(layer: str, name: str, value: Any) -> float:
    """Return ``value`` as a Python float >= 0 (``None`` reads as 0, as in keras-rs), or raise ``ValueError``."""
    if value is None:
        return 0.0
    x = as_real(value)
    if x is None or x < 0:
        raise ValueError(f"{layer}: `{name}` must be a non-negative number, got {value!r}")
    return x


def positive_int_sequence(layer: str, name: str, value: Any) -> list[int]:
    """Return ``value`` (a sequence of widths such as ``(500, 500)``) as a list of Python ints > 0.

    A bare number or a string is refused with a message naming the argument, rather than surfacing as
    ``TypeError: 'int' object is not iterable``.
    """
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(
            f"{layer}: `{name}` must be a sequence of positive integers such as (256, 128), got {value!r}"
        )
    return [positive_int(layer, f"{name}[{i}]", u) for i, u in enumerate(value)]


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
