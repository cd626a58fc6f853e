"""What preprocess jobs leave beside their output: a killed job's work directory is removed by the next job on
the same output, a running job's is left alone (both told apart by the lock the job holds)."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from ctrkit.pipelines import runner

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="work-directory locks use flock")

HOLD_WORK_DIR = """
import sys, time
from ctrkit.pipelines.runner import _claim_work_dir
work = _claim_work_dir(sys.argv[1])
with open(work + "/part-00000.tfrecord", "wb") as f:
    f.write(b"x" * 4096)
print(work, flush=True)
time.sleep(600)
"""


def _job_holding_a_work_dir(output_dir: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_WORK_DIR, output_dir], stdout=subprocess.PIPE, text=True)
    work = proc.stdout.readline().strip()
    assert work and os.path.isdir(work), f"the helper job did not claim a work directory (exit {proc.poll()})"
    return proc, work


def test_a_killed_jobs_work_directory_is_removed_by_the_next_job(tmp_path, caplog):
    out = str(tmp_path / "out")
    proc, dead = _job_holding_a_work_dir(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(dead) and os.path.exists(dead + runner.LOCK_SUFFIX)  # SIGKILL runs no cleanup
    with caplog.at_level(logging.WARNING, logger="ctrkit.pipelines"):
        work = runner._prepare_output(out, overwrite=False)
    try:
        assert not os.path.exists(dead) and not os.path.exists(dead + runner.LOCK_SUFFIX)
        assert f"removed {dead}" in caplog.text and "killed before it finished" in caplog.text
        assert os.path.isdir(work) and work != dead and os.path.exists(work + runner.LOCK_SUFFIX)
    finally:
        os.rmdir(work)
        runner._release_work_dir(work)
    assert not os.path.exists(work + runner.LOCK_SUFFIX)
    assert sorted(os.listdir(tmp_path)) == []


def test_a_running_jobs_work_directory_is_left_alone(tmp_path, caplog):
    out = str(tmp_path / "out")
    proc, live = _job_holding_a_work_dir(out)
    try:
        with caplog.at_level(logging.WARNING, logger="ctrkit.pipelines"):
            work = runner._prepare_output(out, overwrite=False)
        assert os.listdir(live) == ["part-00000.tfrecord"] and work != live
        assert live not in caplog.text
        os.rmdir(work)
        runner._release_work_dir(work)
    finally:
        proc.kill()
        proc.wait()


def test_a_work_directory_without_a_lock_is_reported_not_removed(tmp_path, caplog):
    """Left by a ctrkit from before the locks: nothing tells whether its job still runs, so the user decides."""
    unknown = tmp_path / ".out.tmp-abc123"
    unknown.mkdir()
    (unknown / "part-00000.tfrecord").write_bytes(b"x" * (3 << 20))
    with caplog.at_level(logging.WARNING, logger="ctrkit.pipelines"):
        assert runner._clean_leftovers(str(tmp_path / "out")) == []
    assert unknown.is_dir()
    assert f"{unknown}: 3.0 MiB left by an earlier preprocess job" in caplog.text and "Delete it once" in caplog.text


def test_an_old_output_renamed_aside_by_a_killed_job_is_removed(tmp_path):
    stale, fresh = tmp_path / ".out.old-1", tmp_path / ".out.old-2"  # fresh: a running job is deleting it
    for d in (stale, fresh):
        (d / "output").mkdir(parents=True)
    past = time.time() - runner.STALE_ASIDE_S - 5
    os.utime(stale, (past, past))
    other = tmp_path / ".other.old-1"  # another output's: not ours to touch
    other.mkdir()
    os.utime(other, (past, past))
    assert runner._clean_leftovers(str(tmp_path / "out")) == [str(stale)]
    assert not stale.exists() and fresh.is_dir() and other.is_dir()


def test_a_lock_file_whose_directory_is_gone_is_removed(tmp_path):
    lock = tmp_path / f".out.tmp-xyz{runner.LOCK_SUFFIX}"  # a job killed between removing its directory and its lock
    lock.write_bytes(b"")
    assert runner._clean_leftovers(str(tmp_path / "out")) == []
    assert not lock.exists()


def test_claiming_retries_when_another_jobs_cleanup_unlinked_the_fresh_lock(tmp_path, monkeypatch):
    """Between creating its lock file and locking it, a job's file can look like a dead job's lock to another job's
    cleanup, which unlinks it: the job then takes another name instead of failing."""
    real_try_lock = runner._try_lock
    calls = []

    def lock_unlinked_first_time(path):
        calls.append(path)
        if len(calls) == 1:
            os.unlink(path)  # what the other job's cleanup did
        return real_try_lock(path)

    monkeypatch.setattr(runner, "_try_lock", lock_unlinked_first_time)
    work = runner._claim_work_dir(str(tmp_path / "out"))
    try:
        assert len(calls) == 2 and calls[1] == work + runner.LOCK_SUFFIX and os.path.isdir(work)
        assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(work), os.path.basename(calls[1])])
    finally:
        os.rmdir(work)
        runner._release_work_dir(work)
