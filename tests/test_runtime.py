"""The CLI switches TensorFlow to its BFC CPU allocator before TensorFlow starts, unless told otherwise."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ctrkit.runtime import TF_PROCESS_ENV, configure_process

# A fresh process goes through the CLI entry point, then starts TensorFlow and asks its CPU allocator for
# statistics, which the BFC allocator keeps and the plain default allocator does not (ValueError). With oneDNN
# on (TensorFlow's default on CPUs with AVX-512 VNNI/BF16 or AMX) the default is oneDNN's own pooling
# allocator, which keeps statistics too, so the probe turns oneDNN off to see the plain default on any CPU.
PROBE = textwrap.dedent(
    """
    from ctrkit import cli
    try:
        cli.main(["--version"])
    except SystemExit:
        pass
    import tensorflow as tf
    tf.ones([256, 256])
    try:
        print("BFC", tf.config.experimental.get_memory_info("CPU:0")["peak"] > 0)
    except ValueError:
        print("DEFAULT")
    """
)


def _probe(extra_env: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in TF_PROCESS_ENV}
    env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_configure_process_sets_defaults_but_keeps_what_the_user_set() -> None:
    env: dict[str, str] = {}
    assert configure_process(env) == {"TF_CPU_ALLOCATOR_USE_BFC": "true"}
    env = {"TF_CPU_ALLOCATOR_USE_BFC": "false"}
    assert configure_process(env) == {"TF_CPU_ALLOCATOR_USE_BFC": "false"}


@pytest.mark.parametrize("user_setting, expected", [({}, "BFC True"), ({"TF_CPU_ALLOCATOR_USE_BFC": "false"}, "DEFAULT")])
def test_cli_entry_point_configures_tensorflow_before_it_starts(user_setting, expected) -> None:
    assert _probe(user_setting) == expected


def test_workers_do_not_import_modules_from_the_current_directory(tmp_path) -> None:
    """Workers start as `python -m ...`, which puts the cwd first on sys.path (as `-c` does): a planted
    yaml.py in the directory ctrkit was run from ran inside the preprocess and export-validation workers."""
    from ctrkit.runtime import worker_env

    (tmp_path / "yaml.py").write_text("open('HIJACKED', 'w').close()\n")
    probe = [sys.executable, "-c", "import yaml"]
    proc = subprocess.run(probe, cwd=tmp_path, env=worker_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "HIJACKED").exists()
    # Without the worker environment the planted module runs: the probe can tell the difference.
    unsafe = {k: v for k, v in worker_env().items() if k != "PYTHONSAFEPATH"}
    subprocess.run(probe, cwd=tmp_path, env=unsafe, capture_output=True, timeout=60)
    assert (tmp_path / "HIJACKED").exists()


def test_ctrkit_imports_tft_without_turning_tf_keras_into_keras_2() -> None:
    """TFT sets TF_USE_LEGACY_KERAS=1 when imported: after an export or an in-process pipeline, tf.keras was
    Keras 2 for the rest of a notebook session (a Keras 3 model no longer loaded) and in its subprocesses."""
    code = textwrap.dedent("""
        import os
        from ctrkit.pipelines.transform import tensor_adapter_config
        from ctrkit.schema import DataConfig
        tensor_adapter_config(DataConfig())  # imports tensorflow_transform
        import sys, tensorflow as tf
        assert "tensorflow_transform" in sys.modules
        print(tf.keras.version(), os.environ.get("TF_USE_LEGACY_KERAS"))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version, variable = proc.stdout.split()[-2:]
    assert version.startswith("3.") and variable == "None", proc.stdout
