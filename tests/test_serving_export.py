"""SavedModel export with the TFT graph inside: signatures, fidelity, missing/unseen values, warmup, versions.

Uses a real (tiny) tensorflow-transform pipeline output and ctrkit's own DCN-V2 model
(:mod:`ctrkit.serving.testing`); both are built once per test process.
"""
from __future__ import annotations

import os
import re
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def shown(exported):
    """``saved_model_cli show --all`` of the export, parsed."""
    from ctrkit.serving.validate import parse_show_all, saved_model_cli_show

    return parse_show_all(saved_model_cli_show(exported["path"]))


def _serialize(rows, spec):
    from ctrkit.serving.warmup import serialize_rows

    return tf.constant(serialize_rows(rows, spec))


def _reference_probabilities(exported, rows, spec):
    """In-memory path, independent of the export: TFT's own transform of the parsed rows → Keras model."""
    import tensorflow_transform as tft

    parsed = tf.io.parse_example(_serialize(rows, spec), spec)
    transformed = tft.TFTransformOutput(exported["pipeline"]).transform_raw_features(parsed)
    feats = {}
    for f in exported["manifest"].features:
        t = transformed[f.name]
        feats[f.name] = tf.sparse.to_dense(t, default_value=-1) if isinstance(t, tf.SparseTensor) else t
    return exported["model"](feats, training=False)["probabilities"].numpy().reshape(-1)


def test_layout_and_saved_model_cli_signatures(exported, shown):
    from ctrkit.serving import versions

    model_dir = os.path.dirname(exported["path"])
    assert versions.list_versions(model_dir) == [int(os.path.basename(exported["path"]))]
    assert not [d for d in os.listdir(model_dir) if not d.isdigit()], "staging directories left behind"
    sd = shown["serving_default"]
    assert sd["inputs"]["examples"]["dtype"] == "DT_STRING" and sd["inputs"]["examples"]["shape"] == "(-1)"
    assert {k: v["shape"] for k, v in sd["outputs"].items()} == {"logits": "(-1, 1)", "probabilities": "(-1, 1)"}
    assert sd["method"] == "tensorflow/serving/predict"
    assert shown["classify"]["method"] == "tensorflow/serving/classify"
    assert set(shown["classify"]["inputs"]) == {"inputs"}
    assert shown["classify"]["outputs"]["classes"]["dtype"] == "DT_STRING"
    assert shown["classify"]["outputs"]["scores"]["dtype"] == "DT_FLOAT"
    assert shown["regress"]["method"] == "tensorflow/serving/regress"
    assert set(shown["regress"]["outputs"]) == {"outputs"}
    raw = shown["predict_raw"]["inputs"]
    label = exported["manifest"].label
    assert label not in raw  # clients never send the label
    assert raw["I1"]["dtype"] == "DT_FLOAT" and raw["C1"]["dtype"] == "DT_STRING"
    assert all(t["shape"] == "(-1)" for t in raw.values())  # batch-major, one value per row


def test_check_signatures_rejects_wrong_method_name(shown, serving_spec):
    import copy

    from ctrkit.serving.validate import ValidationError, check_signatures

    shown = copy.deepcopy(shown)
    check_signatures(shown, serving_spec)  # the real export passes
    shown["classify"]["method"] = "tensorflow/serving/predict"
    del shown["regress"]
    with pytest.raises(ValidationError, match="classify: method name.*\n.*regress"):
        check_signatures(shown, serving_spec)


def test_reloaded_export_matches_in_memory_model(exported, loaded, serving_spec):
    """Reloaded SavedModel vs TFT's own transform + the Keras model in memory (1e-5). The export itself
    already passed the same comparison in a fresh process (export_model's validation, tested below)."""
    rows = exported["rows"][:100]
    want = _reference_probabilities(exported, rows, serving_spec)
    got = loaded.signatures["serving_default"](examples=_serialize(rows, serving_spec))["probabilities"]
    got = got.numpy().reshape(-1)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.std(got) > 1e-3  # the rows do not all score alike: the comparison means something


