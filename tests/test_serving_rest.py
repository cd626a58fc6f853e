"""The local server against TF Serving's REST API documentation (tensorflow.org/tfx/serving/api_rest).

Request and response shapes below are the documented ones: model status (GetModelStatusResponse JSON),
metadata (GetModelMetadataResponse JSON), predict in row ("instances" → "predictions") and columnar
("inputs" → "outputs") format with ``{"b64": ...}`` binary values, classify (``"result"``: per example a
list of [label, score]) and regress (``"result"``: one value per example), errors as ``{"error": ...}``.
Expected scores come from the SavedModel's own signatures, called directly.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

tf = pytest.importorskip("tensorflow")
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def client(exported):
    from starlette.testclient import TestClient

    from ctrkit.serving.server import ModelRegistry, create_app

    registry = ModelRegistry(exported["base"], exported["name"], poll_seconds=0.2)
    with TestClient(create_app(registry, max_batch_size=100)) as c:
        yield c


@pytest.fixture(scope="module")
def version(exported):
    return int(os.path.basename(exported["path"]))


def _serialized(rows, serving_spec):
    from ctrkit.serving.warmup import serialize_rows

    return serialize_rows(rows, serving_spec)


def _b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def _present(row):
    return {k: v for k, v in row.items() if v is not None and k != "label"}


def _expected(loaded, examples):
    return loaded.signatures["serving_default"](examples=tf.constant(examples))["probabilities"].numpy().ravel()


# -- status and metadata -----------------------------------------------------------------------------
def test_model_status(client, version):
    r = client.get("/v1/models/ctr")
    assert r.status_code == 200
    assert r.json() == {
        "model_version_status": [
            {"version": str(version), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    assert client.get(f"/v1/models/ctr/versions/{version}").json()["model_version_status"][0]["version"] == str(version)


def test_model_metadata(client, version):
    r = client.get("/v1/models/ctr/metadata")
    assert r.status_code == 200
    body = r.json()
    assert body["model_spec"]["name"] == "ctr" and body["model_spec"]["version"] == str(version)
    defs = body["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "predict_raw", "classify", "regress"} <= set(defs)
    sd = defs["serving_default"]
    assert sd["method_name"] == "tensorflow/serving/predict"
    assert sd["inputs"]["examples"]["dtype"] == "DT_STRING"
    assert set(sd["outputs"]) == {"logits", "probabilities"}
    assert defs["classify"]["method_name"] == "tensorflow/serving/classify"


# -- predict -------------------------------------------------------------------------------------------
def test_predict_row_format_b64_examples(client, exported, loaded, serving_spec):
    ex = _serialized(exported["rows"][:5], serving_spec)
    r = client.post("/v1/models/ctr:predict", json={"instances": [_b64(e) for e in ex]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 5 and all(set(p) == {"logits", "probabilities"} for p in preds)
    got = np.array([p["probabilities"][0] for p in preds])
    np.testing.assert_allclose(got, _expected(loaded, ex), atol=1e-6)
    logits = np.array([p["logits"][0] for p in preds])
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), got, atol=1e-6)


def test_predict_named_instances_and_columnar_format_agree(client, exported, loaded, serving_spec, version):
    ex = _serialized(exported["rows"][5:9], serving_spec)
    named = client.post(
        f"/v1/models/ctr/versions/{version}:predict",
        json={"signature_name": "serving_default", "instances": [{"examples": _b64(e)} for e in ex]},
    )
    columnar = client.post("/v1/models/ctr:predict", json={"inputs": {"examples": [_b64(e) for e in ex]}})
    bare = client.post("/v1/models/ctr:predict", json={"inputs": [_b64(e) for e in ex]})
    assert named.status_code == columnar.status_code == bare.status_code == 200
    outputs = columnar.json()["outputs"]
    assert set(outputs) == {"logits", "probabilities"}
    want = _expected(loaded, ex)
    np.testing.assert_allclose(np.array(outputs["probabilities"]).ravel(), want, atol=1e-6)
    np.testing.assert_allclose(np.array(bare.json()["outputs"]["probabilities"]).ravel(), want, atol=1e-6)
    np.testing.assert_allclose([p["probabilities"][0] for p in named.json()["predictions"]], want, atol=1e-6)


def test_predict_raw_features_with_missing_values(client, exported, loaded, serving_spec):
    rows = exported["rows"][:6]
    instances = []
    for row in rows:
        inst = {}
        for name, feat in serving_spec.items():
            v = row[name]
            inst[name] = ("" if v is None else v) if feat.dtype == tf.string else (float("nan") if v is None else v)
        instances.append(inst)
    assert any(row["I1"] is None or row["C1"] is None for row in rows)
    # NaN is a documented JSON token of the API ("JSON conformance"); strict encoders refuse it.
    body = json.dumps({"signature_name": "predict_raw", "instances": instances})
    assert "NaN" in body
    r = client.post("/v1/models/ctr:predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    got = [p["probabilities"][0] for p in r.json()["predictions"]]
    np.testing.assert_allclose(got, _expected(loaded, _serialized(rows, serving_spec)), atol=1e-6)


# -- classify / regress ----------------------------------------------------------------------------------
def test_classify_with_context(client, exported, loaded, serving_spec):
    rows = [_present(r) for r in exported["rows"][10:14]]
    shared = {"C3": "c3_1"}
    examples = [{k: v for k, v in r.items() if k != "C3"} for r in rows]
    r = client.post(
        "/v1/models/ctr:classify", json={"signature_name": "classify", "context": shared, "examples": examples}
    )
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert len(result) == 4
    for pairs in result:
        assert [label for label, _ in pairs] == ["0", "1"]
        assert sum(score for _, score in pairs) == pytest.approx(1.0, abs=1e-6)
    want = _expected(loaded, _serialized([{**e, **shared} for e in examples], serving_spec))
    np.testing.assert_allclose([pairs[1][1] for pairs in result], want, atol=1e-6)


def test_regress(client, exported, loaded, serving_spec):
    rows = [_present(r) for r in exported["rows"][20:23]] + [{}]  # the last example has no features at all
    r = client.post("/v1/models/ctr:regress", json={"signature_name": "regress", "examples": rows})
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert len(result) == 4 and all(isinstance(v, float) for v in result)
    np.testing.assert_allclose(result, _expected(loaded, _serialized(rows, serving_spec)), atol=1e-6)


# -- bad requests: 4xx with {"error": ...}, and the server keeps serving ----------------------------------
@pytest.mark.parametrize(
    "path,body,status",
    [
        ("/v1/models/ctr:predict", b"{not json", 400),
        ("/v1/models/ctr:predict", b"[1, 2]", 400),
        ("/v1/models/ctr:predict", b'{"instances": [{"b64": "%%%"}]}', 400),
        ("/v1/models/ctr:predict", b'{"instances": [], "inputs": []}', 400),
        ("/v1/models/ctr:predict", b'{"instances": [1.5]}', 400),  # a number where a string Example goes
        ("/v1/models/ctr:predict", b'{"signature_name": "predict_raw", "instances": [{"I1": "abc"}]}', 400),
        ("/v1/models/ctr:predict", b'{"signature_name": "nope", "instances": ["x"]}', 400),
        ("/v1/models/ctr:predict", b'{"instances": ["not a serialized example"]}', 400),
        ("/v1/models/ctr:classify", b'{"signature_name": "classify", "examples": [{"I1": "abc"}]}', 400),
        ("/v1/models/ctr:classify", b'{"signature_name": "classify", "examples": [{"no_such": 1}]}', 400),
        ("/v1/models/ctr:regress", b'{"signature_name": "regress", "context": {"I1": 1}, "examples": [{"I1": 2}]}', 400),
        ("/v1/models/other:predict", b'{"instances": ["x"]}', 404),
        ("/v1/models/ctr/versions/1:predict", b'{"instances": ["x"]}', 404),
    ],
)
def test_bad_requests(client, exported, serving_spec, path, body, status):
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and r.json()["error"]
    ok = client.post("/v1/models/ctr:predict", json={"instances": [_b64(_serialized([{}], serving_spec)[0])]})
    assert ok.status_code == 200


def test_oversized_batch_and_unknown_model_status(client, serving_spec):
    ex = _b64(_serialized([{"I1": 1.0}], serving_spec)[0])
    r = client.post("/v1/models/ctr:predict", json={"instances": [ex] * 101})
    assert r.status_code == 400 and "exceeds" in r.json()["error"]
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/v1/models/ctr/versions/12").status_code == 404


# -- versions appear while serving; half-written ones never load ------------------------------------------
def _wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_picks_up_new_versions_and_never_loads_half_written_ones(exported, serving_spec, tmp_path):
    from starlette.testclient import TestClient

    from ctrkit.serving.server import ModelRegistry, create_app

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    shutil.copytree(exported["path"], model_dir / "1")
    ex = {"instances": [_b64(_serialized([{"I1": 2.0}], serving_spec)[0])]}
    with TestClient(create_app(ModelRegistry(str(tmp_path), "m", poll_seconds=0.2))) as c:
        status = lambda: [s["version"] for s in c.get("/v1/models/m").json().get("model_version_status", [])]  # noqa: E731
        assert status() == ["1"]
        # Half-written: the graph is there, the variables are not (yet).
        half = model_dir / "3"
        half.mkdir()
        shutil.copy(os.path.join(exported["path"], "saved_model.pb"), half / "saved_model.pb")
        # Complete but broken: must not replace the serving version either.
        broken = model_dir / "2"
        shutil.copytree(exported["path"], broken)
        (broken / "saved_model.pb").write_bytes(b"garbage")
        time.sleep(1.5)
        assert status() == ["1"]
        assert c.post("/v1/models/m:predict", json=ex).status_code == 200
        # The export finishes: version 3 appears and replaces version 1.
        shutil.rmtree(half)
        shutil.copytree(exported["path"], model_dir / ".tmp-3")
        os.rename(model_dir / ".tmp-3", half)
        assert _wait_for(lambda: status() == ["3"]), status()
        assert c.post("/v1/models/m/versions/3:predict", json=ex).status_code == 200
        assert c.post("/v1/models/m/versions/1:predict", json=ex).status_code == 404


# -- the real command on loopback, under a short concurrent load ---------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ctrkit_serve_under_short_load(exported, serving_spec):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctrkit.cli", "serve", exported["base"], "--model-name", "ctr", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    url = f"http://127.0.0.1:{port}/v1/models/ctr"
    try:
        def up() -> bool:
            try:
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
                return False

        assert _wait_for(up, timeout=120)
        ex = _serialized(exported["rows"][:64], serving_spec)
        bodies = [{"instances": [_b64(ex[0])]}, {"instances": [_b64(e) for e in ex]}]
        errors, done = [], []

        def client(i: int) -> None:
            with httpx.Client(timeout=30) as c:
                end = time.time() + 4
                while time.time() < end:
                    r = c.post(url + ":predict", json=bodies[i % 2])
                    if r.status_code != 200 or len(r.json()["predictions"]) != len(bodies[i % 2]["instances"]):
                        errors.append(r.text)
                    done.append(1)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(done) >= 8
    finally:
        proc.terminate()
        proc.wait(timeout=30)
