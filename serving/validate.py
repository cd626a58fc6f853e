"""Checks every export passes before it is published.

1. ``saved_model_cli show --all`` (TensorFlow's own tool, run as a subprocess): the four signatures exist
   with the input keys, dtypes, shapes and method names TF Serving needs.
2. A fresh Python process that imports only TensorFlow (no tensorflow-transform, no Keras, no ctrkit
   model code) reloads the SavedModel twice and runs ``serving_default``, ``classify`` and ``regress`` on
   the warmup examples; the probabilities must equal the in-memory model's within ``atol``. Once with
   ``tf.saved_model.load`` (what ``ctrkit serve`` uses) and once into a TF1 session, which restores the
   variables through the MetaGraph's saver and runs its init op as TF Serving's C++ ``LoadSavedModel`` and
   ``saved_model_cli run`` do. The two can disagree: a SavedModel can load and score with the first and
   fail every request with the second ("Could not find variable").

Run as ``python -m ctrkit.serving.validate EXPORT_DIR CHECK.npz ATOL`` for step 2.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

from ctrkit.serving.signatures import (
    CLASSIFY,
    CLASSIFY_INPUTS_KEY,
    EXAMPLES_KEY,
    METHOD_NAMES,
    PREDICT_RAW,
    REGRESS,
    SERVING_DEFAULT,
)


class ValidationError(RuntimeError):
    """An export does not meet what TF Serving needs; it is not published."""


_SIG_RE = re.compile(r"^signature_def\['([^']+)'\]:\s*$")
_TENSOR_RE = re.compile(r"^\s*(inputs|outputs)\['([^']+)'\] tensor_info:\s*$")
_FIELD_RE = re.compile(r"^\s*(dtype|shape|name):\s*(.*)$")
_METHOD_RE = re.compile(r"^\s*Method name is:\s*(\S+)\s*$")


def parse_show_all(text: str) -> dict[str, dict[str, Any]]:
    """Parse ``saved_model_cli show --all`` into ``{signature: {"inputs": {key: {"dtype", "shape"}},
    "outputs": {...}, "method": str}}`` (the SignatureDef part; concrete functions are ignored)."""
    sigs: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    tensor: dict[str, str] | None = None
    for line in text.splitlines():
        if line.startswith("Concrete Functions:"):
            break
        if m := _SIG_RE.match(line):
            current = sigs.setdefault(m.group(1), {"inputs": {}, "outputs": {}, "method": None})
            tensor = None
        elif current is None:
            continue
        elif m := _TENSOR_RE.match(line):
            tensor = current[m.group(1)].setdefault(m.group(2), {})
        elif (m := _FIELD_RE.match(line)) and tensor is not None:
            tensor[m.group(1)] = m.group(2).strip()
        elif m := _METHOD_RE.match(line):
            current["method"] = m.group(1)
            tensor = None
    return sigs


def saved_model_cli_show(export_dir: str, timeout: float = 300) -> str:
    exe = shutil.which("saved_model_cli")
    cmd = [exe] if exe else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    proc = subprocess.run(
        cmd + ["show", "--all", "--dir", export_dir],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONSAFEPATH="1"),  # no module from the cwd: worker_env
    )  # subprocess.run kills it if this process is interrupted meanwhile
    if proc.returncode != 0:
        raise ValidationError(f"saved_model_cli show --all failed on {export_dir}: {proc.stderr[-2000:]}")
    return proc.stdout


def expected_signatures(raw_spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """What the SignatureDefs must say: inputs (dtype, shape), output keys and dtypes, method name."""
    import tensorflow as tf

    def dt(dtype: Any) -> str:
        from tensorflow.core.framework import types_pb2

        return types_pb2.DataType.Name(tf.as_dtype(dtype).as_datatype_enum)

    raw_inputs = {}
    for name, feat in raw_spec.items():
        shape = [-1] + (list(feat.shape) if isinstance(feat, tf.io.FixedLenFeature) else [])
        raw_inputs[name] = (dt(feat.dtype), "(" + ", ".join(map(str, shape)) + ")")
    predict_out = {"logits": ("DT_FLOAT", "(-1, 1)"), "probabilities": ("DT_FLOAT", "(-1, 1)")}
    return {
        SERVING_DEFAULT: {"inputs": {EXAMPLES_KEY: ("DT_STRING", "(-1)")}, "outputs": predict_out},
        PREDICT_RAW: {"inputs": raw_inputs, "outputs": predict_out},
        CLASSIFY: {
            "inputs": {CLASSIFY_INPUTS_KEY: ("DT_STRING", "(-1)")},
            "outputs": {"scores": ("DT_FLOAT", "(-1, 2)"), "classes": ("DT_STRING", "(-1, 2)")},
        },
        REGRESS: {"inputs": {CLASSIFY_INPUTS_KEY: ("DT_STRING", "(-1)")}, "outputs": {"outputs": ("DT_FLOAT", "(-1)")}},
    }


def check_signatures(shown: Mapping[str, Any], raw_spec: Mapping[str, Any]) -> None:
    """Raise :class:`ValidationError` listing every way ``shown`` differs from :func:`expected_signatures`."""
    problems = []
    for sig, want in expected_signatures(raw_spec).items():
        got = shown.get(sig)
        if got is None:
            problems.append(f"signature {sig!r} missing (have {sorted(shown)})")
            continue
        if got["method"] != METHOD_NAMES[sig]:
            problems.append(f"{sig}: method name {got['method']!r}, TF Serving needs {METHOD_NAMES[sig]!r}")
        for side in ("inputs", "outputs"):
            if set(got[side]) != set(want[side]):
                problems.append(f"{sig}: {side} {sorted(got[side])}, expected {sorted(want[side])}")
                continue
            for key, (dtype, shape) in want[side].items():
                t = got[side][key]
                if (t.get("dtype"), t.get("shape")) != (dtype, shape):
                    problems.append(f"{sig}: {side}[{key!r}] is {t.get('dtype')} {t.get('shape')}, expected {dtype} {shape}")
    if problems:
        raise ValidationError("export fails TF Serving's needs:\n  " + "\n  ".join(problems))


def start_reload_check(export_dir: str, examples: list[bytes], probabilities: Any, atol: float = 1e-5) -> tuple[subprocess.Popen, str]:
    """Start the fresh-process reload check (see module doc); finish with :func:`finish_reload_check`."""
    import numpy as np

    tmp = tempfile.mkdtemp(prefix="ctrkit-validate-")
    check = os.path.join(tmp, "check.npz")
    np.savez(check, examples=np.array(examples, dtype=object), probabilities=np.asarray(probabilities, np.float32))
    from ctrkit.runtime import worker_env

    proc = subprocess.Popen(
        [sys.executable, "-m", "ctrkit.serving.validate", export_dir, check, repr(atol)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")),
    )
    return proc, tmp


def finish_reload_check(proc: subprocess.Popen, tmp: str, timeout: float = 300) -> None:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise ValidationError(f"reload check did not finish within {timeout} s") from None
    except BaseException:  # interrupted: the check process must not run on alone
        proc.kill()
        proc.communicate()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode != 0:
        lines = [l for l in (out + err).splitlines() if l.startswith("ctrkit-validate:")]
        detail = "\n".join(lines) or (out + err)[-3000:]
        raise ValidationError(f"reloading the export in a fresh process failed:\n{detail}")


def validate_export(export_dir: str, raw_spec: Mapping[str, Any], examples: list[bytes], probabilities: Any, atol: float = 1e-5) -> None:
    """Both checks; the reload process runs while ``saved_model_cli`` does (two cold TF imports)."""
    proc, tmp = start_reload_check(export_dir, examples, probabilities, atol)
    try:
        check_signatures(parse_show_all(saved_model_cli_show(export_dir)), raw_spec)
    except BaseException:
        proc.kill()
        finish_reload_check_quietly(proc, tmp)
        raise
    finish_reload_check(proc, tmp)


def finish_reload_check_quietly(proc: subprocess.Popen, tmp: str) -> None:
    proc.communicate()
    shutil.rmtree(tmp, ignore_errors=True)


# The signatures the reload check runs on the warmup examples, with the input key each is fed by.
_CHECKED_INPUTS = {SERVING_DEFAULT: EXAMPLES_KEY, CLASSIFY: CLASSIFY_INPUTS_KEY, REGRESS: CLASSIFY_INPUTS_KEY}


def _reload_and_compare(export_dir: str, check_path: str, atol: float) -> int:
    import numpy as np
    import tensorflow as tf

    data = np.load(check_path, allow_pickle=True)
    examples = tf.constant(list(data["examples"]), dtype=tf.string)
    want = data["probabilities"].reshape(-1)
    loaded = tf.saved_model.load(export_dir)
    sigs = loaded.signatures
    outputs = {"": {name: {k: t.numpy() for k, t in sigs[name](**{key: examples}).items()}
                    for name, key in _CHECKED_INPUTS.items()}}
    failures = []
    try:
        outputs[" in a TF1 session (TF Serving's loader)"] = _session_outputs(export_dir, data["examples"])
    except tf.errors.OpError as e:
        failures.append(f"ctrkit-validate: loaded into a TF1 session as TF Serving loads it, the signatures fail: "
                        f"{first_cause(e.message)}")
    for where, out in outputs.items():
        scores = out[CLASSIFY]["scores"]
        for what, values in (("serving_default", out[SERVING_DEFAULT]["probabilities"]),
                             ("classify scores[:, 1]", scores[:, 1]), ("regress", out[REGRESS]["outputs"])):
            values = values.reshape(-1)
            if values.shape != want.shape:
                failures.append(f"ctrkit-validate: {what}{where} gives {values.shape[0]} values for {want.shape[0]} "
                                "examples")
                continue
            diff = float(np.max(np.abs(values - want))) if len(want) else 0.0
            if diff > atol:
                failures.append(f"ctrkit-validate: {what}{where} differs from the in-memory model by {diff:.3g} "
                                f"(atol {atol})")
        if not np.allclose(scores.sum(axis=1), 1.0, atol=1e-6):
            failures.append(f"ctrkit-validate: classify scores{where} do not sum to 1")
    for f in failures:
        print(f, file=sys.stderr)
    return 1 if failures else 0


def first_cause(message: str) -> str:
    """The line of a TF error message that says what failed ("Graph execution error:" comes first)."""
    lines = [ln.strip() for ln in message.splitlines()]
    causes = [ln for ln in lines if ln and not ln.endswith("error:") and not ln.startswith(("[[", "Detected at node"))]
    return (causes or lines or [""])[0][:300]


class TFServingSession:
    """A SavedModel loaded into a TF1 session the way TF Serving's C++ ``LoadSavedModel`` loads it (the
    MetaGraph's saver restores the variables, then its init op runs), with :meth:`run` calling a signature by
    its tensor names. Use as a context manager."""

    def __init__(self, export_dir: str):
        import tensorflow as tf

        self._graph = tf.Graph()
        self._session = tf.compat.v1.Session(graph=self._graph)
        from tensorflow.python.util import deprecation

        # silence(): the TF1 loader is deprecated for TF2 code, but it is the path TF Serving takes.
        with self._graph.as_default(), deprecation.silence():
            meta_graph = tf.compat.v1.saved_model.loader.load(self._session, [tf.saved_model.SERVING], export_dir)
        self.signature_defs = meta_graph.signature_def

    def run(self, signature: str, inputs: Mapping[str, Any], skip_outputs: tuple[str, ...] = ()) -> dict[str, Any]:
        sig = self.signature_defs[signature]
        fetches = {k: v.name for k, v in sig.outputs.items() if k not in skip_outputs}
        return self._session.run(fetches, {sig.inputs[k].name: v for k, v in inputs.items()})

    def __enter__(self) -> TFServingSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._session.close()


def _session_outputs(export_dir: str, examples: Any) -> dict[str, dict[str, Any]]:
    """Every checked signature's outputs on ``examples``, run in a :class:`TFServingSession`; then every
    warmup request in the same session, as TF Serving replays them at load (``predict_raw`` and the other
    batch sizes included). ``ctrkit serve`` skips its own replay in a TF1 session for versions whose export
    ran this with the same TensorFlow, so this must cover everything that replay did."""
    from ctrkit.serving.warmup import WARMUP_DIR, WARMUP_FILE, read_warmup, request_inputs

    with TFServingSession(export_dir) as session:
        outputs = {name: session.run(name, {key: list(examples)}, skip_outputs=("classes",))
                   for name, key in _CHECKED_INPUTS.items()}
        if os.path.exists(os.path.join(export_dir, WARMUP_DIR, WARMUP_FILE)):
            for record in read_warmup(export_dir):
                session.run(*request_inputs(record))
        return outputs


if __name__ == "__main__":
    from ctrkit.runtime import exit_with_parent

    exit_with_parent()
    code = _reload_and_compare(sys.argv[1], sys.argv[2], float(sys.argv[3]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
