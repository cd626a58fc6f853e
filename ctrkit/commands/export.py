"""``ctrkit export``: write a trained model as a TF Serving version (transform graph inside)."""
from __future__ import annotations

import argparse
import json
import os
import re

from ctrkit.commands._arguments import model_name, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained model as a TF Serving SavedModel version BASE/NAME/<version>/",
        description="Exports RUN_DIR's final model (or --model PATH.keras, with RUN_DIR or --data DATA) "
        "with the pipeline's tensorflow-transform graph inside, so clients send raw features. Signatures: "
        "serving_default (serialized tf.Example 'examples'), predict_raw, classify, regress. The version is "
        "validated (saved_model_cli; a fresh-process reload, also as TF Serving loads it) before it is renamed into "
        "place. Example: ctrkit export runs/day2 --base-path /srv/models --model-name ctr",
    )
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a finished `ctrkit train` run directory: its final "
                   "model, its data and its export.keep_versions are used (the run's export.base_path and model_name "
                   "are not: give --base-path and --model-name)")
    p.add_argument("--base-path", required=True, help="TF Serving model base path parent (BASE)")
    p.add_argument("--model-name", required=True, type=model_name, help="model name (versions go to BASE/NAME/<version>)")
    p.add_argument("--model", help="a .keras model to export instead of RUN_DIR's final model (e.g. "
                   "RUN_DIR/model_uncalibrated.keras); without RUN_DIR it needs --data")
    p.add_argument("--data", help="pipeline output directory the model was trained on (default: RUN_DIR's)")
    p.add_argument("--version", type=positive_int, help="integer version (default: above every existing one)")
    p.add_argument("--keep-versions", type=positive_int,
                   help="newest versions to keep (default: export.keep_versions of RUN_DIR's config.yaml, also with "
                        "--model; 5 without RUN_DIR or without its config.yaml)")
    p.add_argument(
        "--warmup-rows",
        metavar="JSONL",
        help="raw rows (one JSON object per line) for the warmup requests "
        "(default: the first rows of the pipeline's raw input)",
    )
    p.add_argument("--no-validate", action="store_true", help="skip saved_model_cli and reload checks")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def _run_data_dir(run_dir: str) -> str:
    from ctrkit.trainer import read_run_info, run_info_field

    info = read_run_info(run_dir, "a ctrkit run directory (or pass --model and --data)")
    return run_info_field(run_dir, info, "data_dir")


def _keep_versions(args: argparse.Namespace) -> int:
    """--keep-versions, else the run's ``export.keep_versions``; the config default (5) where there is no run
    config (--model, or a run directory assembled by hand with only run.json and model.keras)."""
    from ctrkit.config import ExportConfig
    from ctrkit.trainer import read_run_config

    if args.keep_versions is not None:
        return args.keep_versions
    if args.run_dir and os.path.exists(os.path.join(args.run_dir, "config.yaml")):
        return read_run_config(args.run_dir).export.keep_versions
    return ExportConfig.keep_versions


def _downsampling_rate(args: argparse.Namespace) -> float | None:
    """RUN_DIR's ``calibration.downsampling_rate`` when its final model is exported before ``ctrkit calibrate``
    ran (which keeps the model as trained in model_uncalibrated.keras): that model would serve the training
    stream's inflated click rates. None for --model, a calibrated run, or a run without the setting."""
    from ctrkit.trainer import is_calibrated, read_run_config

    if args.model or not os.path.exists(os.path.join(args.run_dir, "config.yaml")):
        return None
    if is_calibrated(args.run_dir):
        return None
    return read_run_config(args.run_dir).calibration.downsampling_rate


def run(args: argparse.Namespace) -> int:
    from ctrkit.errors import InputError

    if not args.run_dir and not args.model:
        raise InputError("give RUN_DIR, or --model PATH.keras with --data DATA (the pipeline output)")
    if args.model and not args.data and not args.run_dir:
        raise InputError("--model without RUN_DIR needs --data DATA (the pipeline output the model was "
                         "trained on)")
    data_dir = args.data or _run_data_dir(args.run_dir)
    keep_versions = _keep_versions(args)

    import keras

    import ctrkit.layers  # noqa: F401 - registers ctrkit's custom layers for loading
    from ctrkit.serving.export import export_model
    from ctrkit.serving.signatures import ExportError
    from ctrkit.serving.validate import ValidationError

    if args.model:
        if not os.path.exists(args.model):
            raise FileNotFoundError(f"model file {args.model} not found")
        model = keras.saving.load_model(args.model, compile=False)
    else:
        from ctrkit.trainer import load_run_model

        model = load_run_model(args.run_dir)
    from ctrkit.manifest import Manifest
    from ctrkit.trainer import check_model_fits_data, vocabulary_fingerprint

    # The export pairs the data's transform (vocabularies) with the model's embedding rows: they must be the
    # ones it was trained with (a run directory records them; a bare model file is checked by sizes).
    manifest = Manifest.load(data_dir)
    check_model_fits_data("ctrkit export:", args.model or args.run_dir, model, manifest,
                          vocabulary_fingerprint(manifest),
                          "Export with the data the model was trained on (--data), or data preprocessed with "
                          "its transform (ctrkit preprocess ... --transform-fn).")
    warmup, warmup_lines = None, []
    if args.warmup_rows:
        warmup, warmup_lines = _read_warmup_rows(args.warmup_rows)
    from ctrkit.calibrate import downsampling_corrected

    rate = _downsampling_rate(args)
    if rate is not None:
        print(f"{args.run_dir} is not calibrated yet: exporting its model with the closed-form correction for "
              f"negatives kept at rate {rate:g} (calibration.downsampling_rate of its config)")
    try:
        with downsampling_corrected(model, rate):
            path = export_model(
                model,
                manifest,
                args.base_path,
                args.model_name,
                version=args.version,
                keep_versions=keep_versions,
                warmup_examples=warmup,
                validate=not args.no_validate,
            )
    except (ExportError, ValidationError, ValueError) as e:
        if args.debug:
            raise
        raise InputError(_name_warmup_line(str(e), args.warmup_rows, warmup_lines)) from e
    print(path)
    return 0


def _name_warmup_line(message: str, path: str | None, lines: list[int]) -> str:
    """``warmup_examples[i]: ...`` (the library's list index) → ``PATH line N: ...`` (the file's line)."""
    row = re.match(r"warmup_examples\[(\d+)\]: ", message)
    if row is None or path is None:
        return message
    return f"{path} line {lines[int(row.group(1))]}: {message[row.end():]}"


def _read_warmup_rows(path: str) -> tuple[list, list[int]]:
    """The JSON lines of ``--warmup-rows`` and the 1-based line number of each (blank lines skipped)."""
    from ctrkit.errors import InputError

    rows, lines = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path} line {number}: not a JSON object ({e})") from e
                    if not isinstance(row, dict):
                        raise InputError(f"{path} line {number}: expected a JSON object of raw features, got "
                                         f"{type(row).__name__}")
                    rows.append(row)
                    lines.append(number)
    except OSError as e:
        raise InputError(f"--warmup-rows {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise InputError(f"--warmup-rows {path}: not UTF-8 text ({e})") from e
    return rows, lines
