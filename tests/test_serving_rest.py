"""The local server against TF Serving's REST API documentation (tensorflow.org/tfx/serving/api_rest).

Request and response shapes below are the documented ones: model status (GetModelStatusResponse JSON),
metadata (GetModelMetadataResponse JSON), predict in row ("instances" → "predictions") and columnar
("inputs" → "outputs") format with ``{"b64": ...}`` binary values, classify (``"results"``: per example a
list of [label, score]) and regress (``"results"``: one value per example), errors as ``{"error": ...}``.
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
    result = r.json()["results"]
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
    result = r.json()["results"]
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
        # raw UTF-8 bytes of a surrogate, which json.loads lets through (surrogatepass)
        ("/v1/models/ctr:regress", b'{"examples": [{"C1": "\xed\xa0\x80"}]}', 400),
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


def _int64_example() -> dict:
    """A raw Example carrying I1 as int64_list, what TF Serving builds from the JSON integer 3."""
    ex = tf.train.Example()
    ex.features.feature["I1"].int64_list.value.append(3)
    return _b64(ex.SerializeToString())


_BASE = {"I1": 3.0, "I2": 10.0, "I3": 1.0, "C1": "c1_1", "C2": "c2_2", "C3": "c3_3", "tags": "t1|t2"}


@pytest.mark.parametrize(
    "path,body,fragments",
    [
        # TF's own reason, not the first line of its message ("Graph execution error:")
        ("/v1/models/ctr:predict", {"instances": [_int64_example()]}, ["Key: I1", "Data types don't match"]),
        # an unparsable, non-UTF-8 Example: TF cannot even decode its error message
        ("/v1/models/ctr:predict", {"instances": [_b64(b"\xff\xfe")]}, ["Could not parse example input"]),
        # the signature's method must fit the API (TF Serving's wording)
        ("/v1/models/ctr:classify", {"signature_name": "regress", "examples": [_BASE]},
         ["method_name to be tensorflow/serving/classify", "Was: tensorflow/serving/regress"]),
        ("/v1/models/ctr:regress", {"signature_name": "classify", "examples": [_BASE]},
         ["method_name to be tensorflow/serving/regress", "Was: tensorflow/serving/classify"]),
        ("/v1/models/ctr:regress", {"signature_name": "serving_default", "examples": [_BASE]},
         ["Was: tensorflow/serving/predict"]),
        # several values: a multi-valued column takes one joined string, any other column one value
        ("/v1/models/ctr:regress", {"examples": [{**_BASE, "tags": ["t1", "t2"]}]},
         ["'tags' is multi-valued", "joined", "one string"]),
        ("/v1/models/ctr:regress", {"examples": [_BASE, {**_BASE, "I1": [3.0, 50.0]}]},
         ["examples[1]", "'I1' takes 1 value"]),
        ("/v1/models/ctr:classify", {"examples": [{**_BASE, "C1": ["c1_1", "c1_2"]}]}, ["'C1' takes 1 value"]),
        # JSON types as TF Serving maps them: integers are int64, null is no value
        ("/v1/models/ctr:regress", {"examples": [{**_BASE, "I1": 3}]}, ["'I1'", "integer 3", "3.0"]),
        ("/v1/models/ctr:regress", {"examples": [{**_BASE, "I1": True}]}, ["'I1'", "boolean"]),
        ("/v1/models/ctr:regress", {"examples": [{**_BASE, "I1": None}]}, ["'I1'", "null", "leave the feature out"]),
        ("/v1/models/ctr:classify", {"context": {"C1": None}, "examples": [{"I1": 1.0}]}, ["'C1'", "null"]),
        # predict_raw takes JSON numbers only, as TF Serving does: null and booleans used to read as NaN and 1
        ("/v1/models/ctr:predict", {"signature_name": "predict_raw", "instances": [{**_BASE, "I1": None}]},
         ["input 'I1': JSON Value: null Type: Null is not of expected type: float", "NaN marks a missing value"]),
        ("/v1/models/ctr:predict", {"signature_name": "predict_raw", "instances": [{**_BASE, "I2": True}]},
         ["input 'I2': JSON Value: true Type: True"]),
        ("/v1/models/ctr:predict", {"signature_name": "predict_raw", "inputs": {
            **{k: [v, v] for k, v in _BASE.items()}, "I3": [1.0, False]}}, ["input 'I3': JSON Value: false"]),
        # a lone surrogate (a string cut inside an emoji) is a JSON error, not a 500 from deep inside
        ("/v1/models/ctr:regress", {"examples": [{**_BASE, "C1": "ab\ud83d"}]}, ["JSON Parse error", "surrogate"]),
        ("/v1/models/ctr:classify", {"context": {"C2": "\udc00"}, "examples": [{"I1": 1.0}]}, ["surrogate"]),
        ("/v1/models/ctr:predict", {"signature_name": "\ud800", "instances": ["x"]}, ["surrogate"]),
        # signature_name must be a string (it fell back to the default for 0, false or [])
        ("/v1/models/ctr:predict", {"signature_name": 0, "instances": ["x"]}, ["'signature_name' key must be a string"]),
        ("/v1/models/ctr:regress", {"signature_name": False, "examples": [_BASE]}, ["must be a string value"]),
        # paths TF Serving answers with 400
        ("/v1/models/ctr:explain", {"instances": ["x"]}, ["Malformed request", "'explain'"]),
        ("/v1/models/ctr/labels/stable:predict", {"instances": ["x"]}, ["Unrecognized servable version label: stable"]),
        ("/v1/models/ctr/versions/99999999999999999999999:predict", {"instances": ["x"]}, ["Failed to convert version"]),
        ("/v1/models", {"instances": ["x"]}, ["Missing model name in request."]),
    ],
)
def test_bad_requests_say_what_is_wrong(client, path, body, fragments):
    # json.dumps escapes non-ASCII (as most clients do), so a lone surrogate travels as its \\u escape
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    for fragment in fragments:
        assert fragment in r.json()["error"], r.json()["error"]


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/", "/v1/models/ctr/labels/stable",
                                  "/v1/models/ctr/labels/stable/metadata", "/v1/models/ctr/versions/1e3"])
def test_status_paths_tf_serving_refuses_are_bad_requests(client, path):
    r = client.get(path)
    assert r.status_code == 400 and set(r.json()) == {"error"}, r.text


def test_valid_surrogate_pairs_and_method_case_are_accepted(client, loaded, serving_spec):
    """The lone-surrogate check must not refuse an emoji (an escaped pair); TF Serving matches the method
    name case-insensitively."""
    body = json.dumps({"examples": [{**_BASE, "C1": "c1_\U0001F600"}]}, ensure_ascii=True)
    assert "\\ud83d\\ude00" in body
    r = client.post("/v1/models/ctr:REGRESS", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    want = _expected(loaded, _serialized([{**_BASE, "C1": "c1_\U0001F600"}], serving_spec))
    np.testing.assert_allclose(r.json()["results"], want, atol=1e-6)


def test_a_lone_surrogate_in_a_utf16_body_is_a_bad_request(client):
    """json.loads reads UTF-16/32 bodies too, where the UTF-8 byte scan saw no escape (a 500 followed)."""
    body = json.dumps({"examples": [{**_BASE, "C1": "ab\ud83d"}]}).encode("utf-16")
    r = client.post("/v1/models/ctr:regress", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"], r.text


def test_deeply_nested_json_is_a_bad_request(client):
    for depth in (100_000, 900):  # past json's recursion limit; just inside it (then our own walks)
        nested = "[" * depth + "]" * depth
        for body in (nested, '{"signature_name": "predict_raw", "instances": [{"I1": ' + nested + "}]}"):
            r = client.post("/v1/models/ctr:predict", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (depth, r.text[:300])


def test_multivalued_column_as_joined_string_and_single_element_lists(client, exported, loaded, serving_spec):
    rows = [_BASE, {**_BASE, "tags": ["t1|t2"], "C1": ["c1_1"]}, {**_BASE, "tags": []}]
    r = client.post("/v1/models/ctr:regress", json={"examples": rows})
    assert r.status_code == 200, r.text
    want = _expected(loaded, _serialized([_BASE, _BASE, {k: v for k, v in _BASE.items() if k != "tags"}], serving_spec))
    np.testing.assert_allclose(r.json()["results"], want, atol=1e-6)


def test_nan_is_missing_in_predict_raw_and_a_bad_request_in_regress(client, loaded, serving_spec):
    """NaN (a JSON token TF Serving parses) is predict_raw's missing marker; in :regress it is bad input."""
    body = json.dumps({"signature_name": "predict_raw", "instances": [{**_BASE, "I1": float("nan")}]})
    raw = client.post("/v1/models/ctr:predict", content=body, headers={"content-type": "application/json"})
    assert raw.status_code == 200, raw.text
    want = _expected(loaded, _serialized([{k: v for k, v in _BASE.items() if k != "I1"}], serving_spec))
    assert raw.json()["predictions"][0]["probabilities"][0] == pytest.approx(want[0], abs=1e-6)
    for bad in (float("nan"), float("inf")):
        body = json.dumps({"examples": [_BASE, {**_BASE, "I2": bad}]})
        reg = client.post("/v1/models/ctr:regress", content=body, headers={"content-type": "application/json"})
        assert reg.status_code == 400, reg.text
        assert reg.json()["error"].startswith(f"examples[1]: feature 'I2': {bad!r} is not a value the model can "
                                              "score; leave the feature out"), reg.text
    body = json.dumps({"signature_name": "predict_raw", "instances": [{**_BASE, "I3": float("-inf")}]})
    raw = client.post("/v1/models/ctr:predict", content=body, headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"] == "input 'I3': ±inf has no meaning (NaN marks a missing value)"


def test_oversized_batch_and_unknown_model_status(client, serving_spec):
    ex = _b64(_serialized([{"I1": 1.0}], serving_spec)[0])
    r = client.post("/v1/models/ctr:predict", json={"instances": [ex] * 101})
    assert r.status_code == 400 and "exceeds" in r.json()["error"]
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/v1/models/ctr/versions/12").status_code == 404


def test_an_oversized_batch_is_refused_before_it_is_converted(client, serving_spec):
    """The batch limit was checked after every row was converted: 3 million empty examples kept the
    inference threads busy for over a minute before the answer said "exceeds". The first row here is bad,
    so a limit checked after conversion would answer about that row instead."""
    ex = _b64(_serialized([{"I1": 1.0}], serving_spec)[0])
    r = client.post("/v1/models/ctr:predict", json={"instances": [{"b64": "%%%"}] + [ex] * 100})
    assert r.status_code == 400 and "batch size 101 exceeds" in r.json()["error"], r.text
    r = client.post("/v1/models/ctr:regress", json={"examples": [{"no_such_feature": 1}] + [{"I1": 1.0}] * 100})
    assert r.status_code == 400 and "batch size 101 exceeds" in r.json()["error"], r.text


def test_an_integer_too_long_to_parse_is_a_bad_request(client):
    r = client.post("/v1/models/ctr:predict", content=b'{"instances": [' + b"1" * 5000 + b"]}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("JSON Parse error"), r.text


def test_a_chunked_body_is_refused_at_the_limit_without_reading_the_rest(exported):
    """A chunked body declares no length; it was read whole (1.5 GB: +2.4 GB of server memory) before its
    size was checked. Driven through ASGI directly, to count the chunks the server asks for."""
    import asyncio

    from ctrkit.serving.server import ModelRegistry, create_app

    app = create_app(ModelRegistry(exported["base"], exported["name"]), max_body_bytes=1000)
    received, sent = [], []

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b"x" * 400, "more_body": len(received) < 1000}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/models/ctr:predict", "raw_path": b"/v1/models/ctr:predict",
             "headers": [(b"transfer-encoding", b"chunked")], "query_string": b"", "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 8501), "client": ("127.0.0.1", 50000), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert len(received) == 3  # 1,200 bytes: past the limit, and no more read


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
    registry = ModelRegistry(str(tmp_path), "m", poll_seconds=0.2)
    with TestClient(create_app(registry)) as c:
        status = lambda: [s["version"] for s in c.get("/v1/models/m").json().get("model_version_status", [])  # noqa: E731
                          if s["state"] == "AVAILABLE"]
        assert status() == ["1"]
        # Half-written: the graph is there, the variables are not (yet).
        half = model_dir / "3"
        half.mkdir()
        shutil.copy(os.path.join(exported["path"], "saved_model.pb"), half / "saved_model.pb")
        # Complete but broken: must not replace the serving version either.
        broken = model_dir / "2"
        shutil.copytree(exported["path"], broken)
        (broken / "saved_model.pb").write_bytes(b"garbage")
        # The poller has looked at the half-written version (a fixed sleep could end before it ran).
        assert _wait_for(lambda: 3 in registry._incomplete, timeout=30)
        assert status() == ["1"]
        assert c.post("/v1/models/m:predict", json=ex).status_code == 200
        # The export finishes: version 3 appears and replaces version 1.
        shutil.rmtree(half)
        shutil.copytree(exported["path"], model_dir / ".tmp-3")
        os.rename(model_dir / ".tmp-3", half)
        assert _wait_for(lambda: status() == ["3"]), status()
        assert c.post("/v1/models/m/versions/3:predict", json=ex).status_code == 200
        assert c.post("/v1/models/m/versions/1:predict", json=ex).status_code == 404


def test_version_completed_after_an_incomplete_poll_is_loaded(exported, tmp_path):
    """A non-atomic copy (cp -r, rsync) into the version directory: files land in variables/ without
    changing the version directory's mtime, and the server must still load the version once whole."""
    from ctrkit.serving.server import ModelRegistry

    src = exported["path"]
    v = tmp_path / "m" / "7"
    v.mkdir(parents=True)
    for name in os.listdir(src):
        if name == "variables":
            (v / name).mkdir()
        elif os.path.isdir(os.path.join(src, name)):
            shutil.copytree(os.path.join(src, name), v / name)
        else:
            shutil.copy(os.path.join(src, name), v / name)
    registry = ModelRegistry(str(tmp_path), "m")
    registry.poll_once()
    assert not registry._loaded  # incomplete: not loaded
    # The index arrives first: complete by name, but the variable data is not there yet, so loading fails.
    variables = sorted(os.listdir(os.path.join(src, "variables")), key=lambda n: n != "variables.index")
    shutil.copy(os.path.join(src, "variables", variables[0]), v / "variables")
    registry.poll_once()
    assert not registry._loaded and 7 in registry._failed
    for name in variables[1:]:
        shutil.copy(os.path.join(src, "variables", name), v / "variables")
    registry.poll_once()
    assert sorted(registry._loaded) == [7]
    assert registry.status("m", None)[0]["version"] == "7"


def test_a_version_still_being_copied_is_not_loaded_and_one_changed_after_loading_is_loaded_again(
        exported, loaded, serving_spec, tmp_path, monkeypatch, caplog):
    """A non-atomic copy (cp -r, gsutil) looked complete once saved_model.pb and the variable index were there,
    while assets/ was still being written: the version loaded with half a vocabulary and served wrong scores
    (0.7503 where the whole version gives 0.3912) until the server restarted."""
    import types

    from ctrkit.serving import server
    from ctrkit.serving.server import Handler, ModelRegistry

    v = tmp_path / "m" / "1"
    shutil.copytree(exported["path"], v)
    vocab = max((v / "assets").iterdir(), key=lambda p: p.stat().st_size)
    whole = vocab.read_bytes()
    vocab.write_bytes(whole[: len(whole) // 2])  # the copy is half way through this file

    def still_writing(seconds):  # the copy goes on while the registry waits for the files to settle
        with open(vocab, "ab") as f:
            f.write(b"x\n")

    monkeypatch.setattr(server, "time", types.SimpleNamespace(sleep=still_writing))
    registry = ModelRegistry(str(tmp_path), "m")
    registry.poll_once()
    assert registry.loaded_versions() == []
    monkeypatch.undo()

    vocab.write_bytes(whole[: len(whole) // 2])  # a pause in the copy long enough to look settled
    registry = ModelRegistry(str(tmp_path), "m", settle_seconds=0.05)
    registry.poll_once()
    first = registry._loaded[1]
    vocab.write_bytes(whole)  # the copy finishes
    registry.poll_once()
    assert registry._loaded[1] is not first and registry._loaded[1].files_stamp != first.files_stamp
    rows = [_present(r) for r in exported["rows"][:50]]
    status, body = Handler(registry).post("m:regress", json.dumps({"examples": rows}).encode())
    assert status == 200
    np.testing.assert_allclose(body["results"], _expected(loaded, _serialized(rows, serving_spec)), rtol=1e-5)
    second = registry._loaded[1]
    registry.poll_once()
    assert registry._loaded[1] is second  # files unchanged: not loaded again
    (v / "saved_model.pb").write_bytes(b"broken")  # changed into files that do not load
    caplog.clear()
    with caplog.at_level("WARNING", logger="ctrkit.serving.server"):
        for _ in range(3):
            registry.poll_once()
    assert registry._loaded[1] is second  # still served as it was
    changed = [r for r in caplog.records if "changed since it was loaded" in r.getMessage()]
    assert len(changed) == 1 and len([r for r in caplog.records if r.levelname == "ERROR"]) == 1


def test_a_version_tf_serving_could_not_run_is_refused(exported, tmp_path):
    """A ctrkit export from before the Keras 3 model's variables were tracked directly: tf.saved_model.load
    scores it, so `ctrkit serve` served it, while TF Serving fails every request ("Could not find variable")."""
    import tensorflow as tf
    import tensorflow_transform as tft

    from ctrkit.serving.server import ModelRegistry
    from ctrkit.serving.signatures import ServingModule
    from ctrkit.serving.warmup import serialize_rows, write_warmup

    class KerasModelTracked(ServingModule):  # the old export: the Keras model as a module attribute
        def __init__(self, model, *args):
            super().__init__(model, *args)
            del self.model_variables
            self.model = model

    module = KerasModelTracked(exported["model"], tft.TFTransformOutput(exported["pipeline"]), exported["manifest"])
    old = tmp_path / "m" / "3"
    tf.saved_model.save(module, str(old), signatures=module.signatures())
    write_warmup(str(old), serialize_rows(exported["rows"][:4], module.parse_spec), "m", module.parse_spec)
    shutil.copytree(exported["path"], tmp_path / "m" / "4")  # a current export beside it loads
    registry = ModelRegistry(str(tmp_path), "m", num_versions=2)
    registry.poll_once()
    assert sorted(registry._loaded) == [4]
    assert "TF Serving could not run this version" in registry._failed[3][1]
    assert "Could not find variable" in registry._failed[3][1]


def test_a_version_the_export_checked_is_not_loaded_a_second_time(exported, tmp_path, monkeypatch):
    """The export's validation already scored the warmup rows as TF Serving loads a version; repeating that in
    the server loaded the weights a second time, and the process kept the memory (RSS ~2x the weights)."""
    import json

    import tensorflow as tf

    from ctrkit.serving import validate
    from ctrkit.serving.server import ModelRegistry

    opened = []

    class Counting(validate.TFServingSession):
        def __init__(self, path):
            opened.append(os.path.basename(path))
            super().__init__(path)

    monkeypatch.setattr(validate, "TFServingSession", Counting)
    checked = tmp_path / "m" / "5"
    shutil.copytree(exported["path"], checked)
    info = json.loads((checked / "assets.extra" / "ctrkit_export.json").read_text())
    assert info["tf_serving_session_checked_with_tensorflow"] == tf.__version__
    other_tf = tmp_path / "m" / "6"  # exported and checked by another TensorFlow: checked again here
    shutil.copytree(exported["path"], other_tf)
    (other_tf / "assets.extra" / "ctrkit_export.json").write_text(
        json.dumps({**info, "tf_serving_session_checked_with_tensorflow": "2.0.0"}))
    registry = ModelRegistry(str(tmp_path), "m", num_versions=2)
    registry.poll_once()
    assert sorted(registry._loaded) == [5, 6]
    assert opened == ["6"]


def _odd_names_export(path: str) -> dict:
    """A small SavedModel shaped like a ctrkit export whose raw columns are not Python identifiers."""
    from ctrkit.serving.export import set_method_names
    from ctrkit.serving.warmup import serialize_rows, write_warmup

    spec = {"ad.id": tf.io.FixedLenFeature([], tf.string, default_value=""),
            "9num": tf.io.FixedLenFeature([], tf.float32, default_value=0.0)}

    def score(f):
        z = f["9num"] + tf.where(tf.equal(f["ad.id"], "a"), 1.0, -1.0)
        return tf.reshape(tf.sigmoid(z), [-1, 1])

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
        def serve(self, examples):
            return {"probabilities": score(tf.io.parse_example(examples, spec))}

        @tf.function(input_signature=[{k: tf.TensorSpec([None], v.dtype, name=k) for k, v in spec.items()}])
        def raw(self, features):
            return {"probabilities": score(features)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def classify(self, inputs):
            p = score(tf.io.parse_example(inputs, spec))
            return {"scores": tf.concat([1 - p, p], 1), "classes": tf.constant([["0", "1"]])}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def regress(self, inputs):
            return {"outputs": tf.reshape(score(tf.io.parse_example(inputs, spec)), [-1])}

    m = M()
    tf.saved_model.save(m, path, signatures={"serving_default": m.serve, "predict_raw": m.raw,
                                             "classify": m.classify, "regress": m.regress})
    set_method_names(path)
    write_warmup(path, serialize_rows([{"ad.id": "a", "9num": 0.5}], spec), "odd", spec)
    return spec


def test_raw_columns_that_are_not_python_identifiers_load_and_score(tmp_path):
    """The config allows '.', '-' and a leading digit in column names. The server read its input names from
    the loaded functions, which hold them as Python identifiers ('ad.id' -> 'ad_id', '9num' -> 'arg_9num'):
    the warmup replay failed (KeyError) and the version never loaded; without warmup, requests with the
    real names were refused and the mangled ones silently scored as missing."""
    from ctrkit.serving.server import Handler, ModelRegistry

    _odd_names_export(str(tmp_path / "odd" / "1"))
    registry = ModelRegistry(str(tmp_path), "odd")
    registry.poll_once()
    assert registry.loaded_versions() == [1], registry._failed
    handler = Handler(registry)
    want = 1 / (1 + np.exp(-(2.0 + 1.0)))
    status, body = handler.post("odd:predict", json.dumps(
        {"signature_name": "predict_raw", "instances": [{"ad.id": "a", "9num": 2.0}]}).encode())
    assert status == 200 and np.ravel(body["predictions"])[0] == pytest.approx(want, rel=1e-6)  # the only output
    status, body = handler.post("odd:regress", json.dumps({"examples": [{"ad.id": "a", "9num": 2.0}]}).encode())
    assert status == 200 and body["results"][0] == pytest.approx(want, rel=1e-6)
    status, body = handler.post("odd:regress", json.dumps({"examples": [{"ad_id": "a", "arg_9num": 2.0}]}).encode())
    assert status == 400 and "unknown feature" in body["error"]


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
            # Every failure is recorded, a dropped connection too: an exception would only end this thread,
            # and the requests made before a server crash would still count as done.
            try:
                with httpx.Client(timeout=30) as c:
                    end = time.time() + 4
                    while time.time() < end:
                        r = c.post(url + ":predict", json=bodies[i % 2])
                        if r.status_code != 200 or len(r.json()["predictions"]) != len(bodies[i % 2]["instances"]):
                            errors.append(r.text)
                        done.append(1)
            except Exception as e:  # noqa: BLE001 - any failure of a client is a finding, reported below
                errors.append(f"client {i}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(done) >= 16  # each of the 8 clients got more than one answer
        assert proc.poll() is None, "the server exited under load"
        assert httpx.get(url, timeout=5).status_code == 200  # and still answers afterwards
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_startup_line_says_what_is_served_or_that_nothing_is(exported, tmp_path):
    """`ctrkit serve` printed nothing: a server with no loadable version looked like a working one."""
    from starlette.testclient import TestClient

    from ctrkit.serving.server import ModelRegistry, create_app, startup_line

    empty = ModelRegistry(str(tmp_path), "none", poll_seconds=0.5)
    empty.poll_once()
    assert startup_line(empty, "127.0.0.1", 8501) == (
        f"starting http://127.0.0.1:8501/v1/models/none with no loadable version of none in {tmp_path / 'none'} "
        "yet: it answers 404 until one appears (looking every 0.5 s)")
    shutil.copytree(exported["path"], tmp_path / "m" / "4")
    lines = []
    registry = ModelRegistry(str(tmp_path), "m", poll_seconds=0.2)
    with TestClient(create_app(registry, on_ready=lambda: lines.append(startup_line(registry, "h", 1)))):
        assert lines == [f"starting http://h:1/v1/models/m with m version(s) [4] loaded from {tmp_path / 'm'}"]


def test_a_version_that_failed_to_load_is_listed_with_its_error(exported, tmp_path):
    """It answered 404 "Could not find any versions", as if nothing had been exported; TF Serving lists it."""
    from starlette.testclient import TestClient

    from ctrkit.serving.server import ModelRegistry, create_app

    broken = tmp_path / "m" / "7"
    shutil.copytree(exported["path"], broken)
    (broken / "saved_model.pb").write_bytes(b"garbage")
    registry = ModelRegistry(str(tmp_path), "m", poll_seconds=0.2)
    with TestClient(create_app(registry)) as c:
        reply = c.get("/v1/models/m")
        assert reply.status_code == 200
        [status] = reply.json()["model_version_status"]
        assert status["version"] == "7" and status["state"] == "END"
        assert status["status"]["error_code"] == "UNKNOWN" and status["status"]["error_message"]
        assert c.post("/v1/models/m:predict", json={"instances": []}).status_code == 404
        shutil.rmtree(broken)  # gone from disk: no longer listed
        assert _wait_for(lambda: c.get("/v1/models/m").status_code == 404)


def test_serve_refuses_a_port_in_use_and_points_at_misplaced_versions(tmp_path, capsys):
    """A port in use failed after the models loaded, with uvicorn's raw error and exit 3; BASE given as
    BASE/NAME (TF Serving's --model_base_path form) or a mistyped name waited forever answering 404."""
    from ctrkit.cli import main
    from ctrkit.commands.serve import _misplaced_versions

    (tmp_path / "m" / "3").mkdir(parents=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path), "--model-name", "m", "--port", str(port)]) == 1
    assert f"port {port} on 127.0.0.1 is in use (another server?); choose another with --port" in capsys.readouterr().err
    assert _misplaced_versions(str(tmp_path), "m") is None
    assert _misplaced_versions(str(tmp_path / "m"), "m") == (
        f"{tmp_path / 'm'} itself holds versions [3]: ctrkit serve takes their parent, `ctrkit serve {tmp_path} "
        "--model-name m`")
    assert _misplaced_versions(str(tmp_path), "mm") == f"{tmp_path} holds no model 'mm', but versions of ['m']: check --model-name"