def test_export_scores_like_the_model_on_the_pipelines_own_records(exported, loaded, serving_spec):
    """Beam's transform of the training rows → model, vs raw rows → export: same multiset of scores."""
    m = exported["manifest"]
    ds = tf.data.TFRecordDataset(m.shard_paths(m.windows[0]), compression_type="GZIP").batch(1000)
    parsed = tf.io.parse_example(next(iter(ds)), m.transformed_feature_spec(include_label=False))
    feats = {
        k: tf.sparse.to_dense(v, default_value=-1) if isinstance(v, tf.SparseTensor) else v for k, v in parsed.items()
    }
    from_records = np.sort(exported["model"](feats, training=False)["probabilities"].numpy().ravel())
    rows = exported["rows"]
    served = loaded.signatures["serving_default"](examples=_serialize(rows, serving_spec))["probabilities"]
    assert len(from_records) == len(rows)
    np.testing.assert_allclose(np.sort(served.numpy().ravel()), from_records, atol=1e-5, rtol=0)


def test_missing_features_and_unseen_categories_score(loaded, serving_spec):
    fn = loaded.signatures["serving_default"]
    base = {"I1": 3.0, "I2": 10.0, "I3": 1.0, "C1": "c1_1", "C2": "c2_2", "C3": "c3_3", "tags": "t1|t2"}
    rows = [
        {},  # every feature missing
        {"I1": 3.0},  # most missing
        {**base, "C1": "never-seen-A", "C2": "never-seen-X"},
        {**base, "C1": "never-seen-B", "C2": "never-seen-Y"},
        {**base, "tags": "unknown-tag"},
        base,
    ]
    p = fn(examples=_serialize(rows, serving_spec))["probabilities"].numpy().ravel()
    assert np.all(np.isfinite(p)) and np.all((p > 0) & (p < 1))
    # Two different unseen values of vocabulary columns both land in the OOV bucket: same score...
    assert p[2] == pytest.approx(p[3], abs=1e-7)
    # ...which differs from the known value's score.
    assert abs(p[2] - p[5]) > 1e-6


def test_predict_raw_matches_serving_default(exported, loaded, serving_spec):
    rows = exported["rows"][:50]
    want = loaded.signatures["serving_default"](examples=_serialize(rows, serving_spec))["probabilities"]
    inputs = {}
    for name, feat in serving_spec.items():
        if feat.dtype == tf.string:
            inputs[name] = tf.constant([r[name] if r[name] is not None else "" for r in rows])
        else:
            inputs[name] = tf.constant([np.nan if r[name] is None else r[name] for r in rows], dtype=feat.dtype)
    got = loaded.signatures["predict_raw"](**inputs)["probabilities"]
    assert any(r["I1"] is None for r in rows) and any(r["C1"] is None for r in rows)  # missing values exercised
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6, rtol=0)


def test_classify_and_regress_agree_with_predict(exported, loaded, serving_spec):
    ex = _serialize(exported["rows"][:20], serving_spec)
    p = loaded.signatures["serving_default"](examples=ex)["probabilities"].numpy().ravel()
    c = loaded.signatures["classify"](inputs=ex)
    r = loaded.signatures["regress"](inputs=ex)["outputs"].numpy()
    assert c["classes"].numpy()[0].tolist() == [b"0", b"1"]
    np.testing.assert_allclose(c["scores"].numpy()[:, 1], p, atol=1e-7)
    np.testing.assert_allclose(c["scores"].numpy().sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(r, p, atol=1e-7)


def _replay(loaded, log):
    """Run one PredictionLog against the SavedModel the way TF Serving does: Predict inputs as tensors,
    Classify/Regress Examples serialized into the signature's ``inputs``. Returns (signature, batch, outputs)."""
    kind = log.WhichOneof("log_type")
    req = getattr(log, kind).request
    if kind == "predict_log":
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in req.inputs.items()}
    else:
        assert kind in ("classify_log", "regress_log"), kind
        inputs = {"inputs": tf.constant([e.SerializeToString() for e in req.input.example_list.examples])}
    batch = int(next(iter(inputs.values())).shape[0])
    return kind, req.model_spec.signature_name, batch, loaded.signatures[req.model_spec.signature_name](**inputs)


