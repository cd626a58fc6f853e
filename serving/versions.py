"""TF Serving's on-disk layout ``BASE/NAME/<version>/``: listing, publishing atomically, pruning.

TF Serving (and :mod:`ctrkit.serving.server`) treat every all-digit child of ``BASE/NAME`` as a version
and load the highest ones. A version must therefore appear complete or not at all: exports are written to
a hidden sibling directory (``.tmp-…``, not all digits, so ignored by both servers) and renamed into place
with one ``os.rename`` on the same filesystem.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

TMP_PREFIX = ".tmp-"


def model_dir(base_path: str, model_name: str) -> str:
    if not model_name or os.sep in model_name or model_name.startswith("."):
        raise ValueError(f"model name {model_name!r} must be a plain, non-hidden directory name")
    return os.path.join(base_path, model_name)


def list_versions(path: str) -> list[int]:
    """Integer versions under ``path`` (= BASE/NAME), ascending; other entries are ignored as TF Serving does."""
    if not os.path.isdir(path):
        return []
    return sorted(int(d) for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d)))


def is_complete(version_dir: str) -> bool:
    """Whether a version directory holds a whole SavedModel (graph and variable index present)."""
    return os.path.isfile(os.path.join(version_dir, "saved_model.pb")) and (
        os.path.isfile(os.path.join(version_dir, "variables", "variables.index"))
    )


def next_version(path: str, version: int | None = None) -> int:
    """The version to write next: ``version`` if given (must exceed every existing one), else
    max(existing + 1, unix seconds), so versions keep increasing even after old ones were pruned."""
    existing = list_versions(path)
    latest = existing[-1] if existing else 0
    if version is not None:
        if version <= latest:
            raise ValueError(f"version {version} is not above the latest version {latest} in {path}")
        return int(version)
    return max(latest + 1, int(time.time()))


def staging_dir(path: str) -> str:
    """A fresh hidden directory under ``path`` to write a version into before publishing it."""
    os.makedirs(path, exist_ok=True)
    return tempfile.mkdtemp(prefix=TMP_PREFIX, dir=path)


def publish(staged: str, path: str, version: int) -> str:
    """Rename a fully written ``staged`` directory to ``path/<version>`` (atomic on one filesystem)."""
    if not is_complete(staged):
        raise ValueError(f"{staged} is not a complete SavedModel; refusing to publish it")
    final = os.path.join(path, str(version))
    if os.path.exists(final):
        raise FileExistsError(f"version directory {final} already exists")
    os.chmod(staged, 0o755)  # mkdtemp creates 0700; a serving container may run as another user
    os.rename(staged, final)
    return final


def prune(path: str, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` versions; returns the versions removed."""
    if keep < 1:
        raise ValueError(f"keep_versions must be >= 1, got {keep}")
    versions = list_versions(path)
    removed = versions[:-keep]
    for v in removed:
        # Rename first so a server scanning the directory never sees a half-deleted version.
        doomed = os.path.join(path, f"{TMP_PREFIX}deleting-{v}")
        os.rename(os.path.join(path, str(v)), doomed)
        shutil.rmtree(doomed)
    return removed


def clean_stale_staging(path: str, older_than_s: float = 3600.0) -> list[str]:
    """Remove staging directories left by crashed exports (older than ``older_than_s``)."""
    removed = []
    if not os.path.isdir(path):
        return removed
    now = time.time()
    for d in os.listdir(path):
        full = os.path.join(path, d)
        if d.startswith(TMP_PREFIX) and os.path.isdir(full) and now - os.path.getmtime(full) > older_than_s:
            shutil.rmtree(full, ignore_errors=True)
            removed.append(full)
    return removed
