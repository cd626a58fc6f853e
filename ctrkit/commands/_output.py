"""How the subcommands print metric values."""
from __future__ import annotations


def metric(value: float | None) -> str:
    """Four decimals; ``n/a`` for a metric the data leaves undefined (AUC and the calibration ratio of a
    stream with one class only are ``None``)."""
    return "n/a" if value is None else f"{value:.4f}"
