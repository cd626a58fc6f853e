"""Errors a user can act on: the CLI prints them as one line and exits non-zero."""
from __future__ import annotations

from ctrkit.configio import ConfigError
from ctrkit.manifest import ManifestError


def listed(names: list[str], limit: int = 5) -> str:
    """``a, b, c`` for a message, the first ``limit`` names and how many more."""
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


class InputError(ValueError):
    """Input data is missing, empty or does not match the configured schema."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a scheduler or ``kill`` sends), raised in the main thread by the CLI so the same cleanup runs
    as for Ctrl-C: a child process stopped, a run marked interrupted, temporary output removed."""


class CtrkitWarning(UserWarning):
    """Something a user should know that does not stop the work; the CLI prints it as one line."""


# Everything the CLI reports as a one-line error instead of a traceback.
UserError = (ConfigError, ManifestError, InputError, FileNotFoundError, NotADirectoryError, PermissionError)
