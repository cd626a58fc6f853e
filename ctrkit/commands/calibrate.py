"""``ctrkit calibrate``: fit a run's calibration layer on a held-out stream, base model frozen."""
from __future__ import annotations

import argparse
import json
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit the calibration layer of a trained run on held-out data (body frozen)",
        description="Scores the held-out windows of DATA (default: the last calibration.holdout_windows) "
        "with RUN's model, fits only its calibration layer (or applies the closed-form negative-downsampling "
        "correction with --downsampling-rate), and replaces RUN/model.keras; the uncalibrated model is kept as "
        "RUN/model_uncalibrated.keras and the before/after report written to RUN/calibration.json.",
    )
    p.add_argument("run_dir", metavar="RUN", help="a finished `ctrkit train` run directory")
    p.add_argument("--data", required=True, help="pipeline output directory holding the held-out stream")
    p.add_argument("--windows", metavar="A:B", help="held-out windows, e.g. --windows=-1: (default: the last calibration.holdout_windows)")
    p.add_argument("--downsampling-rate", type=float, metavar="RATE",
                   help="apply the closed-form correction for negatives kept at RATE, in (0, 1], instead of fitting "
                   "(calibration.kind temperature or bias; default: calibration.downsampling_rate of RUN's config, "
                   "if set)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    from ctrkit.calibrate import fit_calibration, replace_run_model, windows_trained_on
    from ctrkit.commands._arguments import show_progress
    from ctrkit.commands._output import metric
    from ctrkit.data import window_indices
    from ctrkit.errors import CtrkitWarning
    from ctrkit.manifest import Manifest
    from ctrkit.trainer import (check_model_fits_data, load_run_model, read_run_config, read_run_info, run_dir_lock,
                                vocabulary_fingerprint)

    read_run_info(args.run_dir)  # "not a ctrkit run directory", before its config.yaml is missed
    config = read_run_config(args.run_dir)
    cal = config.calibration
    if args.downsampling_rate is not None:
        from ctrkit.configio import ConfigError

        try:
            # The closed-form correction fits nothing: the fit's own settings in the run's config do not apply.
            cal = cal.closed_form(args.downsampling_rate)
        except ConfigError as e:
            raise ConfigError(
                f"--downsampling-rate {args.downsampling_rate} does not fit the calibration section of "
                f"{args.run_dir}/config.yaml ({e})"
            ) from None
    manifest = Manifest.load(args.data)
    n = len(manifest.windows)
    windows = window_indices(manifest, args.windows or f"{max(0, n - cal.holdout_windows)}:")
    with run_dir_lock(os.path.abspath(args.run_dir), "ctrkit calibrate"):  # not while it trains
        model = load_run_model(args.run_dir)
        # As train --warm-start and compare refuse: with other vocabularies the fit would run on ids that
        # read other tokens' embedding rows, and the model would be replaced by its calibrated copy.
        check_model_fits_data("ctrkit calibrate:", args.run_dir, model, manifest, vocabulary_fingerprint(manifest),
                              "Calibrate on data preprocessed with that run's transform (ctrkit preprocess ... "
                              "--transform-fn).")
        seen = windows_trained_on(args.run_dir, args.data, manifest, windows)
        if seen:
            warnings.warn(f"{args.run_dir} trained on window(s) {', '.join(seen)} of {args.data}: they are not held "
                          "out, so the calibration is fitted and measured on examples the model has learned from, "
                          "where it reads better calibrated than on new data. Keep the last windows out of training "
                          f"(ctrkit train --windows=:-{cal.holdout_windows}) or calibrate on later data.", CtrkitWarning,
                          stacklevel=2)
        report = fit_calibration(model, manifest, cal, windows, progress=show_progress(args))
        report["windows"] = [manifest.windows[i].name for i in windows]
        final = replace_run_model(model, args.run_dir)
        with open(os.path.join(args.run_dir, "calibration.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    b, a = report["before"], report["after"]
    held = "trained on, not held out" if seen else "held out"
    lines = [f"{report['method']}, on {report['examples']} examples of window(s) {', '.join(report['windows'])} "
             f"({held}); before -> after, on those same examples:",
             f"  calibration ratio {metric(b['calibration'])} -> {metric(a['calibration'])}   ECE {metric(b['ece'])} -> "
             f"{metric(a['ece'])}"]
    if "calibration_if_held_out_downsampled" in a:
        lines.append(f"  if these held-out windows were downsampled like the training data (they then read low after "
                     f"the correction), with their negatives weighted 1/{cal.downsampling_rate:g}: calibration ratio "
                     f"{metric(b['calibration_if_held_out_downsampled'])} -> "
                     f"{metric(a['calibration_if_held_out_downsampled'])}")
    lines.append(f"  model written to {final}")
    print("\n".join(lines))
    return 0
