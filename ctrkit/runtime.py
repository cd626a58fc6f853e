"""Process-level TensorFlow settings that the ``ctrkit`` command applies before TensorFlow starts.

TensorFlow reads these from the environment once, when its runtime first allocates memory, so they only
work if set before that; the CLI sets them first thing (:func:`configure_process`). Library users who
drive :func:`ctrkit.trainer.train` from their own process set them themselves, before importing
TensorFlow. A value already in the environment always wins, so ``TF_CPU_ALLOCATOR_USE_BFC=false ctrkit
train ...`` opts out.

* ``TF_CPU_ALLOCATOR_USE_BFC=true``: TensorFlow's best-fit-with-coalescing allocator for CPU tensors,
  instead of plain ``malloc``. A training step allocates and frees tens of MB of activations and
  gradients; with ``malloc`` those blocks are ``mmap``-ed fresh every step, so each step pays page
  faults and kernel page zeroing (45 ms of system time per BARS step here). The BFC pool keeps and reuses
  them: the BARS step went from 323 to 277 ms on this 2-core machine (sys time 45.5 -> 4.0 ms per step;
  ``benchmarks/bench_trainer.py`` measures it against ``model.fit`` each way). Cost: memory freed by
  TensorFlow stays in the process's pool (peak RSS of the trainer benchmark 6.9 vs 6.7 GiB).
"""
from __future__ import annotations

import os

__all__ = ["TF_PROCESS_ENV", "configure_process"]

TF_PROCESS_ENV: dict[str, str] = {"TF_CPU_ALLOCATOR_USE_BFC": "true"}


def configure_process(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set the defaults of :data:`TF_PROCESS_ENV` that the environment does not already set.

    Returns the settings in effect. Call it before TensorFlow runs its first op (the CLI calls it before
    any command imports TensorFlow).
    """
    env = os.environ if environ is None else environ
    for key, value in TF_PROCESS_ENV.items():
        env.setdefault(key, value)
    return {key: env[key] for key in TF_PROCESS_ENV}
