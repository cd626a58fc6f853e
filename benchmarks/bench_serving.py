"""Serving latency and throughput: ctrkit's export (TFT graph inside) vs a bare reference, REST overhead, load.

Run: ``python3 -m pytest -n 0 -m benchmark benchmarks/bench_serving.py -s``. Writes ``benchmarks/out/serving.json``.
``CTRKIT_BENCH_LOAD_SECONDS`` sets each load phase's length (default 60).

Models (issue 5): the BARS-style DCN-V2 (``configs/bars_criteo.yaml``: embedding 10 per field, 3 full-rank
cross layers in parallel with a 500-500-500 ReLU DNN) built by ``ctrkit.model.build_model`` and exported by
``ctrkit.serving.export_model`` on a real pipeline output (``ctrkit.pipelines.preprocess`` on the 1,000-row
Criteo sample when ``../shared/data`` is there, else on synthetic Criteo-shaped rows). The reference is the
same architecture built from keras-rs ``FeatureCross`` and plain Keras layers, exported with only
``tf.io.parse_example`` of the *transformed* features in front (no TFT graph). Both SavedModels are loaded
in this process and called through ``serving_default`` on serialized ``tf.Example`` strings: raw rows for
ctrkit, the pipeline's transformed records for the reference.

Measurements (all in one run; calls alternate between the two models so machine load hits both alike):
  * batch 1: per-call latency, p50 and p99 over all calls, and the median of the per-repeat p50s;
  * batch 256: examples/s, median over repeats;
  * REST: ``ctrkit serve`` on 127.0.0.1, batch 1 sequential requests; overhead = REST p50 − in-process p50.
    The overhead is measured with the standard library's keep-alive ``http.client``, whose own cost per
    request is small; httpx is timed alongside (interleaved) and reported too: it alone adds ~1.3-1.4 ms per
    request on this machine, which is the client's cost, not the endpoint's;
  * load: 8 concurrent clients on loopback for N s at batch 1, then at batch 64: requests/s, p50/p99,
    errors, and the server's RSS sampled every second (stable = growth over the second half < 5 %).
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "out", "serving.json")
CRITEO_SAMPLE = os.path.join(os.path.dirname(ROOT), "shared", "data", "criteo_kaggle_head", "train_head.txt")
REPEATS = 5
CALLS_B1 = 300
CALLS_B256 = 12
LOAD_SECONDS = float(os.environ.get("CTRKIT_BENCH_LOAD_SECONDS", "60"))
TARGETS = {"ratio_b1_p50": 1.3, "ratio_b256_throughput": 1.3, "p99_b1_ms": 5.0, "rest_overhead_p50_ms": 2.0}


def _pipeline_output(work: str) -> tuple[str, str]:
    from ctrkit.pipelines import preprocess
    from ctrkit.schema import DataConfig

    source = "criteo_kaggle_head (real, 1,000 rows)"
    path = CRITEO_SAMPLE
    if not os.path.exists(path):
        from ctrkit import synthetic

        path = synthetic.write_tsv(synthetic.generate(2000, seed=0, timestamp=False), os.path.join(work, "syn.tsv"))
        source = "ctrkit.synthetic (2,000 rows)"
    preprocess(DataConfig(window_rows=10_000), [path], os.path.join(work, "pipeline"))
    return os.path.join(work, "pipeline"), source


def _reference_model(manifest, config):
    """The same DCN-V2 from keras-rs FeatureCross + plain Keras layers."""
    import keras
    import keras_rs

    m = config.model
    inputs, parts = {}, []
    for f in sorted(manifest.categorical_features, key=lambda f: f.name):
        inputs[f.name] = keras.Input(shape=(), dtype="int64", name=f.name)
        parts.append(keras.layers.Embedding(f.vocab_size, m.embedding_dim)(inputs[f.name]))
    for f in manifest.numeric_features:
        inputs[f.name] = keras.Input(shape=(), dtype="float32", name=f.name)
        parts.append(keras.layers.Reshape((1,))(inputs[f.name]))
    x0 = keras.layers.Concatenate()(parts)
    cross = x0
    for _ in range(m.cross_layers):
        cross = keras_rs.layers.FeatureCross()(x0, cross)
    deep = x0
    for units in m.dnn_units:
        deep = keras.layers.Dense(units, activation=m.activation)(deep)
    logits = keras.layers.Dense(1)(keras.layers.Concatenate()([cross, deep]))
    logits = keras.layers.Dense(1)(logits)  # temperature scaling a·logit + b, as ctrkit's calibration
    return keras.Model(inputs, {"logits": logits, "probabilities": keras.layers.Activation("sigmoid")(logits)})


def _export_reference(model, manifest, path: str) -> None:
    import tensorflow as tf

    spec = manifest.transformed_feature_spec(include_label=False)

    class Reference(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")], autograph=False)
        def serve(self, examples):
            out = self.model(tf.io.parse_example(examples, spec), training=False)
            return {"logits": out["logits"], "probabilities": out["probabilities"]}

    module = Reference()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve.get_concrete_function()})


def _latencies(fn, batch, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn(examples=batch)["probabilities"].numpy()
        out.append(time.perf_counter() - t)
    return out


def _pct(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _load_phase(url: str, body: dict, clients: int, seconds: float, pid: int) -> dict:
    import httpx

    lat, errors, rss = [], [], []
    stop = time.time() + seconds
    payload = json.dumps(body).encode()

    def worker():
        with httpx.Client(timeout=30, headers={"content-type": "application/json"}) as c:
            while time.time() < stop:
                t = time.perf_counter()
                try:
                    r = c.post(url, content=payload)
                    ok = r.status_code == 200 and len(r.json()["predictions"]) == len(body["instances"])
                except Exception as e:  # noqa: BLE001 - count every failure
                    ok, r = False, e
                lat.append(time.perf_counter() - t)
                if not ok:
                    errors.append(str(getattr(r, "text", r))[:200])

    def sampler():
        while time.time() < stop:
            rss.append(_rss_mb(pid))
            time.sleep(1.0)

    threads = [threading.Thread(target=worker) for _ in range(clients)] + [threading.Thread(target=sampler)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t0
    half = rss[len(rss) // 2] if rss else float("nan")
    growth = (rss[-1] - half) / half if rss else float("nan")
    return {
        "batch": len(body["instances"]),
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": len(lat),
        "errors": len(errors),
        "error_samples": errors[:3],
        "requests_per_s": round(len(lat) / elapsed, 1),
        "examples_per_s": round(len(lat) * len(body["instances"]) / elapsed, 1),
        "p50_ms": round(_pct(lat, 50), 2),
        "p99_ms": round(_pct(lat, 99), 2),
        "rss_mb_start_mid_end": [round(rss[0], 1), round(half, 1), round(rss[-1], 1)] if rss else [],
        "rss_growth_second_half": round(growth, 4),
    }


@pytest.mark.benchmark
def test_serving_latency_throughput_rest_and_load():
    import keras
    import tensorflow as tf

    from ctrkit.config import load_config
    from ctrkit.manifest import Manifest
    from ctrkit.model import build_model
    from ctrkit.serving.export import export_model, raw_rows_from_manifest
    from ctrkit.serving.signatures import serving_parse_spec, read_raw_feature_spec
    from ctrkit.serving.warmup import serialize_rows

    work = tempfile.mkdtemp(prefix="ctrkit-bench-serving-")
    pipeline, source = _pipeline_output(work)
    manifest = Manifest.load(pipeline)
    config = load_config("bars_criteo")
    keras.utils.set_random_seed(0)
    ours = build_model(config, manifest)
    reference = _reference_model(manifest, config)
    base = os.path.join(work, "models")
    t = time.time()
    ours_path = export_model(ours, manifest, base, "ctr")
    export_s = time.time() - t
    ref_path = os.path.join(work, "reference")
    _export_reference(reference, manifest, ref_path)

    import tensorflow_transform as tft

    spec = serving_parse_spec(read_raw_feature_spec(tft.TFTransformOutput(pipeline)), exclude=[manifest.label])
    raw = serialize_rows(raw_rows_from_manifest(manifest, 256), spec)
    shard = manifest.shard_paths(manifest.windows[0])
    transformed = [r.numpy() for r in tf.data.TFRecordDataset(shard, compression_type="GZIP").take(256)]
    assert len(raw) == len(transformed) == 256
    fns = {
        "ctrkit": (tf.saved_model.load(ours_path).signatures["serving_default"], raw),
        "reference": (tf.saved_model.load(ref_path).signatures["serving_default"], transformed),
    }
    b1 = {k: [] for k in fns}
    b1_p50s = {k: [] for k in fns}
    b256 = {k: [] for k in fns}
    for k, (fn, ex) in fns.items():  # warm up both
        _latencies(fn, tf.constant(ex[:1]), 50)
        _latencies(fn, tf.constant(ex), 3)
    for r in range(REPEATS):
        # Calls alternate model by model (and which goes first flips every repeat), so the load other
        # tenants put on this shared machine hits both models alike.
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        lat = {k: [] for k in fns}
        singles = {k: [tf.constant(ex[i : i + 1]) for i in range(len(ex))] for k, (_, ex) in fns.items()}
        for i in range(CALLS_B1):
            for k in order:
                lat[k] += _latencies(fns[k][0], singles[k][i % len(singles[k])], 1)
        spent = {k: 0.0 for k in fns}
        batches = {k: tf.constant(ex) for k, (_, ex) in fns.items()}
        for _ in range(CALLS_B256):
            for k in order:
                spent[k] += sum(_latencies(fns[k][0], batches[k], 1))
        for k in fns:
            b1[k] += lat[k]
            b1_p50s[k].append(_pct(lat[k], 50))
            b256[k].append(256 * CALLS_B256 / spent[k])

    inproc = {
        k: {
            "b1_p50_ms": round(_pct(b1[k], 50), 3),
            "b1_p99_ms": round(_pct(b1[k], 99), 3),
            "b1_median_of_repeat_p50_ms": round(statistics.median(b1_p50s[k]), 3),
            "b256_examples_per_s": round(statistics.median(b256[k]), 1),
        }
        for k in fns
    }

    # REST: the real `ctrkit serve` process on loopback.
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "ctrkit.cli", "serve", base, "--model-name", "ctr", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    url = f"http://127.0.0.1:{port}/v1/models/ctr"
    try:
        import httpx

        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.time() < deadline, "ctrkit serve did not come up"
            time.sleep(0.5)
        bodies = [{"instances": [{"b64": base64.b64encode(e).decode()}]} for e in raw]
        payloads = [json.dumps(b) for b in bodies]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def post_stdlib(payload: str) -> int:
            conn.request("POST", "/v1/models/ctr:predict", body=payload, headers={"content-type": "application/json"})
            r = conn.getresponse()
            r.read()
            return r.status

        clients = {"stdlib": post_stdlib}
        with httpx.Client(timeout=30, headers={"content-type": "application/json"}) as c:
            clients["httpx"] = lambda payload: c.post(url + ":predict", content=payload).status_code
            for post in clients.values():
                for p in payloads[:50]:
                    post(p)
            rest_lat = {k: [] for k in clients}
            rest_p50s = {k: [] for k in clients}
            for _ in range(REPEATS):
                lat = {k: [] for k in clients}
                for i in range(CALLS_B1):
                    for k, post in clients.items():  # interleaved, like the in-process models
                        t = time.perf_counter()
                        status = post(payloads[i % len(payloads)])
                        lat[k].append(time.perf_counter() - t)
                        assert status == 200
                for k in clients:
                    rest_lat[k] += lat[k]
                    rest_p50s[k].append(_pct(lat[k], 50))
        conn.close()
        rest = {
            "client": "http.client (stdlib, keep-alive); httpx alongside",
            "b1_p50_ms": round(_pct(rest_lat["stdlib"], 50), 3),
            "b1_p99_ms": round(_pct(rest_lat["stdlib"], 99), 3),
            "b1_median_of_repeat_p50_ms": round(statistics.median(rest_p50s["stdlib"]), 3),
            "httpx_b1_p50_ms": round(_pct(rest_lat["httpx"], 50), 3),
        }
        rest["overhead_p50_ms"] = round(rest["b1_p50_ms"] - inproc["ctrkit"]["b1_p50_ms"], 3)
        rest["overhead_p50_ms_httpx_client"] = round(rest["httpx_b1_p50_ms"] - inproc["ctrkit"]["b1_p50_ms"], 3)
        load = [
            _load_phase(url + ":predict", bodies[0], 8, LOAD_SECONDS, server.pid),
            _load_phase(
                url + ":predict",
                {"instances": [{"b64": base64.b64encode(e).decode()} for e in raw[:64]]},
                8,
                LOAD_SECONDS,
                server.pid,
            ),
        ]
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    ratios = {
        "b1_p50_ctrkit_over_reference": round(inproc["ctrkit"]["b1_p50_ms"] / inproc["reference"]["b1_p50_ms"], 3),
        "b256_reference_over_ctrkit_throughput": round(
            inproc["reference"]["b256_examples_per_s"] / inproc["ctrkit"]["b256_examples_per_s"], 3
        ),
    }
    met = {
        "b1_p50_within_1.3x": ratios["b1_p50_ctrkit_over_reference"] <= TARGETS["ratio_b1_p50"],
        "b256_within_1.3x": ratios["b256_reference_over_ctrkit_throughput"] <= TARGETS["ratio_b256_throughput"],
        "b1_p99_le_5ms": inproc["ctrkit"]["b1_p99_ms"] <= TARGETS["p99_b1_ms"],
        "rest_overhead_le_2ms": rest["overhead_p50_ms"] <= TARGETS["rest_overhead_p50_ms"],
        "load_zero_errors": all(p["errors"] == 0 for p in load),
        "load_memory_stable": all(abs(p["rss_growth_second_half"]) < 0.05 for p in load),
    }
    report = {
        "benchmark": "serving",
        "data": source,
        "model": "bars_criteo (DCN-V2 parallel, 3 full cross layers, DNN 500-500-500, emb 10)",
        "params": {"ctrkit": int(ours.count_params()), "reference": int(reference.count_params())},
        "export_seconds_with_validation": round(export_s, 1),
        "in_process": inproc,
        "ratios": ratios,
        "rest": rest,
        "load": load,
        "targets": TARGETS,
        "met": met,
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    print(f"wrote {OUT}")
    # Correctness is a hard requirement; speed targets are reported (met/not met) for the closing note.
    assert met["load_zero_errors"], load
