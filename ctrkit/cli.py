"""The ``ctrkit`` command line.

Each subcommand lives in its own module under ``ctrkit/commands`` and exposes ``register(subparsers)``
(adds its parser, sets ``func``). Heavy imports (TensorFlow, Beam) happen inside the command functions,
so ``ctrkit --help`` stays fast. This is the only place that wires pipelines, core and serving together.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from ctrkit._version import __version__
from ctrkit.runtime import configure_process

# Order = order in --help.
COMMAND_MODULES = ("run", "preprocess", "train", "calibrate", "compare", "export", "serve", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctrkit",
        description="CTR modelling with DCN-V2 feature crosses: Beam/TFT preprocessing, online training "
        "with progressive validation, distillation, calibration and TF Serving export.",
        epilog="Run `ctrkit COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"ctrkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"ctrkit.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"ctrkit.commands.{name}":
                continue  # command not shipped in this build
            raise
        module.register(sub)
        if name in sub.choices:  # so an unknown option gets the command's usage line, not the top level's
            sub.choices[name].set_defaults(command_parser=sub.choices[name])
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_process()  # before any command imports TensorFlow: its allocator reads the environment once
    for stream in (sys.stdout, sys.stderr):
        # Under an ASCII locale (LC_ALL=C, PYTHONUTF8=0) the first "→" in a report line raised
        # UnicodeEncodeError and failed the command; such characters are escaped instead.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Commands that run Beam (preprocess) pass options they don't know to Beam unchanged.
        if not getattr(args, "accepts_unknown_args", False):
            getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
        args.beam_args = unknown
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    import signal
    import warnings

    from ctrkit.errors import Terminated

    _expand_home(args)
    default_formatwarning = _print_ctrkit_warnings_as_lines(args.command)
    default_sigterm = _raise_on_sigterm()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        # Only when there is a run to resume: one stopped before run.json was written starts again as it was.
        hint = ("; continue it with the same command and --resume" if args.command == "train" and
                os.path.exists(os.path.join(getattr(args, "run_dir", ""), "run.json")) else "")
        print(f"ctrkit {args.command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}{hint}", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as e:  # noqa: BLE001 - user-facing errors are one line; --debug shows the trace
        from ctrkit.errors import UserError

        if (isinstance(e, UserError) or _is_storage_error(e)) and not getattr(args, "debug", False):
            print(f"ctrkit {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise
    finally:
        warnings.formatwarning = default_formatwarning
        if default_sigterm is not None:
            signal.signal(signal.SIGTERM, default_sigterm)


def _expand_home(args: argparse.Namespace) -> None:
    """``~`` in path arguments, as the shell would: it leaves ``--output=~/prep`` alone (no expansion after
    ``=``), and the job wrote ``./~/prep``, which an ``rm -rf ~`` meant for it would take for the home directory."""
    import os

    for name, value in vars(args).items():
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list) and any(isinstance(v, str) and v.startswith("~") for v in value):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) else v for v in value])


def _raise_on_sigterm() -> Any:
    """Make SIGTERM raise :class:`ctrkit.errors.Terminated` in the main thread, so it stops a command as Ctrl-C
    does (without a handler the process died at once: a training run stayed "running" in run.json and a
    preprocessing worker ran on alone). Returns the previous handler, or None off the main thread."""
    import signal
    import threading

    from ctrkit.errors import Terminated

    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated()

    return signal.signal(signal.SIGTERM, terminate)


def _is_storage_error(e: BaseException) -> bool:
    """A full disk or quota, or a read-only file system: the message names the file, a traceback adds nothing."""
    import errno

    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _print_ctrkit_warnings_as_lines(command: str) -> Any:
    """ctrkit's own warnings as ``ctrkit CMD: warning: ...`` (Python's default shows a source path and line);
    returns the previous ``warnings.formatwarning``. Only the text changes: recorded warnings (pytest,
    ``catch_warnings(record=True)``) are recorded as before."""
    import warnings

    from ctrkit.errors import CtrkitWarning

    default = warnings.formatwarning

    def format_ctrkit(message, category, filename, lineno, line=None):  # noqa: ANN001 - warnings API
        if issubclass(category, CtrkitWarning):
            return f"ctrkit {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = format_ctrkit
    return default


if __name__ == "__main__":
    sys.exit(main())
