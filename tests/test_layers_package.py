"""ctrkit.layers stays a pure Keras 3 package: no other ctrkit module, no tf.keras, no Beam/TFT."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

LAYERS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "layers")


def imported_modules(path: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_layers_import_only_keras_numpy_and_themselves():
    allowed_roots = {"__future__", "typing", "keras", "numpy", "tensorflow", "jax", "math", "numbers", "operator"}
    sources = [f for f in os.listdir(LAYERS_DIR) if f.endswith(".py")]
    assert "cross.py" in sources
    for name in sources:
        for module in imported_modules(os.path.join(LAYERS_DIR, name)):
            root = module.split(".")[0]
            assert module.startswith("ctrkit.layers") or root in allowed_roots, f"layers/{name} imports {module}"
        text = open(os.path.join(LAYERS_DIR, name), encoding="utf-8").read()
        assert "tf.keras" not in text, f"layers/{name} mentions tf.keras (Keras 2 under TFT); use `import keras`"


def _fresh_user_env() -> dict[str, str]:
    # Importing tensorflow_transform (earlier tests in this process do) sets TF_USE_LEGACY_KERAS=1 in
    # os.environ; a user's fresh process does not have it, and with it TensorFlow itself loads tf_keras.
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


def test_importing_layers_pulls_in_no_beam_or_tft():
    code = ("import sys, ctrkit.layers; bad = [m for m in ('apache_beam', 'tensorflow_transform', 'tf_keras') "
            "if m in sys.modules]; print('BAD', bad) if bad else print('CLEAN')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=_fresh_user_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("CLEAN"), proc.stdout
