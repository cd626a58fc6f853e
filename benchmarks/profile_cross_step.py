"""What a low-rank Cross step costs against a full-rank one, and how much of that is the matmuls.

    python3 benchmarks/profile_cross_step.py            # d = 390, r = d/4, batch 4096
    python3 benchmarks/profile_cross_step.py --d 1024

Times, interleaved over several repeats (CPU seconds per step, medians): the whole ``Cross`` forward +
backward at full rank and at r = d/4 (as ``bench_layers.py`` does), and the bare matmuls of each step
without the layer's elementwise work: three d×d ones for full rank (forward, kernel gradient, input
gradient), six with an r-wide side for low rank. Low rank does half the FLOPs of full rank at r = d/4;
this shows how far the matmuls' rate at those narrower shapes, and the elementwise passes both ranks share,
move the cost ratio from 0.5. Not a test; a diagnostic for the layer benchmark's low-rank target.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=390, help="layer width (default 390)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (default 7)")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tensorflow as tf

    from bench_layers import BATCH, _forward_backward, _time  # the layer benchmark's own step and clocks
    from ctrkit.layers import Cross

    d, r = args.d, args.d // 4
    rng = np.random.default_rng(0)

    def const(*shape: int):
        return tf.constant(rng.normal(size=shape).astype("float32"))

    x0, upstream = const(BATCH, d), const(BATCH, d)

    def layer_step(projection_dim: int | None):
        layer = Cross(projection_dim=projection_dim)
        layer(x0)
        return _forward_backward(layer, x0, upstream)

    w, u, v, p, dp = const(d, d), const(d, r), const(r, d), const(BATCH, r), const(BATCH, r)

    @tf.function
    def full_matmuls():
        return [x0 @ w, tf.matmul(x0, upstream, transpose_a=True), tf.matmul(upstream, w, transpose_b=True)]

    @tf.function
    def low_rank_matmuls():
        return [x0 @ u, p @ v,  # forward: down, up
                tf.matmul(upstream, v, transpose_b=True), tf.matmul(p, upstream, transpose_a=True),  # up's grads
                tf.matmul(x0, dp, transpose_a=True), tf.matmul(dp, u, transpose_b=True)]  # down's grads

    steps = {"Cross full rank": layer_step(None), f"Cross r={r}": layer_step(r),
             "matmuls full rank": full_matmuls, f"matmuls r={r}": low_rank_matmuls}
    n = max(5, int(6e10 // (6 * BATCH * d * d)))
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(_time(step, n)[1])  # process CPU seconds per step
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, s in med.items():
        print(f"{name:>20}: {1e3 * s:7.2f} CPU ms per step")
    names = list(med)
    print(f"low rank / full rank: whole layer {med[names[1]] / med[names[0]]:.3f}, matmuls alone "
          f"{med[names[3]] / med[names[2]]:.3f} (FLOPs {2 * r / d:.3f})")
    for name in ("full rank", f"r={r}"):
        flops = 6 * BATCH * d * (d if name == "full rank" else 2 * r)
        print(f"matmuls {name}: {flops / med['matmuls ' + name] / 1e9:.0f} GFLOP per CPU-second")


if __name__ == "__main__":
    main()
