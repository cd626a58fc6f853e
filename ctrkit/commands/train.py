"""``ctrkit train``: online training over a pipeline output with progressive validation."""
from __future__ import annotations

import argparse
import sys

from ctrkit.commands._arguments import positive_int, show_progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model online over a pipeline output's windows, in time order",
        description="Replays each window of DATA once in time order. Every batch is scored before the "
        "model trains on it (progressive validation): per-window and cumulative AUC, log loss, normalized "
        "entropy, calibration ratio and ECE go to RUN/metrics.jsonl and TensorBoard (RUN/tensorboard). "
        "Checkpoints every train.checkpoint_every_steps steps; --resume continues a killed run exactly. One "
        "process at a time writes a run directory (RUN/.lock): a second train or calibrate on it is refused.",
    )
    p.add_argument("--config", required=True, help="config YAML file, or the name of a built-in config (e.g. small)")
    p.add_argument("--data", required=True, help="pipeline output directory (holds manifest.json)")
    p.add_argument("--run-dir", required=True, help="run directory to create (or to continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --run-dir (a run that stopped before its first "
                   "checkpoint starts over)")
    p.add_argument("--warm-start", metavar="RUN", help="start from the final weights and optimizer state of a finished RUN "
                   "(the next day's data, preprocessed with --transform-fn of RUN's data so the vocabularies match; "
                   "model settings that differ from RUN's are named in a warning)")
    p.add_argument("--windows", metavar="A:B", help="train on a slice of the windows, Python slice syntax (write --windows=:-1 when it starts with -; "
                   "default: all)")
    p.add_argument("--max-steps", type=positive_int, help="stop (resumably) after this many steps in total")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # For crash-recovery tests only: slows each step so a test can kill the process mid-run.
    p.add_argument("--sleep-per-step", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ctrkit.commands._output import metric
    from ctrkit.config import load_config
    from ctrkit.data import window_indices
    from ctrkit.manifest import Manifest
    from ctrkit.trainer import TrainingError, train

    config = load_config(args.config)
    manifest = Manifest.load(args.data)
    windows = window_indices(manifest, args.windows) if args.windows else None
    try:
        result = train(
            config,
            args.data,
            args.run_dir,
            resume=args.resume,
            warm_start=args.warm_start,
            windows=windows,
            progress=show_progress(args),
            step_delay=args.sleep_per_step,
            max_steps=args.max_steps,
        )
    except TrainingError as e:
        if args.debug:
            raise
        print(f"ctrkit train: error: {e}", file=sys.stderr)
        return 1
    m = result.metrics
    if result.already_finished:
        print(f"{result.run_dir} had already finished: nothing to resume")
    print(
        f"trained {result.examples} examples in {result.steps} steps -> {result.run_dir}\n"
        f"progressive validation: AUC {metric(m.get('auc'))}  log loss {metric(m.get('logloss'))}  "
        f"NE {metric(m.get('ne'))}  calibration {metric(m.get('calibration'))}  ECE {metric(m.get('ece'))}"
    )
    if not result.model_path:  # max_steps stopped it: the run looked finished, then `export` refused it
        # "--resume" alone with the same --max-steps stops at the same step again.
        again = "run it again with --resume and a larger --max-steps (or none) to continue"
        if args.max_steps is not None and result.steps > args.max_steps:
            print(f"the run was already at step {result.steps}, past --max-steps {args.max_steps}: nothing was "
                  f"trained; {again}")
        else:
            print(f"stopped at step {result.steps} by --max-steps, before the end of the data: checkpointed, no "
                  f"final model.keras yet; {again}")
    return 0
