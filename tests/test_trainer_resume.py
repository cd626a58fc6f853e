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
    out = capsys.readouterr().out
    # the advice must not loop: "--resume" with the same --max-steps stops at the same step
    assert "stopped at step 3 by --max-steps" in out and "--resume and a larger --max-steps (or none)" in out
    assert main(args + ["--resume", "--max-steps", "2"]) == 0
    assert "already at step 3, past --max-steps 2: nothing was trained" in capsys.readouterr().out
    assert main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "trained 400 examples in 8 steps" in out and "stopped at step" not in out
    assert main(args + ["--resume"]) == 0
    assert "had already finished: nothing to resume" in capsys.readouterr().out


def _small_run(tmp_path):
    data = write_dataset(tmp_path / "data", windows=2, rows_per_window=200, seed=6)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"name": "lock", "model": {"embedding_dim": 2, "cross_layers": 1, "dnn_units": [4]},
                                   "train": {"batch_size": 50, "checkpoint_every_steps": 3}}))
    return data, ["train", "--config", str(cfg), "--data", data.directory, "--run-dir", str(tmp_path / "run"),
                  "--no-progress"]


def test_a_second_writer_is_refused_while_a_run_trains(tmp_path, capsys) -> None:
    """--resume while the first process still trained was accepted: the two interleaved logs and checkpoints
    (25 of 96 batches logged) and both exited 0. Here another process holds the run, as a training one does."""
    from ctrkit.cli import main

    data, args = _small_run(tmp_path)
    assert main(args + ["--max-steps", "3"]) == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from ctrkit.trainer import run_dir_lock\n"
         f"with run_dir_lock({str(tmp_path / 'run')!r}, 'ctrkit train'):\n print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(args + ["--resume"]) == 1
        assert f"{tmp_path / 'run'} is in use by ctrkit train (pid {holder.pid})" in capsys.readouterr().err
        assert len(_jsonl(str(tmp_path / "run" / "batches.jsonl"))) == 3  # untouched
    finally:
        holder.communicate("", timeout=60)
    assert main(args + ["--resume"]) == 0  # the lock went with its process
    assert len(_jsonl(str(tmp_path / "run" / "batches.jsonl"))) == 8


def test_a_run_that_stopped_before_its_first_checkpoint_starts_over_on_resume(tmp_path, capsys) -> None:
    """Neither a new start ("already holds a run") nor --resume ("no checkpoint") was accepted."""
    import shutil

    from ctrkit.cli import main

    data, args = _small_run(tmp_path)
    assert main(args + ["--max-steps", "2"]) == 0  # before the first checkpoint at step 3 ...
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # ... as if it had been killed there
    capsys.readouterr()
    assert main(args) == 1
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert "trained 400 examples in 8 steps" in capsys.readouterr().out
    assert [b["step"] for b in _jsonl(str(tmp_path / "run" / "batches.jsonl"))] == list(range(1, 9))
    assert len(os.listdir(tmp_path / "run" / "tensorboard")) == 1  # not the abandoned attempt's events too
    assert main(args[:-3] + ["--run-dir", str(tmp_path / "never"), "--no-progress", "--resume"]) == 1
    assert "holds no run to resume" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()  # a mistyped --run-dir is not created


def test_a_run_killed_after_its_final_checkpoint_is_completed_on_resume(tmp_path, capsys) -> None:
    """run.json stayed "running" with no model or metrics for good, and the CLI spoke of --max-steps."""
    from ctrkit.cli import main

    data, args = _small_run(tmp_path)
    assert main(args) == 0
    run_json = tmp_path / "run" / "run.json"
    done = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({**done, "status": "running", "model": None, "metrics": {}}))  # the kill
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "had already finished" in out and "--max-steps" not in out
    assert f"AUC {done['metrics']['auc']:.4f}" in out
    repaired = json.loads(run_json.read_text())
    assert repaired["status"] == "completed" and repaired["model"] == done["model"]
    assert repaired["metrics"] == done["metrics"]


