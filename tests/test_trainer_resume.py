"""Crash recovery for real: SIGKILL a `ctrkit train` process mid-run, resume it, check nothing is lost or repeated."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from ctrkit.testing import write_dataset

ROWS, WINDOWS = 1200, 3


def _jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


@pytest.mark.slow
def test_sigkill_then_resume_trains_every_example_exactly_once(tmp_path) -> None:
    data = write_dataset(tmp_path / "data", windows=WINDOWS, rows_per_window=ROWS, seed=5)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "kill",
        "model": {"embedding_dim": 4, "cross_layers": 1, "dnn_units": [8]},
        "train": {"batch_size": 50, "optimizer": "adagrad", "learning_rate": 0.05, "checkpoint_every_steps": 7},
    }))
    run = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "ctrkit.cli", "train", "--config", str(cfg), "--data", data.directory,
           "--run-dir", run, "--no-progress"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(cmd + ["--sleep-per-step", "0.05"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    batches = os.path.join(run, "batches.jsonl")
    latest = os.path.join(run, "checkpoints", "LATEST")
    deadline = time.time() + 240
    # Kill once a checkpoint exists and some batches were trained after it (they must be rolled back).
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(latest) and os.path.exists(batches) and len(_jsonl(batches)) % 7 >= 3 and len(_jsonl(batches)) > 20:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"trainer ended before it could be killed:\n{proc.stdout.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = len(_jsonl(batches))
    assert 20 < killed_at < WINDOWS * ROWS // 50

    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"trained {WINDOWS * ROWS} examples" in resumed.stdout

    log = _jsonl(batches)
    assert [b["step"] for b in log] == list(range(1, len(log) + 1))
    trained: list[tuple[int, int, int]] = []
    for b in log:
        trained += [(b["window"], b["shard"], r) for r in range(b["offset"], b["offset"] + b["count"])]
    assert len(trained) == len(set(trained)) == WINDOWS * ROWS  # none twice, none lost
    per_shard = {}
    for w, s, r in trained:
        per_shard[(w, s)] = per_shard.get((w, s), 0) + 1
    assert sum(per_shard.values()) == data.manifest.rows_written
    info = json.load(open(os.path.join(run, "run.json")))
    assert info["status"] == "completed" and info["examples"] == WINDOWS * ROWS
    windows = [ln for ln in _jsonl(os.path.join(run, "metrics.jsonl")) if ln["type"] == "window"]
    assert [w["window"]["examples"] for w in windows] == [ROWS] * WINDOWS


def test_run_stopped_by_max_steps_says_so_and_how_to_continue(tmp_path, capsys) -> None:
    """It printed the same lines as a finished run; `ctrkit export` then refused it without saying why."""
    from ctrkit.cli import main

    data = write_dataset(tmp_path / "data", windows=2, rows_per_window=200, seed=6)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"name": "stop", "model": {"embedding_dim": 2, "cross_layers": 1, "dnn_units": [4]},
                                   "train": {"batch_size": 50}}))
    args = ["train", "--config", str(cfg), "--data", data.directory, "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert main(args + ["--max-steps", "3"]) == 0
    assert "stopped at step 3 by --max-steps" in capsys.readouterr().out
    assert main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "trained 400 examples in 8 steps" in out and "stopped at step" not in out
