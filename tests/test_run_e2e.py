"""`ctrkit run`, the README's main command: the whole chain on a small generated log, as a user runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROWS = 12_000


def _ctrkit(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctrkit.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("e2e") / "run")
    out = _ctrkit("run", "--rows", str(ROWS), "--days", "2", "--run-dir", path, "--no-progress")
    assert out.returncode == 0, f"ctrkit run failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    for i in range(1, 10):
        assert f"[{i}/9]" in out.stdout, f"stage {i} did not report progress:\n{out.stdout}"
    assert f"report: {path}/report.html" in out.stdout
    return path


@pytest.mark.slow
def test_chain_writes_data_models_versions_and_report(run_dir):
    from ctrkit.manifest import Manifest

    manifest = Manifest.load(os.path.join(run_dir, "data"))
    assert manifest.rows_read == ROWS == manifest.rows_written + manifest.rows_rejected
    assert len(manifest.windows) == 4  # 2 days of 12-hour windows
    for name in ("teacher", "student", "student_no_distillation", "student_seed2"):
        assert os.path.exists(os.path.join(run_dir, name, "model.keras")), name
    versions = sorted(int(v) for v in os.listdir(os.path.join(run_dir, "serving", "ctrkit")))
    assert len(versions) == 2, "one version after training, one after calibration"
    assert os.path.exists(os.path.join(run_dir, "serving", "ctrkit", str(versions[-1]), "saved_model.pb"))
    for name in ("report.html", "report.md", "progressive_auc.png", "progressive_logloss.png", "reliability.png"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 1000, name


@pytest.mark.slow
def test_the_student_run_dir_holds_the_calibrated_model(run_dir):
    # `ctrkit export RUN/student` must export what the run served last: the calibrated student.
    import keras
    import numpy as np

    from ctrkit.model import calibration_layer
    from ctrkit.trainer import load_run_model

    student = os.path.join(run_dir, "student")
    calibrated = calibration_layer(load_run_model(student)).get_weights()
    before = keras.saving.load_model(os.path.join(student, "model_uncalibrated.keras"), compile=False)
    assert any(not np.allclose(a, b) for a, b in zip(calibrated, calibration_layer(before).get_weights()))


@pytest.mark.slow
def test_export_of_a_runs_other_model_serves_that_model(run_dir, tmp_path):
    """`ctrkit export RUN --model RUN/model_uncalibrated.keras` must publish that model, not RUN's final one:
    the same as exporting the file alone with --data, and not the calibrated student."""
    import numpy as np
    import tensorflow as tf

    from ctrkit.serving.warmup import read_warmup

    student, data = os.path.join(run_dir, "student"), os.path.join(run_dir, "data")
    other = os.path.join(student, "model_uncalibrated.keras")
    served = {}
    for name, args in (("final", [student]), ("given", [student, "--model", other]),
                       ("alone", ["--model", other, "--data", data])):
        out = _ctrkit("export", *args, "--base-path", str(tmp_path), "--model-name", name, "--no-validate")
        assert out.returncode == 0, out.stderr[-3000:]
        (version,) = os.listdir(tmp_path / name)
        export_dir = str(tmp_path / name / version)
        requests = [r.predict_log.request for r in read_warmup(export_dir) if r.HasField("predict_log")]
        examples = max((tf.make_ndarray(q.inputs["examples"]) for q in requests if "examples" in q.inputs), key=len)
        loaded = tf.saved_model.load(export_dir)
        served[name] = loaded.signatures["serving_default"](examples=tf.constant(examples))["probabilities"].numpy()
    np.testing.assert_allclose(served["given"], served["alone"], rtol=0, atol=1e-6)
    assert np.abs(served["given"] - served["final"]).max() > 1e-3  # calibration moved the served predictions


@pytest.mark.slow
def test_calibration_and_pd_are_reported(run_dir):
    summary = json.load(open(os.path.join(run_dir, "summary.json"), encoding="utf-8"))
    after = summary["calibration"]["after"]["calibration"]
    assert abs(after - 1.0) < 0.02, f"calibration ratio after fitting is {after}"
    assert 0.0 < summary["pd"] < 2.0
    for model in ("teacher", "student (distilled)", "student (no distillation)"):
        assert 0.0 <= summary["final_metrics"][f"{model}, progressive (training windows)"]["auc"] <= 1.0
    # The held-out rows carry NE too (it was left blank), and the after row says the fit saw those examples.
    rows = {"before": "student, held-out, before calibration",
            "after": "student, held-out, after calibration (fitted on them)"}
    for when, row in rows.items():
        assert summary["final_metrics"][row]["ne"] == pytest.approx(summary["calibration"][when]["ne"])
    md = open(os.path.join(run_dir, "report.md"), encoding="utf-8").read()
    for section in ("Progressive validation over time", "Calibration", "Final metrics",
                    "prediction difference between seeds", "Model size", "Throughput"):
        assert section in md, section
    # What each figure covers is said where it is shown (PD's windows, MiB, the in-sample reliability curve).
    assert "student seed A vs seed B (held-out window(s) [" in md and "file_mib" in md
    assert "checkpoints, exports and teacher loads excluded" in md


@pytest.mark.slow
def test_run_report_renders_in_chromium(run_dir, tmp_path):
    import shutil

    browser = shutil.which("chromium")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("chromium not installed")
    shot = tmp_path / "run_report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1100,2400", "file://" + os.path.join(run_dir, "report.html")],
                   check=True, capture_output=True, timeout=120)
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.std() > 20 and (img < 128).mean() > 0.01, "the run report rendered blank"


def test_builtin_tsv_config_without_input_is_a_one_line_error(tmp_path):
    out = _ctrkit("run", "--config", "small", "--run-dir", str(tmp_path / "r"), timeout=120)
    assert out.returncode == 1
    assert "pass --input FILES" in out.stderr and "Traceback" not in out.stderr
