"""Where a BARS training step's time goes: TensorFlow profiler op times, summed by op type.

    python3 benchmarks/profile_trainer_step.py                  # 39 x 100k-row tables, 10 steps
    python3 benchmarks/profile_trainer_step.py --serial         # one op at a time: op times add up to the step

It times the same compiled step as ``bench_trainer.py`` (the ctrkit trainer's ``make_train_step`` on the BARS
config, sparse Adam, batch 4096), under ``tf.profiler``, and prints per step: the step's wall time, the
matmul roofline time of the model's FLOPs at this machine's measured 4096x1024x1024 matmul rate, and the
time of each op type. By default TensorFlow runs independent ops concurrently (the cross and DNN branches,
the 39 tables' updates), so op times overlap and add up to more than the step; ``--serial`` sets
``TF_NUM_INTEROP_THREADS=1`` (one op at a time, each still using every core), where they add up to the step
and show what each kind of work costs. Not a test; a diagnostic for the trainer benchmark's numbers.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import statistics
import sys
import tempfile


def _op_type_ms(logdir: str, steps: int) -> tuple[dict[str, float], dict[str, int]]:
    """Milliseconds per step and calls per step of each op type, from the profiler's host trace."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise SystemExit(f"the profiler wrote no trace under {logdir}")
    space = xplane_pb2.XSpace()
    with open(paths[-1], "rb") as f:
        space.ParseFromString(f.read())
    ms: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):  # the executor's threads: one event per op run
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" in name and "::" not in name:  # "<op name>:<op type>"; "A::B" are the executor's own events
                    op_type = name.rsplit(":", 1)[1]
                    ms[op_type] += event.duration_ps / 1e9 / steps
                    calls[op_type] += 1
    return dict(ms), {k: v // steps for k, v in calls.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows per embedding table (default 100k)")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps (default 10)")
    parser.add_argument("--serial", action="store_true", help="run one op at a time (TF_NUM_INTEROP_THREADS=1)")
    parser.add_argument("--top", type=int, default=15, help="op types to list (default 15)")
    args = parser.parse_args(argv)
    if args.serial:
        os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")  # as the ctrkit command sets it
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tensorflow as tf

    import bench_trainer

    step_runner = bench_trainer.ctrkit_runner(args.rows, progressive=False)
    matmul = bench_trainer.matmul_runner()
    gflops = 2 * 4096 * 1024 * 1024 / statistics.median(matmul() for _ in range(3)) / 1e9
    step_ms = 1e3 * statistics.median(step_runner(bench_trainer.STEPS) / bench_trainer.STEPS for _ in range(5))
    with tempfile.TemporaryDirectory(prefix="ctrkit-profile-") as logdir:
        tf.profiler.experimental.start(logdir)
        step_runner(args.steps)
        tf.profiler.experimental.stop()
        ms, calls = _op_type_ms(logdir, args.steps)
    roofline_ms = 1e3 * bench_trainer.model_flops_per_example() * bench_trainer.BATCH / (gflops * 1e9)
    print(f"step (unprofiled, median of 5 x {bench_trainer.STEPS}): {step_ms:.1f} ms; matmul roofline of the "
          f"model's FLOPs at {gflops:.0f} GFLOP/s: {roofline_ms:.1f} ms")
    mode = "one op at a time" if args.serial else "concurrent ops, times overlap"
    print(f"op time per step while profiled ({mode}): {sum(ms.values()):.1f} ms in all")
    for op_type, t in sorted(ms.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {t:7.2f} ms  {calls[op_type]:4d} calls  {op_type}")


if __name__ == "__main__":
    main()
