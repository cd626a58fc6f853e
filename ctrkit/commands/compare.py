"""``ctrkit compare``: prediction difference between two runs on the same data."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="prediction difference (PD) between two runs' models on the same data",
        description="Scores DATA with the final models of RUN_A and RUN_B and reports the prediction "
        "difference PD = mean |p1 - p2| / ((p1 + p2) / 2), plus each model's AUC, log loss and calibration.",
    )
    p.add_argument("run_a", metavar="RUN_A", help="a finished `ctrkit train` run directory")
    p.add_argument("run_b", metavar="RUN_B", help="another run trained on data with the same vocabularies")
    p.add_argument("--data", required=True, help="pipeline output directory to score")
    p.add_argument("--windows", metavar="A:B", help="score a slice of the windows, e.g. --windows=-1: (default: all)")
    p.add_argument("--uncalibrated", action="store_true",
                   help="compare the models as trained, before any ctrkit calibrate (RUN/model_uncalibrated.keras)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ctrkit.commands._arguments import show_progress
    from ctrkit.commands._output import metric
    from ctrkit.compare import compare_runs
    from ctrkit.data import window_indices
    from ctrkit.manifest import Manifest

    windows = window_indices(Manifest.load(args.data), args.windows) if args.windows else None
    report = compare_runs(args.run_a, args.run_b, args.data, windows, uncalibrated=args.uncalibrated,
                          progress=show_progress(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['examples']} examples: PD {report['pd']:.5f}  mean |p1-p2| {report['mean_abs_diff']:.5f}")
    for name in ("a", "b"):
        m = report[name]
        print(f"  run {name.upper()}: AUC {metric(m['auc'])}  log loss {metric(m['logloss'])}  calibration {metric(m['calibration'])}")
    return 0
