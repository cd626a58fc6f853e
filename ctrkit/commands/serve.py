"""``ctrkit serve``: a local TF-Serving-compatible REST endpoint over BASE/NAME/<version>/."""
from __future__ import annotations

import argparse

from ctrkit.commands._arguments import model_name, port, positive_float, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve exported versions over TF Serving's REST API (needs `pip install ctrkit[serve]`)",
        description="Serves BASE/NAME/<version>/ on /v1/models/NAME (status, /metadata, :predict, :classify, "
        ":regress) like tensorflow_model_server's REST port, loading new versions as they appear. For "
        "smoke tests and machines without Docker; production uses tensorflow/serving (serving/deploy/).",
    )
    p.add_argument("base_path", help="directory holding NAME/<version>/")
    p.add_argument("--model-name", required=True, type=model_name,
                   help="the NAME in BASE/NAME/<version>/ and in the URL /v1/models/NAME")
    p.add_argument("--port", type=port, default=8501, help="REST port (default: 8501, TF Serving's)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    p.add_argument("--num-versions", type=positive_int, default=1, help="newest versions kept loaded (default: 1)")
    p.add_argument("--poll-seconds", type=positive_float, default=1.0,
                   help="how often to look for new versions (default: 1.0)")
    p.add_argument("--max-batch-size", type=positive_int, default=1024,
                   help="largest batch one request may send (default: 1024)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from ctrkit.errors import InputError

    if not os.path.isdir(args.base_path):
        raise NotADirectoryError(f"model base path {args.base_path} is not a directory")
    _refuse_port_in_use(args.host, args.port)  # before minutes of loading, not after (uvicorn's raw error, exit 3)
    try:
        from ctrkit.serving.server import serve
        import orjson  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise InputError(f"ctrkit serve needs the 'serve' extra: pip install 'ctrkit[serve]' ({e})") from e
    import logging
    import sys

    # Versions loaded, failed or incomplete, and the startup line: an operator's view of what is served.
    logging.basicConfig(level=logging.WARNING, format="ctrkit serve: %(message)s", stream=sys.stderr)
    logging.getLogger("ctrkit.serving").setLevel(logging.INFO)
    hint = _misplaced_versions(args.base_path, args.model_name)
    if hint:
        logging.getLogger("ctrkit.serving").warning(hint)
    serve(
        args.base_path,
        args.model_name,
        port=args.port,
        host=args.host,
        num_versions=args.num_versions,
        poll_seconds=args.poll_seconds,
        max_batch_size=args.max_batch_size,
    )
    return 0


def _refuse_port_in_use(host: str, port: int) -> None:
    import errno
    import socket

    from ctrkit.errors import InputError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise InputError(f"port {port} on {host} is in use (another server?); choose another with --port") from None
            raise


def _misplaced_versions(base_path: str, model_name: str) -> str | None:
    """What to pass instead when BASE/NAME holds no versions but the versions are nearby: BASE given as
    BASE/NAME (TF Serving's --model_base_path form), or another model name under BASE."""
    import os

    from ctrkit.serving import versions

    if versions.list_versions(os.path.join(base_path, model_name)):
        return None
    here = versions.list_versions(base_path)
    if here:
        parent, name = os.path.split(os.path.normpath(os.path.abspath(base_path)))
        return (f"{base_path} itself holds versions {here}: ctrkit serve takes their "
                f"parent, `ctrkit serve {parent} --model-name {name}`")
    others = sorted(d for d in os.listdir(base_path) if versions.list_versions(os.path.join(base_path, d)))
    if others:
        return f"{base_path} holds no model {model_name!r}, but versions of {others}: check --model-name"
    return None
