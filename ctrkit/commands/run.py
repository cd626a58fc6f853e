"""``ctrkit run``: the whole chain, from raw click logs to TF Serving versions and a report.

Stages: (1) data — the user's ``--input`` files, or a generated Criteo-shaped log with planted crosses and
drift; (2) the Beam/TFT pipeline; (3) a teacher trained online; (4) the DCN-V2 student trained online with
distillation from the teacher; (5) the same student without distillation, and (6) with another seed, for the
report's comparisons; (7) calibration fitted on the held-out last window(s) with the body frozen; (8) export of
the calibrated student as the newest TF Serving version; (9) ``report.html`` / ``report.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any

import numpy as np

from ctrkit.commands._arguments import positive_int, show_progress

DEFAULT_CONFIG = "quickstart"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run the whole chain: data → pipeline → teacher → distilled student → calibration → export → report",
        description="With no arguments: generates a Criteo-shaped click log (planted feature crosses, time "
        "drift, fixed seed), preprocesses it with the Beam pipeline, trains a teacher and a DCN-V2 student "
        "online with distillation, fits the calibration layer, exports TF Serving versions and writes "
        "RUN_DIR/report.html. With --config and --input it runs the same chain on your data.",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"config YAML file or built-in config name (default: {DEFAULT_CONFIG})")
    p.add_argument("--input", action="append", metavar="GLOB",
                   help="raw log files (repeatable; globs; .gz ok). Default: generate a synthetic log")
    p.add_argument("--run-dir", help="output directory (default: runs/<config name>-<timestamp>)")
    p.add_argument("--rows", type=positive_int, help=f"rows of the generated log (default: {_GENERATED['rows']})")
    p.add_argument("--days", type=positive_int, help=f"simulated days of the generated log (default: {_GENERATED['days']})")
    p.add_argument("--seed", type=int, help=f"seed of the generated log (default: {_GENERATED['seed']}; the models' "
                   "seed is train.seed in the config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (stage lines still print)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


_GENERATED = {"rows": 200_000, "days": 4, "seed": 0}  # the generated log's defaults


class _Stages:
    """Prints one line per stage with its index, and the time each took."""

    def __init__(self, total: int) -> None:
        self.total, self.index, self.t0, self.started = total, 0, time.perf_counter(), None
        self.seconds: dict[str, float] = {}
        self._name = ""

    def start(self, name: str, what: str) -> None:
        self.finish()
        self.index += 1
        self._name, self.started = name, time.perf_counter()
        print(f"[{self.index}/{self.total}] {what}", flush=True)

    def finish(self) -> None:
        if self.started is not None:
            took = time.perf_counter() - self.started
            self.seconds[self._name] = took
            print(f"      done in {took:.1f} s", flush=True)
            self.started = None


def _synthetic_input(run_dir: str, rows: int, days: int, seed: int) -> list[str]:
    from ctrkit import synthetic

    raw_dir = os.path.join(run_dir, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    table = synthetic.generate(rows, seed=seed, days=days, timestamp=True)
    return [synthetic.write_parquet(table, os.path.join(raw_dir, "clicks.parquet"))]


def _teacher_config(config: Any) -> Any:
    teacher_model = config.distill.teacher_model or config.model
    return dataclasses.replace(
        config,
        name=f"{config.name}-teacher",
        model=teacher_model,
        distill=config.distill.disabled(),
        # A .keras snapshot after every window: the student distills from the teacher as of the window before.
        export=dataclasses.replace(config.export, base_path=None, every_windows=1),
    )


def _window_label(window: Any) -> str:
    """'11-14 00:00' for timestamp windows (their start, UTC), the window's name otherwise."""
    if window.start:
        return f"{window.start[5:10]} {window.start[11:16]}"
    return window.name


