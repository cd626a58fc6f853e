"""TF Serving's on-disk layout ``BASE/NAME/<version>/``: listing, publishing atomically, pruning.

TF Serving (and :mod:`ctrkit.serving.server`) treat every all-digit child of ``BASE/NAME`` as a version
and load the highest ones. A version must therefore appear complete or not at all: exports are written to
a hidden sibling directory (``.tmp-…``, not all digits, so ignored by both servers) and renamed into place
with one ``os.rename`` on the same filesystem.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable

from ctrkit.fileutil import chmod_like_mkdir, refuse_pattern_characters

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
DELETING_PREFIX = TMP_PREFIX + "deleting-"  # a version being deleted: renamed out of sight first
# A staging directory younger than this may belong to an export that is still writing (another trainer,
# a `ctrkit export` run by hand): only older ones are treated as left behind by a crash.
STALE_STAGING_S = 3600.0
# A .tmp-deleting-* directory is only ever rmtree'd, but between prune's mkdtemp and its rename another
# exporter's cleanup must not snatch it: wait a minute before treating one as left by a killed rmtree.
STALE_DELETING_S = 60.0
PUBLISH_ATTEMPTS = 10


def model_dir(base_path: str, model_name: str) -> str:
    if not model_name or os.sep in model_name or model_name.startswith("."):
        raise ValueError(f"model name {model_name!r} must be a plain, non-hidden directory name")
    path = os.path.join(base_path, model_name)
    # TensorFlow reads a SavedModel's variables through a file pattern: the export's own reload check failed
    # with "Failed to find any matching files" after the whole export was written.
    refuse_pattern_characters(path, "model directory", "TensorFlow")
    return path


def list_versions(path: str) -> list[int]:
    """Integer versions under ``path`` (= BASE/NAME), ascending; other entries are ignored as TF Serving does."""
    return sorted(int(d) for d in _digit_dirs(path))


def _digit_dirs(path: str) -> list[str]:
    if not os.path.isdir(path):
        return []
    return [d for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d))]


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
    """Rename a fully written ``staged`` directory to ``path/<version>`` (atomic on one filesystem).

    Raises :class:`FileExistsError` when ``path/<version>`` exists, including when another process
    publishes it between the check and the rename."""
    if not is_complete(staged):
        raise ValueError(f"{staged} is not a complete SavedModel; refusing to publish it")
    final = os.path.join(path, str(version))
    if os.path.exists(final):
        raise FileExistsError(f"version directory {final} already exists")
    chmod_like_mkdir(staged)  # mkdtemp creates 0700; a serving container may run as another user
    try:
        os.rename(staged, final)
    except OSError as e:
        # rename(2) onto a non-empty directory fails with ENOTEMPTY or EEXIST: someone else won the race.
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(f"version directory {final} already exists") from e
        raise
    return final


def publish_latest(staged: str, path: str, version: int, relabel: Callable[[int], None] | None = None) -> str:
    """Publish ``staged`` above every existing version: as ``version`` if that still holds, else as
    :func:`next_version` at publish time.

    ``version`` is picked before a save that can take minutes; meanwhile another exporter (a second
    trainer, a ``ctrkit export`` in the same second) may have published it or a higher one. Re-picking
    keeps versions strictly increasing instead of losing the finished export. ``relabel(v)`` is called
    before the rename whenever the version changes, to update what the staged files record about it.
    """
    for _ in range(PUBLISH_ATTEMPTS):
        fresh = next_version(path)
        if fresh > version:
            version = fresh
            if relabel is not None:
                relabel(version)
        try:
            return publish(staged, path, version)
        except FileExistsError:
            continue  # published by someone else just now: pick again
    raise FileExistsError(
        f"could not publish {staged} under {path}: {PUBLISH_ATTEMPTS} versions in a row were taken by "
        "concurrent exporters while publishing"
    )


def prune(path: str, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` versions; returns the versions removed.

    Raises :class:`OSError` naming the versions it could not take out of sight, after trying them all.
    """
    if keep < 1:
        raise ValueError(f"keep_versions must be >= 1, got {keep}")
    removed, failed = [], []
    # Only whole SavedModels count and go: an all-digit folder of something else (a base path shared with
    # other files) is never deleted, and a version is removed under its own name ("0012" as well as "12").
    saved_models = sorted((int(d), d) for d in _digit_dirs(path) if is_complete(os.path.join(path, d)))
    for v, name in saved_models[:-keep]:
        src = os.path.join(path, name)
        try:
            # Rename first so a server scanning the directory never sees a half-deleted version. The
            # target is a fresh directory: a fixed name would collide with one a killed rmtree left.
            doomed = tempfile.mkdtemp(prefix=f"{DELETING_PREFIX}{v}-", dir=path)
            os.rename(src, os.path.join(doomed, str(v)))
        except OSError as e:
            failed.append(f"{src}: {e}")
            continue
        removed.append(v)
        err = _remove_tree(doomed)
        if err is not None:
            # The version is already out of sight; the next export's clean_stale_staging retries this.
            log.warning("could not delete %s (%s); the next export retries", doomed, err)
    if failed:
        raise OSError(f"could not prune old version(s): {'; '.join(failed)}")
    return removed


def _remove_tree(d: str) -> OSError | None:
    try:
        shutil.rmtree(d)
    except FileNotFoundError:
        pass  # removed concurrently (another exporter's clean_stale_staging)
    except OSError as e:
        return e
    return None


def clean_stale_staging(path: str, older_than_s: float = STALE_STAGING_S,
                        deleting_older_than_s: float = STALE_DELETING_S) -> list[str]:
    """Remove what crashed or killed exports left under ``path``: staging directories older than
    ``older_than_s`` (a younger one may belong to an export still writing) and ``.tmp-deleting-*``
    directories (pruned versions nothing reads any more) older than ``deleting_older_than_s``.
    Returns the directories removed."""
    removed = []
    if not os.path.isdir(path):
        return removed
    now = time.time()
    for d in os.listdir(path):
        full = os.path.join(path, d)
        if not d.startswith(TMP_PREFIX):
            continue
        limit = deleting_older_than_s if d.startswith(DELETING_PREFIX) else older_than_s
        try:
            if not os.path.isdir(full) or now - os.path.getmtime(full) <= limit:
                continue
        except OSError:
            continue  # gone meanwhile
        if _remove_tree(full) is None:
            removed.append(full)
    return removed
