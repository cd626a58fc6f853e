"""``ctrkit preprocess``: raw click logs → windows of transformed TFRecords + transform_fn + manifest."""
from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preprocess",
        help="run the Beam + tensorflow-transform preprocessing job",
        description="Reads raw click logs (Criteo TSV, CSV with header, Parquet; globs, gzip), validates "
        "them (bad rows go to OUTPUT/rejected/ with file, line and reason), analyzes the configured "
        "transforms with tensorflow-transform (or applies a saved transform_fn) and writes time windows "
        "of gzip TFRecords plus manifest.json. Options this command does not know are Beam pipeline "
        "options and are passed to Beam unchanged, e.g. --runner=DataflowRunner --project=P "
        "--region=R --temp_location=gs://B/tmp --setup_file=./setup.py. Without --runner the local "
        "FnApiRunner runs the job; --direct_num_workers=2 --direct_running_mode=multi_processing uses "
        "two processes.",
    )
    p.add_argument("--config", required=True, help="YAML config file (its data: section is used) or built-in name")
    p.add_argument("--input", action="append", required=True, metavar="PATH_OR_GLOB",
                   help="input file or glob; repeat for several")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    p.add_argument("--transform-fn", metavar="DIR", default=None,
                   help="apply the transform_fn of this earlier output instead of analyzing the input")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier preprocess output in --output (refused if it holds other files)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.set_defaults(func=run, accepts_unknown_args=True)


def run(args: argparse.Namespace) -> int:
    import logging

    from ctrkit.config import load_config
    from ctrkit.pipelines import preprocess
    from ctrkit.pipelines.runner import check_pipeline_args

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    config = load_config(args.config)
    beam_args = list(getattr(args, "beam_args", []) or [])
    parser = getattr(args, "command_parser", None)
    check_pipeline_args(beam_args, [s for a in parser._actions for s in a.option_strings] if parser else [])
    manifest = preprocess(config.data, args.input, args.output, transform_fn_dir=args.transform_fn,
                          pipeline_args=beam_args, overwrite=args.overwrite)
    print(f"wrote {args.output}: {_count(manifest.rows_written, 'row')} in {_count(len(manifest.windows), 'window')}, "
          f"{manifest.rows_rejected} rejected (of {manifest.rows_read} read), "
          f"{_count(manifest.rows_padded, 'short row')} padded, {_count(len(manifest.features), 'feature')}")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
