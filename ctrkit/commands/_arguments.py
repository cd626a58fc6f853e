"""Argument types shared by the subcommands: bad counts and sizes fail in argparse (exit 2), before any work."""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", int, float)


def _checked(text: str, convert: Callable[[str], T], accept: Callable[[T], bool], expected: str) -> T:
    """``convert(text)`` if it parses and ``accept``s, else argparse's error saying what was ``expected``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (rows, days, steps, versions, sizes)."""
    return _checked(text, int, lambda v: v >= 1, "a positive integer")


def positive_float(text: str) -> float:
    """A finite number > 0 (intervals in seconds)."""
    return _checked(text, float, lambda v: math.isfinite(v) and v > 0, "a positive number")


def model_name(text: str) -> str:
    """A model name, by the rule ``export.model_name`` follows in a config (it becomes a directory and a URL part)."""
    from ctrkit.config import DIR_NAME_RULE, is_dir_name

    if not is_dir_name(text):
        raise argparse.ArgumentTypeError(f"must be {DIR_NAME_RULE}, got {text!r}")
    return text


def port(text: str) -> int:
    """A TCP port, 1..65535."""
    return _checked(text, int, lambda v: 1 <= v <= 65535, "a port number (1-65535)")


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars unless ``--no-progress``, and only on a terminal: in a log file (an orchestrator's) every
    redraw became another line."""
    return not args.no_progress and sys.stderr.isatty()