def test_warmup_requests_cover_every_signature_with_training_rows(exported, loaded, serving_spec):
    from ctrkit.serving.warmup import read_warmup

    logs = read_warmup(exported["path"])
    training = set(_serialize(exported["rows"][:32], serving_spec).numpy().tolist())
    # Examples parsed back from a request re-serialize with their feature map in any order.
    canonical = {tf.train.Example.FromString(t).SerializeToString(deterministic=True) for t in training}
    seen = set()
    for log in logs:
        kind, sig, batch, out = _replay(loaded, log)
        assert getattr(log, kind).request.model_spec.name == exported["name"]
        seen.add((kind, sig))
        if kind == "predict_log" and sig == "serving_default":
            assert set(tf.make_ndarray(log.predict_log.request.inputs["examples"]).tolist()) <= training
        elif kind != "predict_log":
            examples = getattr(log, kind).request.input.example_list.examples
            assert {e.SerializeToString(deterministic=True) for e in examples} <= canonical
        for v in out.values():
            assert v.shape[0] == batch
        if "probabilities" in out:
            assert np.all(np.isfinite(out["probabilities"].numpy()))
    assert seen == {("predict_log", "serving_default"), ("predict_log", "predict_raw"),
                    ("classify_log", "classify"), ("regress_log", "regress")}
    assert max(_replay(loaded, log)[2] for log in logs) > 1


def test_non_finite_numbers_fail_tf_example_calls_and_nan_is_missing_only_in_predict_raw(loaded, serving_spec):
    """A tf.Example can leave a feature out, so NaN / ±inf there is bad input (training rejects such rows):
    the call fails with a message instead of returning a NaN score. predict_raw documents NaN as its
    missing marker; ±inf fails there too."""
    base = {"I1": 3.0, "I2": 10.0, "I3": 1.0, "C1": "c1_1", "C2": "c2_2", "C3": "c3_3", "tags": "t1|t2"}
    missing = {k: v for k, v in base.items() if k != "I1"}
    want = loaded.signatures["serving_default"](examples=_serialize([missing], serving_spec))["probabilities"]
    assert np.isfinite(want.numpy()).all()
    for bad in (float("nan"), float("inf"), float("-inf")):
        ex = _serialize([base, {**base, "I1": bad}], serving_spec)
        for name, key in (("serving_default", "examples"), ("regress", "inputs"), ("classify", "inputs")):
            with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or ±inf; leave a missing feature out"):
                loaded.signatures[name](**{key: ex})

    def raw(rows):
        return {k: tf.constant([r.get(k, np.nan if serving_spec[k].dtype.is_floating else "") for r in rows],
                               dtype=serving_spec[k].dtype) for k in serving_spec}

    got = loaded.signatures["predict_raw"](**raw([{**base, "I1": float("nan")}]))["probabilities"]
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="±inf"):
        loaded.signatures["predict_raw"](**raw([{**base, "I1": float("inf")}]))


def test_bad_model_is_never_published(exported, tmp_path):
    import keras

    from ctrkit.serving.export import export_model
    from ctrkit.serving.signatures import ExportError

    m = exported["manifest"]
    inputs = {f.name: keras.Input(shape=(), dtype="float32" if f.kind == "numeric" else "int64", name=f.name)
              for f in m.features if not f.multivalent}
    inputs.update({f.name: keras.Input(shape=(None,), dtype="int64", name=f.name) for f in m.features if f.multivalent})
    x = keras.layers.Concatenate()([keras.layers.Reshape((1,))(keras.ops.cast(inputs[f.name], "float32"))
                                    for f in m.features if not f.multivalent])
    no_probs = keras.Model(inputs, {"logits": keras.layers.Dense(1)(x)})
    with pytest.raises(ExportError, match="probabilities"):
        export_model(no_probs, m, str(tmp_path), "bad", warmup_examples=exported["rows"][:4], validate=False)
    assert os.listdir(tmp_path / "bad") == []  # no version and no staging directory left


