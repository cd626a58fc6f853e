"""The layers on Keras' other backends (JAX, and PyTorch where installed), each in its own process.

The layer library is written in ``keras.ops``; these checks run what a JAX or PyTorch user does and what
went wrong there: ids out of range under ``jax.jit`` (Keras' default on JAX) gave NaN rows that turned
every weight into NaN after one step, or wrapped ``-1`` around to the last row (now clamped, or refused
with ``check_ids_in_jit=True``); a subclassed model
reloaded from ``.keras`` kept fresh weights after ``FeatureEmbedding``; building ``CrossNetwork``, ``DCN``
or ``DistillationHead`` imported TensorFlow (~3 s, ~465 MB).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, os, sys, warnings
    import numpy as np
    import keras
    from ctrkit import layers as L

    report = {"backend": keras.backend.backend()}
    L.Cross(); L.CrossMixture(); L.CrossNetwork(num_layers=2); L.DCN(dnn_units=(4,)); L.DistillationHead()
    L.FeatureEmbedding({"c": 5}, 2); L.BiasCalibration(3)
    report["tensorflow_imported"] = "tensorflow" in sys.modules

    # Formula: x1 = x0 * (U (V x0) + b) + x0 against NumPy, through the backend's ops.
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(4, 6)).astype("float32")
    cross = L.Cross(projection_dim=2)
    y = keras.ops.convert_to_numpy(cross(x0))
    v, u, b = [np.asarray(w) for w in cross.get_weights()]
    report["cross_error"] = float(np.abs(y - (x0 * ((x0 @ v) @ u + b) + x0)).max())

    def model(check):
        ids = keras.Input((), dtype="int32", name="c")
        seg = keras.Input((), dtype="int32", name="s")
        x = L.FeatureEmbedding({"c": 5}, 3, check_ids_in_jit=check)({"c": ids})
        logit = keras.layers.Dense(1)(L.CrossNetwork(num_layers=1)(x))
        return keras.Model({"c": ids, "s": seg}, L.BiasCalibration(3, check_ids_in_jit=check)(logit, seg))

    ok = {"c": rng.integers(0, 5, 64).astype("int32"), "s": rng.integers(0, 3, 64).astype("int32")}
    y01 = rng.integers(0, 2, (64, 1)).astype("float32")
    report["bad_ids"] = {}
    for check in (False, True):
        for case, batch in {"id past the table": {**ok, "c": np.where(np.arange(64) == 13, 5, ok["c"])},
                            "id -1": {**ok, "c": np.where(np.arange(64) == 7, -1, ok["c"])},
                            "segment past the end": {**ok, "s": np.where(np.arange(64) == 9, 3, ok["s"])}}.items():
            keras.utils.set_random_seed(1)
            m = model(check)
            m.compile(optimizer="adam", loss=keras.losses.BinaryCrossentropy(from_logits=True))  # jit "auto"
            try:  # JAX dispatches asynchronously: the error may surface when the weights are read
                m.fit(batch, y01, batch_size=64, epochs=1, verbose=0, shuffle=False)
                finite, message = all(np.isfinite(np.asarray(w)).all() for w in m.get_weights()), None
            except Exception as e:
                finite, message = None, str(e)
            report["bad_ids"][f"{case}, check_ids_in_jit={check}"] = {"message": message and message[-2000:],
                                                                      "weights_finite": finite}

    # model.export (jax2tf on JAX) of the default layers serves what predict returns.
    m = model(False)
    export_dir = os.path.join(sys.argv[1], "export")
    report["export_error"] = "not tried"
    if report["backend"] == "jax":
        try:
            m.export(export_dir, format="tf_saved_model", verbose=False)
            import tensorflow as tf
            loaded = tf.saved_model.load(export_dir)  # kept: its variables go with it
            served = loaded.serve({k: tf.constant(v) for k, v in ok.items()})
            report["export_error"] = float(np.abs(np.asarray(served) - m.predict(ok, verbose=0)).max())
        except Exception as e:
            report["export_error"] = repr(e)[:1000]

    @keras.saving.register_keras_serializable(package="backend_check")
    class Sub(keras.Model):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.emb = L.FeatureEmbedding({"c": 7}, embedding_dim=3, numeric_features=["n"])
            self.cross = L.CrossNetwork(num_layers=2, kind="mixture", num_experts=2, low_rank=2)
            self.head = keras.layers.Dense(1)

        def call(self, x):
            return self.head(self.cross(self.emb(x)))

    x = {"c": np.array([1, 2, 3, 6], "int32"), "n": np.array([0.1, 0.2, 0.3, 0.4], "float32")}
    sub = Sub()
    sub.compile(optimizer="adam", loss="mse")
    sub.fit(x, np.ones((4, 1)), verbose=0)
    path = os.path.join(sys.argv[1], "sub.keras")
    sub.save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = keras.saving.load_model(path)
    report["reload_error"] = float(np.abs(sub.predict(x, verbose=0) - again.predict(x, verbose=0)).max())
    report["reload_warnings"] = [str(w.message)[:200] for w in caught if "cannot be built" in str(w.message)]
    print("REPORT " + json.dumps(report))
''')


def _python_with(backend: str) -> str | None:
    """An interpreter that imports ``backend``: this one, or ``$CTRKIT_BACKENDS_PYTHON``.

    Not this one by default: with JAX installed, ``import tensorflow`` imports it too (``tf.lite``), which
    added ~0.5 s to every TensorFlow process and ~130 MiB to each one's memory, benchmarks included. CI
    (``.ci/run``) installs JAX into a venv on top of the test environment and points the variable at it.
    """
    if importlib.util.find_spec(backend) is not None:
        return sys.executable
    other = os.environ.get("CTRKIT_BACKENDS_PYTHON")
    if not other:
        return None
    if subprocess.run([other, "-c", "import ctrkit.layers"], capture_output=True).returncode != 0:
        pytest.fail(f"$CTRKIT_BACKENDS_PYTHON={other} cannot import ctrkit.layers")  # a broken venv, not a skip
    if subprocess.run([other, "-c", f"import {backend}"], capture_output=True).returncode == 0:
        return other
    return None


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_layers_on_another_keras_backend(backend, tmp_path):
    python = _python_with(backend)
    if python is None:
        pytest.skip(f"{backend} is not installed here or in $CTRKIT_BACKENDS_PYTHON")
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([python, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert report["backend"] == backend
    assert report["cross_error"] < 1e-5
    if backend == "jax":  # Keras' torch backend imports TensorFlow itself (through torch._dynamo)
        assert not report["tensorflow_imported"]
    expected = {"id past the table": r"feature 'c' has id 5 in row 13, outside \[0, 5\)",
                "id -1": r"feature 'c' has id -1 in row 7, outside \[0, 5\)",
                "segment past the end": r"segment id 3 in row 9 is outside \[0, 3\)"}
    import re

    for case, pattern in expected.items():
        checked = report["bad_ids"][f"{case}, check_ids_in_jit=True"]
        assert checked["message"] and re.search(pattern, checked["message"]), (case, checked)
        default = report["bad_ids"][f"{case}, check_ids_in_jit=False"]
        if backend == "jax":  # unchecked under jax.jit: clamped, not a NaN row that poisons every weight
            assert default == {"message": None, "weights_finite": True}, (case, default)
        else:  # PyTorch's compiled step breaks the graph for the check: refused either way
            assert default["message"] and re.search(pattern, default["message"]), (case, default)
    if backend == "jax":  # a host callback in the program stopped jax2tf ("std::bad_cast")
        assert isinstance(report["export_error"], float) and report["export_error"] < 1e-5, report["export_error"]
    assert report["reload_error"] < 1e-6 and not report["reload_warnings"]
