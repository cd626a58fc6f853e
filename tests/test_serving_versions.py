"""TF Serving's version layout: atomic publish, increasing versions, pruning (no TensorFlow needed)."""
from __future__ import annotations

import os
import time
import types

import pytest

from ctrkit.serving import versions


def _fake_savedmodel(d: str) -> str:
    os.makedirs(os.path.join(d, "variables"), exist_ok=True)
    for name in ("saved_model.pb", os.path.join("variables", "variables.index")):
        with open(os.path.join(d, name), "wb") as f:
            f.write(b"x")
    return d


def test_staged_exports_are_invisible_until_published(tmp_path):
    path = versions.model_dir(str(tmp_path), "m")
    staged = _fake_savedmodel(versions.staging_dir(path))
    assert versions.list_versions(path) == []  # a half-written export is not a version
    v = versions.next_version(path)
    final = versions.publish(staged, path, v)
    assert versions.list_versions(path) == [v]
    assert final == os.path.join(path, str(v)) and not os.path.exists(staged)


def test_publish_refuses_incomplete_savedmodel(tmp_path):
    path = versions.model_dir(str(tmp_path), "m")
    staged = versions.staging_dir(path)
    with open(os.path.join(staged, "saved_model.pb"), "wb") as f:
        f.write(b"x")  # no variables/variables.index yet
    with pytest.raises(ValueError, match="not a complete SavedModel"):
        versions.publish(staged, path, 1)
    assert versions.list_versions(path) == []


def test_versions_increase_even_after_pruning(tmp_path):
    path = versions.model_dir(str(tmp_path), "m")
    seen = []
    for _ in range(4):
        v = versions.next_version(path)
        versions.publish(_fake_savedmodel(versions.staging_dir(path)), path, v)
        versions.prune(path, keep=2)
        seen.append(v)
    assert seen == sorted(set(seen))
    assert versions.list_versions(path) == seen[-2:]
    assert not [d for d in os.listdir(path) if d.startswith(versions.TMP_PREFIX)]


def test_explicit_version_must_exceed_latest(tmp_path):
    path = versions.model_dir(str(tmp_path), "m")
    versions.publish(_fake_savedmodel(versions.staging_dir(path)), path, 7)
    with pytest.raises(ValueError, match="not above the latest version 7"):
        versions.next_version(path, 7)
    assert versions.next_version(path, 8) == 8


def test_non_integer_entries_are_not_versions(tmp_path):
    path = versions.model_dir(str(tmp_path), "m")
    for d in ("3", "10", "tmp", ".tmp-x", "2a"):
        os.makedirs(os.path.join(path, d))
    assert versions.list_versions(path) == [3, 10]
    with pytest.raises(ValueError):
        versions.model_dir(str(tmp_path), "../escape")
    with pytest.raises(ValueError, match=r"holds \* \? or \[, which TensorFlow reads as a file pattern"):
        versions.model_dir(str(tmp_path / "models[1]"), "m")  # the export's reload check failed on it


def test_prune_survives_a_doomed_directory_a_killed_rmtree_left(tmp_path):
    path = versions.model_dir(str(tmp_path), "m")
    for v in (1, 2):
        versions.publish(_fake_savedmodel(versions.staging_dir(path)), path, v)
    # An earlier prune of version 1 was killed mid-rmtree, under the name older code always used.
    _fake_savedmodel(os.path.join(path, ".tmp-deleting-1"))
    versions.publish(_fake_savedmodel(versions.staging_dir(path)), path, 3)
    assert versions.prune(path, keep=2) == [1]
    assert versions.list_versions(path) == [2, 3]


def test_clean_stale_staging_spares_fresh_work_and_removes_leftovers(tmp_path):
    path = versions.model_dir(str(tmp_path), "m")
    fresh_staging = _fake_savedmodel(versions.staging_dir(path))  # a concurrent export still writing
    old_staging = _fake_savedmodel(versions.staging_dir(path))  # a crashed export's
    killed_prune = _fake_savedmodel(os.path.join(path, ".tmp-deleting-4"))  # a killed rmtree's
    fresh_prune = _fake_savedmodel(os.path.join(path, ".tmp-deleting-5-abc"))  # a concurrent prune's
    now = time.time()
    os.utime(old_staging, (now - 7200, now - 7200))  # over STALE_STAGING_S (1 h)
    os.utime(killed_prune, (now - 300, now - 300))  # over STALE_DELETING_S (1 min)
    assert sorted(versions.clean_stale_staging(path)) == sorted([old_staging, killed_prune])
    assert os.path.isdir(fresh_staging) and os.path.isdir(fresh_prune)


def test_publish_latest_repicks_a_version_taken_meanwhile(tmp_path, monkeypatch):
    monkeypatch.setattr(versions, "time", types.SimpleNamespace(time=lambda: 1000.0))
    path = versions.model_dir(str(tmp_path), "m")
    chosen = versions.next_version(path)  # picked before a long save...
    assert chosen == 1000
    versions.publish(_fake_savedmodel(versions.staging_dir(path)), path, chosen)  # ...another exporter wins
    relabelled = []
    final = versions.publish_latest(_fake_savedmodel(versions.staging_dir(path)), path, chosen, relabelled.append)
    assert final == os.path.join(path, "1001") and relabelled == [1001]
    assert versions.list_versions(path) == [1000, 1001]
    # Unchanged when the chosen version is still free and above the rest.
    staged = _fake_savedmodel(versions.staging_dir(path))
    assert versions.publish_latest(staged, path, 1005) == os.path.join(path, "1005")


def test_prune_removes_only_savedmodels_under_their_own_names(tmp_path):
    """A base path shared with other files: all-digit folders that are not SavedModels stay (they were
    deleted as old versions), and a zero-padded version goes under its real name (pruning "01" failed)."""
    path = versions.model_dir(str(tmp_path), "m")
    for name in ("1", "2"):  # someone's yearly reports, not models
        os.makedirs(os.path.join(path, name))
        with open(os.path.join(path, name, "summary.csv"), "w") as f:
            f.write("a,b\n")
    _fake_savedmodel(os.path.join(path, "03"))
    for v in (4, 5):
        versions.publish(_fake_savedmodel(versions.staging_dir(path)), path, v)
    assert versions.prune(path, keep=2) == [3]
    assert sorted(os.listdir(path)) == ["1", "2", "4", "5"]
    assert os.path.isfile(os.path.join(path, "1", "summary.csv"))