def test_reload_check_catches_a_mismatch(exported, serving_spec):
    from ctrkit.serving.validate import ValidationError, finish_reload_check, start_reload_check

    ex = _serialize(exported["rows"][:8], serving_spec).numpy().tolist()
    wrong = _reference_probabilities(exported, exported["rows"][:8], serving_spec) + 1e-3
    proc, tmp = start_reload_check(exported["path"], ex, wrong, atol=1e-5)
    with pytest.raises(ValidationError, match="differs from the in-memory model"):
        finish_reload_check(proc, tmp)


def test_export_scores_under_tf_servings_loader(exported, loaded, serving_spec):
    """TF Serving restores a SavedModel with the C++ loader, as `saved_model_cli run` does, not with
    tf.saved_model.load; with the Keras 3 model tracked on the module every request failed there."""
    import json
    import subprocess
    import sys

    from ctrkit.serving.validate import _session_outputs

    rows = exported["rows"][:16]
    examples = _serialize(rows, serving_spec).numpy().tolist()
    in_session = _session_outputs(exported["path"], examples)
    want = loaded.signatures["serving_default"](examples=tf.constant(examples))["probabilities"].numpy()
    np.testing.assert_allclose(in_session["serving_default"]["probabilities"], want, atol=1e-6)
    np.testing.assert_allclose(in_session["regress"]["outputs"].reshape(-1), want.reshape(-1), atol=1e-6)
    # TensorFlow's own tool, in its own process: no ctrkit code on this path.
    example = {"I1": [3.0], "C1": ["c1_1"], "C2": ["c2_2"]}
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    out = subprocess.run([cli, "run", "--dir", exported["path"], "--tag_set", "serve", "--signature_def", "regress",
                          "--input_examples", f"inputs=[{json.dumps(example)}]"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    printed = float(re.search(r"Result for output key outputs:\s*\[([-0-9.e]+)\]", out.stdout).group(1))
    assert printed == pytest.approx(float(loaded.signatures["regress"](inputs=_serialize([example], serving_spec))
                                          ["outputs"].numpy()[0]), abs=1e-6)


def test_the_tf_serving_session_check_replays_every_warmup_request(exported, serving_spec, monkeypatch):
    """`ctrkit serve` skips its own TF1-session warmup replay for versions whose export ran this check, so
    the check must run what that replay ran: every warmup request, predict_raw included (it ran only
    serving_default, classify and regress on one batch)."""
    from ctrkit.serving import validate
    from ctrkit.serving.warmup import read_warmup, request_inputs

    ran = []
    real_run = validate.TFServingSession.run
    monkeypatch.setattr(validate.TFServingSession, "run",
                        lambda self, sig, inputs, **kw: (ran.append((sig, len(next(iter(inputs.values()))))),
                                                          real_run(self, sig, inputs, **kw))[1])
    examples = _serialize(exported["rows"][:4], serving_spec).numpy().tolist()
    validate._session_outputs(exported["path"], examples)
    warmup = [request_inputs(r) for r in read_warmup(exported["path"])]
    want = [(sig, len(next(iter(inputs.values())))) for sig, inputs in warmup]
    assert "predict_raw" in {sig for sig, _ in want}
    assert ran[-len(want):] == want


def test_reload_check_refuses_an_export_tf_servings_loader_cannot_run(exported, serving_spec, tmp_path):
    import tensorflow_transform as tft

    from ctrkit.serving.signatures import ServingModule
    from ctrkit.serving.validate import ValidationError, finish_reload_check, start_reload_check

    class KerasModelTracked(ServingModule):  # how ctrkit exported before: the Keras 3 model as an attribute
        def __init__(self, model, *args):
            super().__init__(model, *args)
            del self.model_variables
            self.model = model

    module = KerasModelTracked(exported["model"], tft.TFTransformOutput(exported["pipeline"]), exported["manifest"])
    tf.saved_model.save(module, str(tmp_path / "1"), signatures=module.signatures())
    ex = _serialize(exported["rows"][:8], serving_spec).numpy().tolist()
    want = _reference_probabilities(exported, exported["rows"][:8], serving_spec)
    proc, tmp = start_reload_check(str(tmp_path / "1"), ex, want, atol=1e-5)
    with pytest.raises(ValidationError, match="as TF Serving loads it, the signatures fail: Could not find variable"):
        finish_reload_check(proc, tmp)


def test_failed_prune_does_not_fail_the_export_and_leftovers_are_cleaned(exported, tmp_path, monkeypatch, caplog):
    import logging

    from ctrkit.serving import versions
    from ctrkit.serving.export import export_model

    path = tmp_path / "m"
    old = [path / ".tmp-crashed", path / ".tmp-deleting-3"]  # a crashed export's, a killed prune's
    fresh = path / ".tmp-writing"  # a concurrent export still writing
    for d in old + [fresh]:
        (d / "variables").mkdir(parents=True)
    for d in old:
        os.utime(d, (time.time() - 7200, time.time() - 7200))

    def broken_prune(p, keep):
        raise OSError(f"could not prune old version(s): {p}/3: Device or resource busy")

    monkeypatch.setattr(versions, "prune", broken_prune)
    with caplog.at_level(logging.WARNING, logger="ctrkit.serving.export"):
        final = export_model(exported["model"], exported["manifest"], str(tmp_path), "m",
                             warmup_examples=exported["rows"][:4], validate=False)
    assert versions.is_complete(final)  # published, and the export reports it
    assert any("pruning old versions" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    assert not any(d.exists() for d in old) and fresh.exists()


def test_export_repicks_a_version_another_exporter_took_meanwhile(exported, tmp_path, monkeypatch):
    """Two exports in the same unix second pick the same version before their (long) saves."""
    import json
    import types

    from ctrkit.serving import versions, warmup
    from ctrkit.serving.export import EXPORT_INFO_FILE, export_model

    now = 2_000_000_000
    monkeypatch.setattr(versions, "time", types.SimpleNamespace(time=lambda: float(now)))
    write_warmup = warmup.write_warmup

    def concurrent_export_publishes(*args, **kwargs):  # runs mid-export, after the version was picked
        other = tmp_path / "m" / str(now)
        (other / "variables").mkdir(parents=True)
        (other / "saved_model.pb").write_bytes(b"x")
        (other / "variables" / "variables.index").write_bytes(b"x")
        return write_warmup(*args, **kwargs)

    monkeypatch.setattr(warmup, "write_warmup", concurrent_export_publishes)
    final = export_model(exported["model"], exported["manifest"], str(tmp_path), "m",
                         warmup_examples=exported["rows"][:4], validate=False)
    assert final == str(tmp_path / "m" / str(now + 1))
    assert versions.list_versions(str(tmp_path / "m")) == [now, now + 1]
    with open(os.path.join(final, "assets.extra", EXPORT_INFO_FILE)) as f:
        assert json.load(f)["version"] == now + 1


def test_export_fn_keeps_last_k_increasing_versions(exported, tmp_path):
    from ctrkit.serving import versions
    from ctrkit.serving.export import make_export_fn

    fn = make_export_fn(str(tmp_path), "online", keep_versions=1, warmup_examples=exported["rows"][:4], validate=False)
    paths = [fn(exported["model"], exported["manifest"], step) for step in (10, 20)]
    got = [int(os.path.basename(p)) for p in paths]
    assert got[1] > got[0]
    assert versions.list_versions(str(tmp_path / "online")) == got[-1:]
    assert not os.path.exists(paths[0])


def test_export_fn_publishes_the_downsampling_correction_and_leaves_the_model_as_it_was(exported, serving_spec,
                                                                                      tmp_path):
    """With calibration.downsampling_rate set, the versions training published served the training stream's
    inflated click rates (ratio 2.4 on full data) until `ctrkit calibrate` and a new export."""
    from ctrkit.metrics import downsampling_correction
    from ctrkit.model import calibration_layer
    from ctrkit.serving.export import make_export_fn

    model, keep = exported["model"], 0.25
    before = [w.copy() for w in calibration_layer(model).get_weights()]
    fn = make_export_fn(str(tmp_path), "ds", warmup_examples=exported["rows"][:4], validate=False,
                        downsampling_rate=keep)
    path = fn(model, exported["manifest"], 10)
    examples = _serialize(exported["rows"][:64], serving_spec)
    served = tf.saved_model.load(path).signatures["serving_default"](examples=examples)["probabilities"].numpy()
    plain = _reference_probabilities(exported, exported["rows"][:64], serving_spec)  # the model as it trains
    np.testing.assert_allclose(served.reshape(-1), downsampling_correction(plain, keep), rtol=1e-4, atol=1e-6)
    assert not np.allclose(served.reshape(-1), plain, atol=1e-3)
    for a, b in zip(calibration_layer(model).get_weights(), before):
        np.testing.assert_array_equal(a, b)


def _cli(*args, timeout=600):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "ctrkit.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )


def test_ctrkit_export_from_a_run_directory(exported, serving_spec, tmp_path):
    """`ctrkit export RUN_DIR` on the trainer's run layout (run.json + model.keras). Validation is skipped
    here to stay in the suite's time budget; the session export above ran it through export_model."""
    import json

    from ctrkit.serving import versions

    run = tmp_path / "run"
    run.mkdir()
    exported["model"].save(run / "model.keras")
    (run / "run.json").write_text(json.dumps({"data_dir": exported["pipeline"], "status": "finished"}))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in exported["rows"][:16]))
    base = tmp_path / "models"
    proc = _cli("export", str(run), "--base-path", str(base), "--model-name", "cli", "--version", "5",
                "--warmup-rows", str(rows), "--no-validate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(base / "cli" / "5")
    assert versions.list_versions(str(base / "cli")) == [5]
    assert versions.is_complete(str(base / "cli" / "5"))

    # A run whose config sets calibration.downsampling_rate, exported before `ctrkit calibrate`: corrected.
    import argparse

    import yaml

    from ctrkit.commands.export import _downsampling_rate
    from ctrkit.config import load_config
    from ctrkit.metrics import downsampling_correction

    config = load_config("small").to_dict()
    config["calibration"]["downsampling_rate"] = 0.25
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    proc = _cli("export", str(run), "--base-path", str(base), "--model-name", "cli", "--version", "6",
                "--warmup-rows", str(rows), "--no-validate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not calibrated yet: exporting its model with the closed-form correction" in proc.stdout
    examples = _serialize(exported["rows"][:16], serving_spec)
    p5, p6 = (tf.saved_model.load(str(base / "cli" / v)).signatures["serving_default"](examples=examples)
              ["probabilities"].numpy().reshape(-1) for v in ("5", "6"))
    np.testing.assert_allclose(p6, downsampling_correction(p5, 0.25), rtol=1e-4, atol=1e-6)
    args = argparse.Namespace(run_dir=str(run), model=None)
    assert _downsampling_rate(args) == 0.25
    assert _downsampling_rate(argparse.Namespace(run_dir=str(run), model=str(run / "model.keras"))) is None
    (run / "model_uncalibrated.keras").write_bytes(b"")  # ctrkit calibrate ran: model.keras is corrected already
    assert _downsampling_rate(args) is None


def test_ctrkit_export_errors_are_one_line(tmp_path):
    proc = _cli("export", str(tmp_path), "--base-path", str(tmp_path / "b"), "--model-name", "x", timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"ctrkit export: error: {tmp_path} has no run.json: not a ctrkit run directory (or pass --model and --data)"
    ]


@pytest.mark.parametrize("content, message", [
    ('{"data_dir": "/d", "win', r"run\.json is not valid JSON \(.*\)\. ctrkit writes it atomically"),
    ('["data_dir"]', r"run\.json holds a list, not the JSON object ctrkit writes"),
    ('{"status": "completed"}', r"run\.json has no 'data_dir': not written by this version of ctrkit"),
])
def test_ctrkit_export_names_a_damaged_run_json(tmp_path, content, message, capsys):
    from ctrkit.cli import main

    (tmp_path / "run.json").write_text(content)
    assert main(["export", str(tmp_path), "--base-path", str(tmp_path / "b"), "--model-name", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_default_warmup_needs_recorded_raw_inputs(exported, tmp_path):
    from ctrkit.serving.export import export_model
    from ctrkit.serving.signatures import ExportError

    # This manifest (like any not written by ctrkit.pipelines.preprocess) records no raw inputs.
    with pytest.raises(ExportError, match="records no raw inputs.*warmup_examples"):
        export_model(exported["model"], exported["manifest"], str(tmp_path), "w")
    with pytest.raises(ExportError, match="warmup_examples is empty"):
        export_model(exported["model"], exported["manifest"], str(tmp_path), "w", warmup_examples=[])
    assert not os.path.exists(tmp_path / "w") or os.listdir(tmp_path / "w") == []


def test_fixed_len_raw_columns_parse_when_missing():
    """TF's parser fails on a FixedLenFeature without default that an Example lacks; serving must not."""
    from ctrkit.serving.signatures import serving_parse_spec

    raw = {
        "label": tf.io.FixedLenFeature([], tf.float32),
        "count": tf.io.FixedLenFeature([], tf.int64),
        "city": tf.io.FixedLenFeature([], tf.string),
        "pair": tf.io.FixedLenFeature([2], tf.float32),
        "tags": tf.io.VarLenFeature(tf.string),
    }
    empty = tf.constant([tf.train.Example().SerializeToString()])
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.parse_example(empty, {k: v for k, v in raw.items() if k != "label"})
    spec = serving_parse_spec(raw, exclude=["label"])
    assert "label" not in spec and isinstance(spec["tags"], tf.io.VarLenFeature)
    parsed = tf.io.parse_example(empty, spec)
    assert parsed["count"].numpy().tolist() == [0]
    assert parsed["city"].numpy().tolist() == [b""]
    assert parsed["pair"].numpy().tolist() == [[0.0, 0.0]]
    assert parsed["tags"].values.shape == (0,)


def test_warmup_rows_from_a_rotated_raw_log_name_the_warmup_read(tmp_path):
    """The raw log recorded in the manifest was replaced by a newer schema: export said "header does not
    match data.columns ... (declare them with kind: ignore)", preprocess advice, naming neither the warmup
    read nor --warmup-rows."""
    import types

    from ctrkit.configio import to_dict
    from ctrkit.schema import ColumnSpec, DataConfig
    from ctrkit.serving.export import raw_rows_from_manifest
    from ctrkit.serving.signatures import ExportError

    columns = [ColumnSpec("label", kind="label"), ColumnSpec("c")]
    log = tmp_path / "day1.csv"
    log.write_text("label,c,c4\n1,a,x\n")  # rotated: a column more than when it was preprocessed
    manifest = types.SimpleNamespace(root=str(tmp_path), config={
        "inputs": [str(log)], "data": to_dict(DataConfig(format="csv", header=True, columns=columns))})
    with pytest.raises(ExportError, match=r"raw input .*day1\.csv recorded in the manifest, read for warmup requests, "
                                          r"no longer reads as it did.*unexpected columns \['c4'\].*--warmup-rows"):
        raw_rows_from_manifest(manifest)