@pytest.mark.parametrize("damage", ["cut", "flipped"])
def test_a_damaged_checkpoint_is_named_with_the_older_one_to_use(tmp_path, capsys, damage) -> None:
    from ctrkit.cli import main

    data, args = _small_run(tmp_path)
    assert main(args + ["--max-steps", "7"]) == 0  # checkpoints at steps 3 and 6, and 7 at the stop
    ckpts = tmp_path / "run" / "checkpoints"
    newest = ckpts / (ckpts / "LATEST").read_text().strip()
    state = newest / "state.npz"
    if damage == "cut":
        state.write_bytes(b"PK\x03\x04 cut")
    else:  # the zip's directory intact, one array's bytes not: found when that array is read (CRC)
        raw = bytearray(state.read_bytes())
        raw[len(raw) // 3] ^= 0xFF
        state.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(args + ["--resume"]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is damaged" in err and "an older checkpoint is kept (ckpt-" in err
    assert "Traceback" not in err


def test_without_fcntl_the_run_is_unlocked_with_a_warning(tmp_path, monkeypatch) -> None:
    from ctrkit.errors import CtrkitWarning
    from ctrkit.trainer import run_dir_lock

    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows: importing it fails
    with pytest.warns(CtrkitWarning, match="cannot lock the run directory on this platform"):
        with run_dir_lock(str(tmp_path / "run"), "ctrkit train"):
            pass
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_checkpoint_is_durable_before_latest_names_it(tmp_path, monkeypatch) -> None:
    """Renames survive a kill; a power loss also needs the files and their directories synced, in order:
    the logs the checkpoint counts, its files, its rename, then LATEST."""
    from ctrkit.trainer import train

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    data = write_dataset(tmp_path / "data", windows=1, rows_per_window=100, seed=6)
    from ctrkit.config import Config

    cfg = Config.from_dict({"name": "sync", "model": {"embedding_dim": 2, "cross_layers": 1, "dnn_units": [4]},
                            "train": {"batch_size": 50, "checkpoint_every_steps": 1000}})
    run = tmp_path / "run"
    train(cfg, data.directory, str(run), progress=False, max_steps=1)
    ckpts = str(run / "checkpoints")
    order = [p for p in synced if p.startswith(str(run))]
    first_ckpt = next(i for i, p in enumerate(order) if p.startswith(ckpts + "/ckpt-") and p.endswith("meta.json"))
    assert {str(run / "batches.jsonl"), str(run / "metrics.jsonl")} <= set(order[:first_ckpt])
    rest = order[first_ckpt:]
    assert rest[1].endswith(".tmp") and rest[2] == ckpts  # the checkpoint's directory, then its rename
    assert rest[3] == ckpts + "/LATEST.tmp" and rest[4] == ckpts


@pytest.mark.slow
def test_sigterm_stops_training_as_interrupted_and_it_resumes(tmp_path) -> None:
    """SIGTERM (a scheduler, `kill PID`) killed the process at once: no message, exit 143, and run.json said
    "running" for good."""
    data, args = _small_run(tmp_path)
    cmd = [sys.executable, "-m", "ctrkit.cli", *args, "--sleep-per-step", "0.2"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    batches = tmp_path / "run" / "batches.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (batches.exists() and len(_jsonl(str(batches))) >= 2):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "ctrkit train: terminated (SIGTERM); continue it with the same command and --resume" in err
    assert json.load(open(tmp_path / "run" / "run.json"))["status"] == "interrupted"
    from ctrkit.errors import InputError
    from ctrkit.trainer import load_run_model

    with pytest.raises(InputError, match=r"has no model.keras yet: the run's status is 'interrupted'.*--resume"):
        load_run_model(str(tmp_path / "run"))  # what export and calibrate say ("not a finished run" before)
    resumed = subprocess.run([sys.executable, "-m", "ctrkit.cli", *args, "--resume"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [b["step"] for b in _jsonl(str(batches))] == list(range(1, 9))


def test_home_in_path_arguments_is_expanded(tmp_path, monkeypatch, capsys) -> None:
    """The shell leaves `--run-dir=~/run` alone, and ctrkit created a directory named `~` in the working one."""
    from ctrkit.cli import main

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config=~/nope.yaml", "--data=~/prep", "--run-dir=~/run"]) == 1
    assert f"config file {tmp_path / 'home' / 'nope.yaml'} not found" in capsys.readouterr().err
    assert not (tmp_path / "~").exists()


def test_calibrate_on_a_directory_that_is_no_run_says_so(tmp_path, capsys) -> None:
    """It blamed a config file the user never gave: "config file prep/config.yaml not found"."""
    from ctrkit.cli import main

    data, _ = _small_run(tmp_path)
    assert main(["calibrate", data.directory, "--data", data.directory, "--no-progress"]) == 1
    assert f"{data.directory} has no run.json: not a ctrkit run directory" in capsys.readouterr().err


_CHECKPOINT_MEMORY = r"""
import json, os, sys
import numpy as np
from ctrkit.config import Config
from ctrkit.manifest import Manifest, TransformedFeature, Window
from ctrkit.metrics import ProgressiveValidation
from ctrkit.model import build_model
from ctrkit.trainer import _State, _latest_checkpoint, _load_checkpoint, _save_checkpoint, make_optimizer

def kib(field):  # this process's current (VmRSS) or peak (VmHWM) resident memory
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

mode, ckpt_dir = sys.argv[1], sys.argv[2]
cfg = Config.from_dict({"name": "mem", "model": {"embedding_dim": 16, "cross_layers": 1, "dnn_units": [8]},
                        "train": {"optimizer": "adam"}})
feats = tuple(TransformedFeature(f"c{i}", "categorical", vocab_size=400_000) for i in range(4))
manifest = Manifest(features=feats, label="label", windows=(Window("w", ("none",), 1),), rows_read=1,
                    rows_written=1, rows_rejected=0)
model = build_model(cfg, manifest)
state = _State(model, make_optimizer(cfg, model), ProgressiveValidation())
state_bytes = sum(v.numpy().nbytes for v in list(model.weights) + state.optimizer.slot_variables())
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
except OSError as e:
    print(json.dumps({"skip": f"cannot reset the peak RSS: {e}"}))
    sys.exit(0)
before = kib("VmRSS")
if mode == "save":
    _save_checkpoint(ckpt_dir, state, {"step": 1}, keep=1)
else:
    path = _latest_checkpoint(os.path.dirname(ckpt_dir))
    with _load_checkpoint(path) as (arrays, meta):
        state.restore(arrays, meta["weight_names"], path)
print(json.dumps({"extra": (kib("VmHWM") - before) * 1024, "state": state_bytes}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak RSS")
def test_saving_and_restoring_a_checkpoint_holds_one_table_not_a_copy_of_the_state(tmp_path) -> None:
    """A checkpoint used to copy every weight and slot into memory before writing the first byte, and a
    resume or warm start loaded the whole file before assigning: a model that fitted with headroom was
    killed at its first save. Now each is read, written or assigned one variable at a time."""
    script = tmp_path / "mem.py"
    script.write_text(_CHECKPOINT_MEMORY)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    ckpt = str(tmp_path / "run" / "checkpoints")
    for mode in ("save", "restore"):
        out = subprocess.run([sys.executable, str(script), mode, ckpt], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        if "skip" in measured:
            pytest.skip(measured["skip"])
        # 4 tables x 400k x 16 floats, times 3 with Adam's two slots: ~307 MB of state, ~26 MB per table.
        assert measured["extra"] < 0.45 * measured["state"], (mode, measured)  # before: 0.97x and 1.18x