def _curve(run_dir: str, labels: dict[str, str]) -> list[dict[str, Any]]:
    """Per-window progressive-validation metrics of a run, labelled for the plot."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return [{"window": labels.get(r["name"], r["name"]), **r["window"]} for r in records if r.get("type") == "window"]


def run(args: argparse.Namespace) -> int:
    from ctrkit.config import load_config
    from ctrkit.errors import InputError

    given = [f"--{k}" for k in _GENERATED if getattr(args, k) is not None]
    if args.input and given:  # they were ignored, silently
        raise InputError(f"{', '.join(given)} describe the generated log; with --input there is none")
    for k, default in _GENERATED.items():
        if getattr(args, k) is None:
            setattr(args, k, default)
    config = load_config(args.config)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.abspath(args.run_dir or os.path.join("runs", f"{config.name}-{stamp}"))
    if os.path.exists(run_dir) and os.listdir(run_dir):
        raise InputError(f"run directory {run_dir} exists and is not empty; choose another --run-dir")
    if args.input is None and config.data.format != "parquet":
        raise InputError(
            f"config {args.config!r} reads {config.data.format!r} input: pass --input FILES, or use a config "
            f"whose data section describes the generated log (e.g. the default, {DEFAULT_CONFIG})"
        )
    os.makedirs(run_dir, exist_ok=True)
    stages = _Stages(9)
    progress = show_progress(args)
    print(f"ctrkit run → {run_dir}", flush=True)

    # 1. data
    if args.input:
        stages.start("data", f"using {len(args.input)} input pattern(s): {', '.join(args.input)}")
        inputs = list(args.input)
    else:
        stages.start("data", f"generating {args.rows:,} Criteo-shaped rows over {args.days} simulated days "
                             f"(seed {args.seed})")
        inputs = _synthetic_input(run_dir, args.rows, args.days, args.seed)

    # 2. pipeline
    from ctrkit.pipelines import preprocess

    data_dir = os.path.join(run_dir, "data")
    stages.start("preprocess", "preprocessing with the Beam + tensorflow-transform pipeline")
    manifest = preprocess(config.data, inputs, data_dir)
    print(f"      {manifest.rows_read:,} rows read, {manifest.rows_written:,} written, "
          f"{manifest.rows_rejected:,} rejected (see {os.path.join(data_dir, manifest.rejected_path)}), "
          f"{manifest.rows_padded:,} short rows padded; "
          f"{len(manifest.windows)} windows", flush=True)
    holdout = config.calibration.holdout_windows if config.calibration.kind != "none" else 0
    if len(manifest.windows) <= holdout:
        raise InputError(f"{len(manifest.windows)} window(s) but calibration.holdout_windows is {holdout}: "
                         "need at least one window to train on")
    train_windows = list(range(len(manifest.windows) - holdout))
    holdout_windows = list(range(len(manifest.windows) - holdout, len(manifest.windows)))

    from ctrkit.trainer import train

    # 3. teacher
    teacher_dir = os.path.join(run_dir, "teacher")
    stages.start("teacher", f"training the teacher online on windows {train_windows[0]}..{train_windows[-1]}")
    teacher = train(_teacher_config(config), data_dir, teacher_dir, windows=train_windows, progress=progress)

    # 4. distilled student (exports TF Serving versions as it goes)
    from ctrkit.serving.export import make_export_fn

    base_path = config.export.base_path or os.path.join(run_dir, "serving")
    export_fn = make_export_fn(base_path, config.export.model_name, config.export.keep_versions,
                               downsampling_rate=config.calibration.downsampling_rate)
    # The teacher trained on the same windows, so its final model has seen every label: score window w with
    # its snapshot after window w-1 instead (the first window trains on clicks alone).
    student_cfg = dataclasses.replace(config, distill=dataclasses.replace(
        config.distill, enabled=True, teacher=teacher_dir, teacher_as_of="previous_window"))
    student_dir = os.path.join(run_dir, "student")
    stages.start("student", "training the DCN-V2 student online with distillation from the teacher")
    student = train(student_cfg, data_dir, student_dir, windows=train_windows, progress=progress, export_fn=export_fn)

    # 5. the same student without distillation
    # Only the student publishes TF Serving versions (its export_fn): the baseline and the second seed, trained
    # only to compare, would otherwise publish under the same model name and prune the student's versions.
    unpublished = dataclasses.replace(config.export, base_path=None)
    baseline_cfg = dataclasses.replace(config, distill=config.distill.disabled(), export=unpublished)
    baseline_dir = os.path.join(run_dir, "student_no_distillation")
    stages.start("baseline", "training the same student without distillation (for comparison)")
    baseline = train(baseline_cfg, data_dir, baseline_dir, windows=train_windows, progress=progress)

    # 6. another seed, for the prediction difference
    seed_cfg = dataclasses.replace(student_cfg, train=dataclasses.replace(config.train, seed=config.train.seed + 1),
                                   export=unpublished)
    seed_dir = os.path.join(run_dir, "student_seed2")
    stages.start("seed", "training the distilled student with another seed (reproducibility: PD)")
    train(seed_cfg, data_dir, seed_dir, windows=train_windows, progress=progress)
    from ctrkit.compare import compare_runs

    pd_result = compare_runs(student_dir, seed_dir, data_dir, windows=holdout_windows or None, progress=progress)

    # 7. calibration on held-out data, body frozen
    from ctrkit.calibrate import fit_calibration_scored, replace_run_model
    from ctrkit.commands._output import metric
    from ctrkit.report import ReliabilityCurve
    from ctrkit.trainer import load_run_model

    model = load_run_model(student_dir)
    reliability = {}
    calibration = None
    if holdout:
        stages.start("calibrate", f"fitting {config.calibration.kind} calibration on held-out window(s) {holdout_windows}")
        calibration, before, after = fit_calibration_scored(model, manifest, config.calibration, holdout_windows,
                                                                   progress=progress)
        # The "after" curve is in-sample: the layer was fitted on these examples. Bins under 50 rows are noise.
        reliability = {
            "before calibration": ReliabilityCurve.from_predictions(before["probabilities"], before["labels"], min_count=50),
            "after calibration (fitted on these rows)": ReliabilityCurve.from_predictions(
                after["probabilities"], after["labels"], min_count=50),
        }
        for when in ("before", "after"):
            r = calibration[when]
            print(f"      {when}: calibration ratio {metric(r['calibration'])}, ECE {metric(r['ece'])}", flush=True)
        replace_run_model(model, student_dir)  # so `ctrkit export RUN/student` exports it calibrated
    else:
        stages.start("calibrate", "no calibration configured (calibration.kind: none)")

    # 8. export the calibrated student as the newest version
    which = "the calibrated student" if holdout else "the student"
    stages.start("export", f"exporting {which} to {base_path}/{config.export.model_name}/")
    exported = export_fn(model, manifest, student.steps)
    print(f"      {exported}", flush=True)

    # 9. report
    stages.start("report", "writing the report")
    pd_on = f"held-out window(s) {holdout_windows}" if holdout else "all windows, which both trained on"
    paths = _write_run_report(run_dir, config, manifest, teacher, student, baseline, pd_result, calibration,
                              reliability, stages.seconds, exported, pd_on)
    stages.finish()
    print(f"report: {paths['html']}", flush=True)
    print(f"serve it: ctrkit serve {base_path} --model-name {config.export.model_name} --port 8501", flush=True)
    return 0


def _write_run_report(run_dir, config, manifest, teacher, student, baseline, pd_result, calibration, reliability,
                      seconds, exported, pd_on) -> dict[str, str]:
    from ctrkit.report import ReportData, write_report

    def final(m: dict[str, Any]) -> dict[str, float | None]:
        return {k: m[k] if m[k] is None else float(m[k]) for k in ("auc", "logloss", "ne", "calibration", "ece") if k in m}

    def size(run) -> dict[str, Any]:
        import keras

        model = keras.saving.load_model(run.model_path, compile=False)
        return {"parameters": int(sum(int(np.prod(w.shape)) for w in model.weights)),
                "file_mib": os.path.getsize(run.model_path) / 2**20}

    # Progressive validation pooled over the training windows (each batch scored before the model learned it,
    # early windows included): not the final model's quality, which the held-out rows show.
    final_metrics = {
        f"{name}, progressive (training windows)": final(result.metrics)
        for name, result in (("teacher", teacher), ("student (distilled)", student), ("student (no distillation)", baseline))
    }
    if calibration:
        final_metrics["student, held-out, before calibration"] = final(calibration["before"])
        # The calibration layer was fitted on these same examples (the student never trained on them).
        final_metrics["student, held-out, after calibration (fitted on them)"] = final(calibration["after"])
    throughput = {
        "pipeline": {"rows": manifest.rows_read, "seconds": seconds.get("preprocess", 0.0),
                     "rows_per_s": manifest.rows_read / max(seconds.get("preprocess", 1e-9), 1e-9)},
    }
    for name, result in (("teacher", teacher), ("student (distilled)", student), ("student (no distillation)", baseline)):
        throughput[f"train: {name}"] = {"rows": result.examples, "seconds": result.examples / max(result.examples_per_second, 1e-9),
                                        "rows_per_s": result.examples_per_second}
    data = ReportData(
        title=f"ctrkit run: {config.name}",
        curves={name: _curve(result.run_dir, {w.name: _window_label(w) for w in manifest.windows})
                for name, result in (("teacher", teacher), ("student (distilled)", student),
                                     ("student (no distillation)", baseline))},
        reliability=reliability,
        final_metrics=final_metrics,
        model_size={"teacher": size(teacher), "student": size(student)},
        throughput=throughput,
        prediction_difference={f"student seed A vs seed B ({pd_on})": pd_result["pd"]},
        notes=[
            f"data: {manifest.rows_read:,} rows read, {manifest.rows_written:,} written, {manifest.rows_rejected:,} "
            f"rejected, {len(manifest.windows)} windows",
            f"exported: {exported}",
            "progressive validation: every batch is scored before the model trains on it",
            "train throughput: the training loop's own time (checkpoints, exports and teacher loads excluded; "
            "the first window includes compiling the step)",
            "reliability diagram: bins with fewer than 50 rows are left out",
        ],
    )
    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"final_metrics": final_metrics, "pd": pd_result["pd"], "calibration": calibration,
                   "stage_seconds": seconds, "exported": exported}, f, indent=2, default=str)
    return write_report(run_dir, data)

