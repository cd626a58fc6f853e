"""The README's copy-paste examples run as written (the blocks marked `<!-- tested: NAME -->`)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _blocks() -> dict[str, tuple[str, str]]:
    text = open(README, encoding="utf-8").read()
    found = re.findall(r"<!-- tested: ([\w-]+) -->\n```(\w+)\n(.*?)```", text, flags=re.S)
    return {name: (lang, code) for name, lang, code in found}


def _run(lang: str, code: str, cwd: str, timeout: int) -> subprocess.CompletedProcess:
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"README example failed (exit {out.returncode}):\n{code}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_readme_marks_the_three_ways():
    assert set(_blocks()) == {"beam-cli", "layers", "serving", "daily"}


def test_layers_example(tmp_path):
    lang, code = _blocks()["layers"]
    out = _run(lang, code, str(tmp_path), 300)
    assert "(8, " in out.stdout  # the DCN body's output shape is printed


@pytest.mark.slow
def test_beam_then_serving_examples(tmp_path):
    """The Beam job's output feeds the TF Serving example, exactly as a reader would run them in order."""
    lang, code = _blocks()["beam-cli"]
    _run(lang, code, str(tmp_path), 600)
    from ctrkit.manifest import Manifest

    manifest = Manifest.load(str(tmp_path / "prep"))
    assert manifest.rows_read == 6000 and manifest.rows_written + manifest.rows_rejected == 6000

    lang, code = _blocks()["serving"]
    out = _run(lang, code, str(tmp_path), 900)
    # The last line is the :regress response: TF Serving's {"results": [p]} with a probability.
    response = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(response["results"]) == 1 and 0.0 < response["results"][0] < 1.0
    versions = os.listdir(tmp_path / "models" / "ctr")
    assert len(versions) == 1 and versions[0].isdigit()

    lang, code = _blocks()["daily"]
    out = _run(lang, code, str(tmp_path), 900)
    day2 = json.load(open(tmp_path / "run_day2" / "run.json", encoding="utf-8"))
    assert day2["warm_start"] == str(tmp_path / "run") and day2["status"] == "completed"
    assert json.load(open(tmp_path / "run_day2" / "calibration.json"))["windows"] == ["w00000002"]
    # Recorded absolute, so `ctrkit export` finds its warmup rows from any directory (it failed from another).
    assert Manifest.load(str(tmp_path / "prep_day2")).config["inputs"] == [str(tmp_path / "clicks_day2.tsv")]
    assert "(held out)" in out.stdout and "not held out" not in out.stderr
    later = sorted(int(v) for v in os.listdir(tmp_path / "models" / "ctr"))
    assert len(later) == 2 and later[0] == int(versions[0])  # the calibrated day-2 model is the newest version
