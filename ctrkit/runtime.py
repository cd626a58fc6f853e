"""Process-level TensorFlow settings that the ``ctrkit`` command applies before TensorFlow starts.

TensorFlow reads these from the environment once, when its runtime first allocates memory, so they only
work if set before that; the CLI sets them first thing (:func:`configure_process`). Library users who
drive :func:`ctrkit.trainer.train` from their own process set them themselves, before importing
TensorFlow. A value already in the environment always wins, so ``TF_CPU_ALLOCATOR_USE_BFC=false ctrkit
train ...`` opts out.

* ``TF_CPU_ALLOCATOR_USE_BFC=true``: TensorFlow's best-fit-with-coalescing allocator for CPU tensors,
  instead of plain ``malloc``. A training step allocates and frees tens of MB of activations and
  gradients. Where ``malloc`` hands those blocks back to the kernel and ``mmap``-s them fresh, every step
  pays page faults and kernel page zeroing; the BFC pool keeps and reuses them. How much that is worth
  depends on the machine (``benchmarks/bench_trainer.py`` reports it as ``bfc_gain_ctrkit``):

  - on a 2-core AMD EPYC (AVX2) VM, system time per BARS step fell from 45.5 to 4.0 ms (one probe run;
    wall 323 -> 277 ms), but two trainer-benchmark runs there gave wall-clock gains of 1.11x and 0.96x;
  - on a 2-core Intel Xeon (AVX-512, AMX) VM, four alternating process pairs (median of 7 x 8 steps each)
    gave BFC/default step-time ratios of 1.02, 1.01, 0.97 and 1.03: no difference, and only 2-4 ms of
    system time per step either way. The reason: TensorFlow turns oneDNN on by default on such CPUs, and
    with oneDNN on its default CPU allocator is already oneDNN's pooling ``MklCPUAllocator``
    (``TF_ENABLE_ONEDNN_OPTS=0`` brings the plain one back).

  So the setting matters where TensorFlow's default CPU allocator is plain ``malloc`` (oneDNN off, e.g.
  AVX2-only CPUs) and is harmless elsewhere. Cost: memory freed by TensorFlow stays in the process's pool
  (peak RSS 6.9 vs 6.7 GiB on the AMD VM, for a benchmark worker that then held the 1k-, 100k- and 1M-row
  BARS models together).
"""
from __future__ import annotations

import os
from typing import Any

__all__ = ["TF_PROCESS_ENV", "configure_process", "exit_with_parent", "worker_env"]

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


PARENT_PID_ENV = "CTRKIT_PARENT_PID"


def worker_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a worker process that calls :func:`exit_with_parent`: ``env`` (default: this
    process's) plus this process's pid, and ``PYTHONSAFEPATH=1``.

    Workers start as ``python -m ctrkit...``, which puts the current directory first on ``sys.path``: a
    ``yaml.py`` or ``numpy.py`` lying in the directory a user runs ctrkit from (a shared log directory) ran
    inside the worker. ``PYTHONSAFEPATH`` (Python 3.11+) leaves it off, in the worker and in the processes it
    starts (Beam's)."""
    return {**(os.environ if env is None else env), PARENT_PID_ENV: str(os.getpid()), "PYTHONSAFEPATH": "1"}


def exit_with_parent() -> None:
    """First thing in a worker process started with :func:`worker_env`: it gets SIGTERM when its parent dies
    (Linux ``PR_SET_PDEATHSIG``), and exits at once if the parent is already gone. A worker whose parent was
    killed (``kill PID``, an OOM kill, a scheduler) otherwise ran on to the end, writing output nobody
    collects. Set here rather than in a ``preexec_fn``, which is unsafe in a parent running threads (as
    TensorFlow's are). Elsewhere than Linux, nothing."""
    import sys

    parent = os.environ.get(PARENT_PID_ENV)
    if not sys.platform.startswith("linux") or parent is None:
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before the line above took effect
        os._exit(143)


def import_tft() -> Any:
    """``import tensorflow_transform``, leaving ``tf.keras`` and the environment as they were.

    TFT sets ``TF_USE_LEGACY_KERAS=1`` when imported, and ``tf.keras``, resolved lazily on first use, then
    became Keras 2 for the rest of the process and in every process it started: after an export in a
    notebook, ``tf.keras.models.load_model`` could no longer read a Keras 3 model. With ``tf.keras`` resolved
    first, TFT uses the separate ``tf_keras`` package for itself (its ``keras_lib`` does so), and the variable
    is put back as it was. A process that imported TFT before keeps what that import did.
    """
    import sys

    if "tensorflow_transform" not in sys.modules:
        import tensorflow as tf

        before = os.environ.get("TF_USE_LEGACY_KERAS")
        getattr(tf.keras, "version", None)  # resolves the lazy tf.keras under the caller's own setting
        try:
            import tensorflow_transform  # noqa: F401
        finally:
            if before is None:
                os.environ.pop("TF_USE_LEGACY_KERAS", None)
            else:
                os.environ["TF_USE_LEGACY_KERAS"] = before
    return sys.modules["tensorflow_transform"]

