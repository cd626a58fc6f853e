"""``preprocess()``: run the Beam + TFT job and write the data contract atomically.

The job runs in a child Python process by default (``isolate=True``): a process that ran a TFT
pipeline can crash at interpreter exit (exit 139) after all output is written, which would turn a
successful ``ctrkit preprocess`` (or a ``ctrkit run`` that preprocesses first) into a failure. The child
reports its outcome in a JSON file before exiting; the parent trusts that file, not the exit code, and
never imports TFT itself.

Atomicity: everything is written under a hidden temporary sibling of ``output_dir``; after the job, the
driver checks that rows read == rows written + rows rejected, writes ``manifest.json`` last and renames
the directory into place. A failed run leaves no ``output_dir`` behind.
"""
from __future__ import annotations

import dataclasses
import datetime
import errno
import glob as _glob
import heapq
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from typing import Any

from ctrkit.configio import ConfigError, from_dict, to_dict
from ctrkit.errors import InputError, listed
from ctrkit.fileutil import chmod_like_mkdir, refuse_pattern_characters
from ctrkit.manifest import Manifest, Window
from ctrkit.schema import DataConfig, differing_columns, recorded_columns

log = logging.getLogger("ctrkit.pipelines")
RESULT_FILE = "_result.json"


def _remote(path: str) -> bool:
    return "://" in path


class _FS:
    """The few file operations the driver needs, on local paths (os) or remote ones (tf.io.gfile).

    Remote outputs (gs://, hdfs://) cannot be renamed into place atomically; there the job writes into
    the output directory itself and ``manifest.json``, written last, is what marks it complete.
    """

    def __init__(self, remote: bool):
        self.gfile = None
        if remote:
            import tensorflow as tf

            self.gfile = tf.io.gfile

    def listdir(self, path: str) -> list[str]:
        if self.gfile:
            return [p.rstrip("/") for p in self.gfile.listdir(path)] if self.gfile.isdir(path) else []
        return os.listdir(path) if os.path.isdir(path) else []

    def exists(self, path: str) -> bool:
        return self.gfile.exists(path) if self.gfile else os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return self.gfile.isdir(path) if self.gfile else os.path.isdir(path)

    def read_bytes(self, path: str) -> bytes:
        if self.gfile:
            with self.gfile.GFile(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()

    def open_lines(self, path: str) -> Any:
        """The file's lines as bytes, read as a stream."""
        return self.gfile.GFile(path, "rb") if self.gfile else open(path, "rb")

    def write_text(self, path: str, text: str) -> None:
        if self.gfile:
            with self.gfile.GFile(path, "w") as f:
                f.write(text)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)

    def makedirs(self, path: str) -> None:
        if self.gfile:
            self.gfile.makedirs(path)
        else:
            os.makedirs(path, exist_ok=True)

    def rename(self, source: str, target: str) -> None:
        """Moves one file (a remote filesystem copies it and deletes the source)."""
        if self.gfile:
            self.gfile.rename(source, target, overwrite=True)
        else:
            os.replace(source, target)

    def rmtree(self, path: str) -> None:
        if self.gfile:
            if self.gfile.exists(path):
                self.gfile.rmtree(path)
        else:
            shutil.rmtree(path, ignore_errors=True)


def natural_order(path: str) -> tuple[list[str | int], str]:
    """Sort key that compares the numbers in a name by value: ``day_2`` before ``day_10``, as a person
    numbering daily files means them (text order put ``day_10`` between ``day_1`` and ``day_2``)."""
    parts = [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]
    return parts, path  # str and int alternate at the same places in every key; the text breaks ties


def expand_inputs(inputs: list[str] | str) -> list[str]:
    """Globs → de-duplicated file list: each pattern's files in :func:`natural_order`, patterns in the given
    order. With row-count windows this order is the time order of the rows."""
    if isinstance(inputs, str):  # one path: not a sequence of one-character patterns
        inputs = [inputs]
    if not inputs:
        raise InputError("no input given (pass --input PATH_OR_GLOB)")
    files: list[str] = []
    seen: set[str] = set()
    for pattern in inputs:
        if "://" in pattern:
            from apache_beam.io.filesystems import FileSystems

            matched = sorted((m.path for r in FileSystems.match([pattern]) for m in r.metadata_list), key=natural_order)
        else:
            path = os.path.expanduser(pattern)
            if os.path.isdir(path):
                if os.path.exists(os.path.join(path, "manifest.json")):
                    raise InputError(f"input {pattern!r} is a ctrkit pipeline output, not raw logs; to reuse its "
                                     "transform on new logs pass it as --transform-fn")
                raise InputError(f"input {pattern!r} is a directory; pass its files, e.g. '{os.path.join(pattern, '*')}'")
            # A file that exists is itself, even when its name holds glob characters ("day[1].tsv").
            matched = [path] if os.path.isfile(path) else sorted((p for p in _glob.glob(path) if os.path.isfile(p)),
                                                                 key=natural_order)
        if not matched:
            raise InputError(f"input {pattern!r} matches no files")
        for m in matched:
            # One file under two spellings (./a.tsv, an absolute path, a symlink) must be read once.
            key = m if _remote(m) else os.path.realpath(m)
            if key not in seen:
                seen.add(key)
                files.append(m)
    return files


def _count_lines(path: str) -> int:
    from ctrkit.pipelines.reading import count_lines

    try:
        return count_lines(path)
    except FileNotFoundError as e:
        raise InputError(f"input file {path} not found") from e
    except (OSError, EOFError, zlib.error) as e:  # a corrupt gzip stream is an OSError from pyarrow
        raise InputError(f"{path}: cannot read it to count its rows ({e}); is it a truncated or corrupt "
                         "file?") from e


def line_offsets(config: DataConfig, files: list[str]) -> list[int]:
    """Position of each file's first row in the whole input (only needed for row-count windows)."""
    offsets = [0] * len(files)
    if config.timestamp is not None or len(files) < 2:
        return offsets
    header = 1 if (config.format == "csv" and config.header) else 0
    total = 0
    for i, path in enumerate(files):
        offsets[i] = total
        if config.format == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
        else:
            total += max(0, _count_lines(path) - header)
    return offsets


def file_tuples(config: DataConfig, paths: list[str | os.PathLike] | str | os.PathLike) -> list[tuple[int, str, int]]:
    """The ``(file_index, path, line_offset)`` tuples that :class:`~ctrkit.pipelines.ReadRawLogs` reads, one per
    file of ``paths`` (given in time order).

    The index names each file's shards (so it must differ between files) and orders them; the line offset
    is the position of the file's first row in the whole input, which places its rows in row-count windows
    (timestamp windows ignore it). Counting the offsets reads every text file once on the driver. Paths are
    files, not globs (:func:`expand_inputs` expands globs in time order).
    """
    if isinstance(paths, (str, os.PathLike)):  # one file, not a sequence of one-character paths
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    return [(i, p, o) for i, (p, o) in enumerate(zip(paths, line_offsets(config, paths)))]


def saved_with_tf1_tags(output_dir: str) -> bool:
    """Whether the ``transform_fn`` under ``output_dir`` was saved by TFT's TF1-compat tracing.

    ``ctrkit preprocess`` saves it that way (tag ``transform``); a pipeline of your own run in a default
    ``tft_beam.Context`` saves TF2 SavedModels (tag ``serve``). Re-applying one with ``TransformDataset`` needs
    ``tft_beam.Context(force_tf_compat_v1=saved_with_tf1_tags(output_dir))``.
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    path = f"{output_dir.rstrip('/')}/transform_fn/saved_model.pb"
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            saved = saved_model_pb2.SavedModel.FromString(f.read())
    except (OSError, tf.errors.OpError) as e:
        raise InputError(f"--transform-fn {output_dir}: cannot read {path}: {e}") from e
    tags = {t for meta in saved.meta_graphs for t in meta.meta_info_def.tags}
    return "transform" in tags and "serve" not in tags


def _check_transform_fn_dir(path: str, config: DataConfig) -> str:
    remote = _remote(path)  # gs://, hdfs://: a previous job's output where the workers reach it
    path = path.rstrip("/") if remote else os.path.abspath(path)
    if path.rsplit("/", 1)[-1] == "transform_fn":
        path = path.rsplit("/", 1)[0] if remote else os.path.dirname(path)
    fs = _FS(remote)
    for sub in ("transform_fn", "transformed_metadata"):
        if not fs.isdir(f"{path}/{sub}"):
            raise InputError(f"--transform-fn {path}: no {sub}/ there (pass a previous `ctrkit preprocess` output)")
    manifest = f"{path}/manifest.json"
    if fs.exists(manifest):
        theirs = recorded_columns(_load_manifest(path, fs).config.get("data"), manifest)
        diff = differing_columns(config.columns, theirs) if theirs is not None else []
        if diff:
            raise ConfigError(f"--transform-fn {path} was analyzed with other data.columns (different: "
                              f"{', '.join(diff)}; 'only here' is only in this config, 'only there' only in that "
                              "output's). The transform reads those columns, so ids would not match. Reordering "
                              "columns and adding or dropping kind: ignore columns keep the transform")
    return path


def _refuse_output_holding_inputs(output_dir: str, files: list[str], transform_fn_dir: str | None) -> None:
    """The finished output replaces ``output_dir`` (``--overwrite``): nothing the job reads may live there."""
    if _remote(output_dir):
        return
    out = os.path.realpath(output_dir)
    inside = [f for f in files if "://" not in f and os.path.realpath(f).startswith(out + os.sep)]
    if inside:
        raise InputError(f"input {inside[0]} is inside the output directory {output_dir}, which the new output "
                         "replaces; write the output somewhere else")
    if (transform_fn_dir is not None and not _remote(transform_fn_dir)
            and (os.path.realpath(transform_fn_dir) + os.sep).startswith(out + os.sep)):
        raise InputError(f"--transform-fn {transform_fn_dir} is the output directory {output_dir} or inside it, "
                         "which the new output replaces; write the output somewhere else")


# Everything a preprocess job writes at the top of its output, finished or (remote, written in place)
# interrupted. --overwrite replaces a directory only if it holds nothing else: a wrong --output (".", "~", an
# unset $OUT) must fail, not delete a directory of other files.
_OWN_ENTRIES = frozenset({"manifest.json", "data", "rejected", "transform_fn", "transformed_metadata",
                          "raw_metadata", "metadata", "_shards", "_stats", "_tft_tmp"})
# What a job writes into rejected/ (Beam's WriteToText shards).
_REJECTED_PART = re.compile(r"part-\d+-of-\d+\.jsonl")


def _check_replaceable(output_dir: str, entries: list[str], overwrite: bool) -> None:
    """An output directory holding ``entries`` may be written: it is empty, or ``overwrite`` replaces an
    earlier preprocess output."""
    if not entries:
        return
    if not overwrite:
        raise InputError(f"output directory {output_dir} exists and is not empty (pass --overwrite to replace it)")
    foreign = sorted(e for e in entries if e not in _OWN_ENTRIES)
    if foreign:
        raise InputError(f"--overwrite replaces only an earlier ctrkit preprocess output, and {output_dir} also "
                         f"holds {listed(foreign)}; remove them or choose another --output")


def _prepare_output(output_dir: str, overwrite: bool) -> str:
    """Where the job writes: a fresh hidden temp dir beside a local ``output_dir`` (same filesystem, so
    the final rename is atomic), or the remote ``output_dir`` itself."""
    if not output_dir.strip():
        raise InputError("the output directory is an empty string (an unset variable?); name a directory")
    # Beam's file writing matches its temporary files with a pattern built from this path.
    refuse_pattern_characters(output_dir if _remote(output_dir) else os.path.abspath(output_dir), "output directory",
                              "Beam")
    if _remote(output_dir):
        fs = _FS(True)
        _check_replaceable(output_dir, fs.listdir(output_dir), overwrite)
        fs.rmtree(output_dir)
        return output_dir
    if os.path.islink(os.path.abspath(output_dir)):  # abspath: "link/" names the link's target
        # The finished output is renamed into place: that would replace the link, or fail on it, after the job.
        raise InputError(f"output {output_dir} is a symbolic link (to {os.path.realpath(output_dir)}); name a "
                         "real directory")
    output_dir = os.path.abspath(output_dir)
    cwd = os.getcwd()  # a real path: compared with the output's, through any symlinked parent
    if (cwd + os.sep).startswith(os.path.realpath(output_dir).rstrip(os.sep) + os.sep):
        raise InputError(f"output {output_dir} is the current directory or holds it; the finished output would "
                         "replace it: name a directory beside or below it")
    if os.path.exists(output_dir):
        if not os.path.isdir(output_dir):
            raise InputError(f"output {output_dir} exists and is not a directory")
        _check_replaceable(output_dir, os.listdir(output_dir), overwrite)
    parent = os.path.dirname(output_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        _clean_leftovers(output_dir)
        return _claim_work_dir(output_dir)
    except OSError as e:
        raise InputError(f"cannot write output directory {output_dir}: {e.strerror or e}") from e


# A local job writes into ".<output>.tmp-XXXX" beside the output and holds an exclusive flock on the sibling file
# ".<output>.tmp-XXXX.lock" until it has published or removed that directory. The kernel drops the lock when the
# process dies, SIGKILL and OOM kills included, so a later job on the same output can tell a dead job's
# leftover (lock free: remove it) from a running job's (lock held: leave it).
LOCK_SUFFIX = ".lock"
STALE_ASIDE_S = 60.0  # an old output renamed aside is deleted within moments of its rename; older: a killed job's
_work_locks: dict[str, int] = {}


def _try_lock(path: str) -> int | None:
    """An open descriptor of ``path`` holding its exclusive flock, or None when another process holds it."""
    import fcntl

    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _claim_work_dir(output_dir: str) -> str:
    """A fresh ``.<output>.tmp-XXXX`` beside ``output_dir``, locked for this process (see above)."""
    parent, base = os.path.split(output_dir)
    if sys.platform == "win32":  # no flock: no lock, and _clean_leftovers only reports leftovers
        return tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    while True:
        fd, lock = tempfile.mkstemp(prefix=f".{base}.tmp-", suffix=LOCK_SUFFIX, dir=parent)
        os.close(fd)
        # Until it is locked, another job's cleanup may take the fresh file for a dead job's lock (no directory
        # yet) and unlink it: then try another name.
        try:
            held = _try_lock(lock)
        except FileNotFoundError:
            continue
        if held is None:
            continue
        try:
            ours = os.fstat(held).st_ino == os.stat(lock).st_ino  # not a new file under the same name
        except FileNotFoundError:
            ours = False
        if ours:
            work = lock[:-len(LOCK_SUFFIX)]
            os.mkdir(work, 0o700)
            _work_locks[work] = held
            return work
        os.close(held)


def _release_work_dir(work: str) -> None:
    """Drop the lock of a work directory that has been published or removed."""
    fd = _work_locks.pop(work, None)
    if fd is None:
        return
    try:
        os.unlink(work + LOCK_SUFFIX)
    except FileNotFoundError:
        pass
    os.close(fd)


def _tree_size(path: str) -> int:
    total = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _clean_leftovers(output_dir: str) -> list[str]:
    """Remove what killed preprocess jobs on ``output_dir`` left beside it; returns the paths removed.

    A work directory whose lock is free (its job died) is removed; one whose lock is held belongs to a job
    still running and is left alone; one without a lock file (left by an older ctrkit, or on a system
    without flock) is reported with its size, for the user to delete. An old output renamed aside
    (``.<output>.old-XXXX``) older than a minute is what a job killed while replacing its output left."""
    parent, base = os.path.split(output_dir)
    tmp_prefix, old_prefix = f".{base}.tmp-", f".{base}.old-"
    removed = []
    for name in sorted(os.listdir(parent)):
        full = os.path.join(parent, name)
        if name.startswith(old_prefix) and os.path.isdir(full):
            try:
                stale = time.time() - os.path.getmtime(full) > STALE_ASIDE_S
            except OSError:
                continue  # removed meanwhile
            if stale:
                shutil.rmtree(full, ignore_errors=True)
                removed.append(full)
            continue
        if not name.startswith(tmp_prefix):
            continue
        if name.endswith(LOCK_SUFFIX):
            if os.path.isdir(full[:-len(LOCK_SUFFIX)]) or sys.platform == "win32":
                continue  # handled with its directory
            lock, work = full, None  # a lock left behind by a job killed after removing its directory
        elif os.path.isdir(full):
            lock, work = full + LOCK_SUFFIX, full
        else:
            continue
        if work is not None and (sys.platform == "win32" or not os.path.exists(lock)):
            log.warning("%s: %.1f MiB left by an earlier preprocess job on %s that did not finish (last changed %s); "
                        "this job does not use it. Delete it once no other preprocess job writes to %s",
                        work, _tree_size(work) / 2**20, output_dir,
                        datetime.datetime.fromtimestamp(os.path.getmtime(work)).isoformat(timespec="seconds"),
                        output_dir)
            continue
        try:
            fd = _try_lock(lock)
        except FileNotFoundError:
            continue  # its job finished meanwhile
        if fd is None:
            continue  # a job on the same output is running
        try:
            if work is not None:
                size = _tree_size(work)
                shutil.rmtree(work, ignore_errors=True)
                removed.append(work)
                log.warning("removed %s (%.1f MiB): the work directory of an earlier preprocess job on %s that was "
                            "killed before it finished", work, size / 2**20, output_dir)
            os.unlink(lock)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
    return removed


def _publish(work: str, final: str, overwrite: bool) -> None:
    """Rename the finished local output into place.

    Without ``overwrite`` only onto a missing or empty directory: a second job on the same ``--output``
    (a task scheduled twice, a retry while the first attempt still ran) found it empty at its start, and the
    later one deleted the earlier one's output, both exiting 0. With ``overwrite`` the old output is renamed
    aside first and deleted last, so ``final`` holds one whole output at every moment: a job killed while
    deleting it left the old output half deleted, its manifest.json still saying it was complete.
    """
    try:
        if not overwrite or not os.path.isdir(final):
            os.rename(work, final)  # rename(2) fails on a non-empty target directory
            return
        aside = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=os.path.dirname(final))
        os.rename(final, os.path.join(aside, "output"))
        try:
            os.rename(work, final)
        except OSError:
            os.rename(os.path.join(aside, "output"), final)
            os.rmdir(aside)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise InputError(f"output directory {final} was filled by another job while this one ran (two "
                             "preprocess jobs on one --output?); this job's output is discarded") from None
        raise


def analysis_windows(config: DataConfig, files: list[str]) -> list[int] | None:
    """Window ids TFT analyzes (``data.analyze_windows``); None = all.

    Row-count windows are numbered from 0, so the first N are 0..N-1. Timestamp windows are epoch-aligned:
    the first N distinct ones need the timestamps of the rows the job keeps, read here on the driver with
    the job's own reader and validation (a 19 MB Criteo-shaped TSV: ~2.2 s), so a row rejected by the job
    never decides a window. (Deciding this inside the Beam job needs a side input that the FnApiRunner
    fails to schedule next to TFT's.)
    """
    n = config.analyze_windows
    if n is None:
        return None
    if config.timestamp is None:
        return list(range(n))
    from ctrkit.pipelines.reading import read_timestamps

    import numpy as np

    windows = np.unique(np.concatenate([read_timestamps(f, config) // config.window_seconds for f in files]))
    return [int(w) for w in windows[:n]]


@dataclasses.dataclass
class _Spec:
    config: dict
    files: list
    work_dir: str
    control_dir: str  # local: the spec and the child's result file
    analyze_window_ids: list | None
    transform_fn_dir: str | None
    pipeline_args: list
    vocabulary: str
    progress_dir: str | None = None  # local runs: where readers record rows read, for the progress bar


def _beam_parser_class() -> type:
    from apache_beam.options import pipeline_options as po

    class OptionParser(po._BeamArgumentParser):
        """Beam's parser, but a bad value (``--direct_running_mode=multi_procesing``) is one line naming the
        option, not argparse's exit with Beam's 125-line usage under ctrkit's name."""

        def error(self, message: str) -> None:
            raise InputError(f"Beam option: {message}")

    return OptionParser


def check_pipeline_args(pipeline_args: list[str], own_options: list[str] = ()) -> None:
    """Refuse arguments no Beam pipeline-options class defines (Beam itself only logs "Discarding
    unparseable args" and runs on): a mistyped option must not silently change the job.

    ``own_options``: the caller's own option strings (the CLI's), offered first as corrections.
    """
    import difflib

    from apache_beam.options import pipeline_options as po

    parser = _beam_parser_class()(allow_abbrev=False)  # how PipelineOptions.get_all_options parses
    classes: dict[str, type] = {}
    for cls in po.PipelineOptions.__subclasses__():
        classes.setdefault(str(cls), cls)
    for cls in classes.values():
        cls._add_argparse_args(parser)
    known_args, unknown = parser.parse_known_args(pipeline_args)
    runner = getattr(known_args, "runner", None)
    if runner and "." not in runner:  # a dotted name is a runner class Beam imports
        if _runner_key(runner) not in {_runner_key(n) for n in po.StandardOptions.KNOWN_RUNNER_NAMES}:
            raise InputError(f"--runner: unknown Beam runner {runner!r}; known runners are "
                             f"{', '.join(po.StandardOptions.KNOWN_RUNNER_NAMES)}, or give the dotted name of a "
                             "PipelineRunner class")
    flags = [a for a in unknown if a.startswith("-")]
    if not flags:
        return
    beam = [s for action in parser._actions for s in action.option_strings]
    hints = []
    for flag in flags:
        name = flag.split("=", 1)[0]
        ours = [o for o in own_options if o.replace("_", "-") == name.replace("_", "-")]
        close = ours or difflib.get_close_matches(name, list(own_options) + beam, n=1, cutoff=0.8)
        if close:
            hints.append(f"{name}: did you mean {close[0]}?")
    raise InputError(f"unrecognized pipeline options {' '.join(flags)}: neither a ctrkit option nor an Apache Beam "
                     f"pipeline option{' (' + '; '.join(hints) + ')' if hints else ''}")


def preprocess(config: DataConfig, inputs: list[str | os.PathLike] | str | os.PathLike, output_dir: str | os.PathLike,
               transform_fn_dir: str | os.PathLike | None = None, pipeline_args: list[str] | None = None, *,
               isolate: bool = True, overwrite: bool = False,
               vocabulary: str = "arrow", progress: bool = True) -> Manifest:
    """Read raw logs, analyze (or apply a saved ``transform_fn``), write windows of TFRecords + manifest.

    Args:
        config: the ``data:`` section (:class:`ctrkit.schema.DataConfig`).
        inputs: a file or glob, or a list of them (local, or any Beam filesystem such as ``gs://``); compressed
            text is decompressed. A glob's files are read in natural name order (``day_2`` before ``day_10``),
            globs in the order given: with ``window_rows`` that order is the time order.
        output_dir: where the data contract goes; must not exist or be empty (unless ``overwrite``).
        transform_fn_dir: a previous output directory whose ``transform_fn`` is applied unchanged (ids stay
            stable; unseen categories map to OOV) instead of analyzing this input.
        pipeline_args: Beam pipeline options, passed through unchanged (``--runner=DataflowRunner ...``).
            Without ``--runner`` the local FnApiRunner runs the job; ``--direct_num_workers=2
            --direct_running_mode=multi_processing`` uses two processes.
        isolate: run the job in a child process (see the module docstring). ``False`` runs it here.
        overwrite: replace a non-empty ``output_dir``.
        vocabulary: ``"arrow"`` (fast, default) or ``"tft"`` (textbook analyzers; same output).
        progress: show a progress bar of rows read on stderr (local runners in a child process only; a
            remote runner has its own monitoring).

    Returns:
        The written :class:`~ctrkit.manifest.Manifest` (loaded from ``output_dir``).

    Raises:
        InputError / ConfigError: missing or empty input, schema mismatch, unwritable output.
    """
    if not isinstance(config, DataConfig):
        raise TypeError(f"config must be the data section of a ctrkit config (load_config(...).data), got "
                        f"{type(config).__name__}")
    config.check()  # again: a config may have been changed since it was loaded
    inputs = os.fspath(inputs) if isinstance(inputs, (str, os.PathLike)) else [os.fspath(i) for i in inputs]
    output_dir = os.fspath(output_dir)
    transform_fn_dir = None if transform_fn_dir is None else os.fspath(transform_fn_dir)
    pipeline_args = list(pipeline_args or [])
    check_pipeline_args(pipeline_args)
    files = expand_inputs(inputs)
    if all(("://" not in f and os.path.getsize(f) == 0) for f in files):
        raise InputError(f"input is empty: {len(files)} file(s), 0 bytes ({', '.join(files[:3])})")
    from ctrkit.pipelines.reading import check_schema

    for f in files:
        if "://" not in f:
            check_schema(f, config)
    if transform_fn_dir is not None:
        transform_fn_dir = _check_transform_fn_dir(transform_fn_dir, config)
    _refuse_output_holding_inputs(output_dir, files, transform_fn_dir)
    tuples = file_tuples(config, files)
    work = _prepare_output(output_dir, overwrite)
    fs = _FS(_remote(work))
    control = tempfile.mkdtemp(prefix="ctrkit-preprocess-")
    started = time.time()
    try:
        analyzed = analysis_windows(config, files) if transform_fn_dir is None else None
        progress_dir = None
        if progress and isolate and _local_runner(pipeline_args):
            progress_dir = os.path.join(control, "progress")
            os.makedirs(progress_dir)
        spec = _Spec(to_dict(config), tuples, work, control,
                     analyzed, transform_fn_dir, pipeline_args, vocabulary, progress_dir)
        result = _run_isolated(spec) if isolate else run_job(spec)
        c = result.get("counters", {})
        if c:  # progress per stage, from the Beam counters (the files are checked again in _finish)
            log.info("ctrkit preprocess: read stage: %s rows read, %s valid, %s rejected; write stage: %s rows "
                     "written", c.get("rows_read"), c.get("rows_valid"), c.get("rows_rejected"), c.get("rows_written"))
        _finish(config, files, work, output_dir, result, transform_fn_dir, spec.pipeline_args, started, fs)
        final = work if _remote(work) else os.path.abspath(output_dir)
        if final != work:
            chmod_like_mkdir(work)
            _publish(work, final, overwrite)
    except BaseException:
        fs.rmtree(work)
        raise
    finally:
        _release_work_dir(work)
        shutil.rmtree(control, ignore_errors=True)
    return _load_manifest(final, fs)


def _load_manifest(directory: str, fs: _FS) -> Manifest:
    if not _remote(directory):
        return Manifest.load(directory)
    data = json.loads(fs.read_bytes(os.path.join(directory, "manifest.json")))
    return Manifest.from_dict(data, root=directory)


# -- the job ----------------------------------------------------------------------------------------
def pinned_runner(options):
    """The runner a local job runs on: Beam's FnApiRunner when ``options`` name none or the DirectRunner, else
    None (Beam resolves the named one).

    Beam 2.77's DirectRunner first tries to download and start the Prism runner, and falls back to the
    FnApiRunner for a batch job like this one only after that fails (logged at INFO).
    """
    from apache_beam.options.pipeline_options import StandardOptions

    named = options.view_as(StandardOptions).runner
    if named is None or (isinstance(named, str) and _runner_key(named) in ("directrunner", "switchingdirectrunner")):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return None


def run_job(spec: _Spec) -> dict[str, Any]:
    """Build and run the Beam pipeline (in this process); returns counters and the options used."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from ctrkit.pipelines.beam_pipeline import NAMESPACE, build_pipeline

    config = from_dict(DataConfig, spec.config, "data")
    options = PipelineOptions(spec.pipeline_args)
    tmp = os.path.join(spec.work_dir, "_tft_tmp")
    runner = pinned_runner(options)
    pipeline = beam.Pipeline(runner=runner, options=options)
    # A transform_fn is applied with the tracing it was saved with: TFT picks its loader from the Context, not
    # from the saved model, and a mismatch fails inside the job ("MetaGraphDef ... tags transform").
    tf_compat_v1 = True if spec.transform_fn_dir is None else saved_with_tf1_tags(spec.transform_fn_dir)
    build_pipeline(pipeline, config, [tuple(f) for f in spec.files], spec.work_dir, tmp, spec.transform_fn_dir,
                   spec.vocabulary, tf_compat_v1=tf_compat_v1, analyze_window_ids=spec.analyze_window_ids,
                   progress_dir=spec.progress_dir)
    result = pipeline.run()
    result.wait_until_finish()
    counters = {}
    try:
        for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
            counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + int(c.committed or c.attempted or 0)
    except Exception as e:  # noqa: BLE001 - some runners report no metrics; counts come from files anyway
        log.warning("could not query Beam metrics: %s", e)
    return {
        "ok": True,
        "counters": counters,
        "pipeline_options": options.get_all_options(drop_default=True, retain_unknown_options=True),
        "runner": type(runner).__name__ if runner else options.view_as(StandardOptions).runner,
        "driver_pid": os.getpid(),
    }


_LOCAL_RUNNERS = {"directrunner", "fnapirunner", "bundlebaseddirectrunner", "switchingdirectrunner", "prismrunner"}


def _runner_key(runner: str) -> str:
    """A runner name as Beam matches it: class name only, case-insensitive, "Runner" optional
    ("direct", "DirectRunner" and "apache_beam...DirectRunner" are one runner)."""
    name = runner.rsplit(".", 1)[-1].lower()
    return name if name.endswith("runner") else name + "runner"


def _local_runner(pipeline_args: list[str]) -> bool:
    """Whether the job runs on this machine (no --runner: ctrkit pins the FnApiRunner)."""
    import argparse

    # Not Beam's PipelineOptions: building one calls logging.basicConfig(), which left a root handler in the
    # caller's process, so a notebook's own logging.basicConfig(level=INFO) afterwards did nothing.
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--runner")
    runner = parser.parse_known_args(pipeline_args)[0].runner
    return runner is None or _runner_key(runner) in _LOCAL_RUNNERS


def _rows_reported(progress_dir: str) -> int:
    """Rows read so far, summed over every file and read the job's workers reported."""
    total = 0
    for name in os.listdir(progress_dir):
        if not name.endswith(".tmp"):
            try:
                with open(os.path.join(progress_dir, name), encoding="utf-8") as f:
                    total += int(f.read() or 0)
            except (OSError, ValueError):
                pass  # replaced while we read it: the next poll counts it
    return total


def _stop(proc: subprocess.Popen) -> None:
    """Terminate a child process (it takes its process group, Beam's workers, with it: see
    :func:`_stop_group_on_sigterm`), and kill the group if it has not exited after 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _stop_group_on_sigterm() -> None:
    """In the job's child process, which leads its own process group: SIGTERM (from :func:`_stop`, or from the
    kernel when the parent dies) stops the whole group. Beam's multi-processing workers otherwise ran on for
    minutes after the job was stopped, ~240 MB each."""
    if os.getpgid(0) != os.getpid():
        return  # not started by _run_isolated: the group is someone else's

    def stop_group(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.killpg(0, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_group)


def _run_isolated(spec: _Spec) -> dict[str, Any]:
    import threading

    from tqdm import tqdm

    spec_path = os.path.join(spec.control_dir, "_spec.json")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(spec), f)
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from ctrkit.runtime import worker_env

    proc = subprocess.Popen([sys.executable, "-m", "ctrkit.pipelines.runner", spec_path], env=worker_env(env),
                            stdout=None, stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)  # its own process group, which _stop ends as a whole
    stderr: list[str] = []
    drain = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
    drain.start()  # a full pipe would block the child
    try:
        if spec.progress_dir is None:
            proc.wait()
        else:
            analyzing = spec.transform_fn_dir is None
            # Analysis reads the input once and the transform again, so with analysis each row counts twice.
            with tqdm(unit=" rows", desc="rows read (analysis, then transform)" if analyzing else "rows read",
                      dynamic_ncols=True, leave=False, disable=None) as bar:  # None: off when stderr is no terminal
                while proc.poll() is None:
                    time.sleep(0.5)
                    bar.update(_rows_reported(spec.progress_dir) - bar.n)
                bar.update(_rows_reported(spec.progress_dir) - bar.n)
    except BaseException:  # interrupted: the job must stop too, before the caller removes its directories
        _stop(proc)
        raise
    drain.join()
    proc.stderr.close()
    os.remove(spec_path)
    result_path = os.path.join(spec.control_dir, RESULT_FILE)
    if os.path.exists(result_path):
        with open(result_path, encoding="utf-8") as f:
            result = json.load(f)
        os.remove(result_path)
        if result.get("ok"):
            if proc.returncode != 0:
                log.debug("pipeline child exited %s after success (TFT exit crash); output is complete",
                          proc.returncode)
            return result
        kind, message = result.get("error_type"), result.get("error", "unknown error")
        if kind == "InputError":
            raise InputError(message)
        if kind == "ConfigError":
            raise ConfigError(message)
        raise RuntimeError(f"preprocessing pipeline failed: {message}\n{result.get('traceback', '')}")
    tail = "\n".join("".join(stderr).strip().splitlines()[-30:])
    raise RuntimeError(f"preprocessing pipeline process died (exit {proc.returncode}) before reporting:\n{tail}")


_USER_ERROR = re.compile(r"(?:ctrkit\.errors\.)?(InputError|ConfigError): (.+)")


def _classify(e: BaseException) -> tuple[str, str]:
    """Our user-facing errors raised inside a DoFn reach here wrapped by Beam: unwrap them."""
    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (InputError, ConfigError)):
            return type(cur).__name__, str(cur).splitlines()[0]
        cur = cur.__cause__ or cur.__context__
    m = _USER_ERROR.search(str(e))
    if m:
        return m.group(1), m.group(2).strip().strip("'\"").split(" [while running")[0]
    return type(e).__name__, str(e).splitlines()[0] if str(e) else type(e).__name__


def _child_main(spec_path: str) -> int:
    import traceback

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("apache_beam", "absl", "tensorflow", "tensorflow_transform"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with open(spec_path, encoding="utf-8") as f:
        spec = _Spec(**json.load(f))
    try:
        result = run_job(spec)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        kind, message = _classify(e)
        result = {"ok": False, "error_type": kind, "error": message, "traceback": traceback.format_exc()}
    path = os.path.join(spec.control_dir, RESULT_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, default=str)
    os.replace(path + ".tmp", path)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: that is where TFT's exit crash happens, and the result is on disk.
    os._exit(0 if result["ok"] else 1)


# -- after the job: check, index, manifest -----------------------------------------------------------
def _read_jsonl_dir(path: str, fs: _FS) -> list[dict]:
    out = []
    for name in sorted(fs.listdir(path)):
        text = fs.read_bytes(os.path.join(path, name)).decode("utf-8")
        out.extend(json.loads(line) for line in text.splitlines() if line.strip())
    return out


def _count_rejected(path: str, fs: _FS, first: int = 3) -> tuple[int, list[dict]]:
    """(rows in ``rejected/``, the ``first`` of them by file and line), read as a stream: parsing them all
    into dicts cost ~1 KiB per row (10M rejected rows would have needed ~10 GiB)."""
    count = 0

    def rows() -> Iterator[tuple[int, int, str]]:
        nonlocal count
        for name in sorted(fs.listdir(path)):
            with fs.open_lines(os.path.join(path, name)) as f:
                for line in f:
                    if line.strip():
                        count += 1
                        row = json.loads(line)
                        yield row["file"], row["line"], row["reason"]

    smallest = heapq.nsmallest(first, rows())  # keeps `first` rows, whatever the stream's length
    return count, [{"file": f, "line": ln, "reason": why} for f, ln, why in smallest]


def _keep_rejected(work: str, output_dir: str, fs: _FS) -> str:
    """Move a failed job's rejected rows to ``<output_dir>.rejected/`` before its output is deleted → that path.

    An earlier failed job's rows there are replaced; a path that holds anything else is left alone, and the
    rows go to ``<output_dir>.rejected-<time>/`` instead.
    """
    source = os.path.join(work, "rejected")
    kept = (output_dir if _remote(output_dir) else os.path.abspath(output_dir)).rstrip("/") + ".rejected"
    if fs.exists(kept):
        if fs.isdir(kept) and all(_REJECTED_PART.fullmatch(name) for name in fs.listdir(kept)):
            fs.rmtree(kept)
        else:
            kept += time.strftime("-%Y%m%dT%H%M%S")
    fs.makedirs(kept)
    for name in fs.listdir(source):
        fs.rename(os.path.join(source, name), os.path.join(kept, name))
    return kept


def _vocab_sizes(config: DataConfig, work: str, fs: _FS) -> dict[str, int]:
    from ctrkit.pipelines.transform import vocab_filename, vocabulary_columns

    assets = os.path.join(work, "transform_fn", "assets")
    sizes = {}
    for c in vocabulary_columns(config):
        path = os.path.join(assets, vocab_filename(c.name))
        if not fs.exists(path):
            raise RuntimeError(f"vocabulary asset for column {c.name!r} missing from transform_fn ({path})")
        sizes[c.name] = len(fs.read_bytes(path).splitlines())
    return sizes


def _finish(config: DataConfig, files: list[str], work: str, output_dir: str, result: dict,
            transform_fn_dir: str | None, pipeline_args: list[str], started: float, fs: _FS) -> Manifest:
    from ctrkit._version import __version__
    from ctrkit.pipelines.beam_pipeline import SHARDS_DIR, STATS_DIR, window_name
    from ctrkit.pipelines.transform import transformed_features

    stats = _read_jsonl_dir(os.path.join(work, STATS_DIR), fs)
    shards = _read_jsonl_dir(os.path.join(work, SHARDS_DIR), fs)
    n_rejected_lines, first_rejected = _count_rejected(os.path.join(work, "rejected"), fs)
    rows_read = sum(s["rows_read"] for s in stats)
    rows_rejected = sum(s["rows_rejected"] for s in stats)
    rows_padded = sum(s["rows_padded"] for s in stats)
    # Said here, by the driver: the workers that read the files log where the user does not look.
    for message in dict.fromkeys(m for s in stats for m in s.get("warnings", ())):
        log.warning("%s", message)
    rows_written = sum(s["rows"] for s in shards)
    if len(stats) != len(files):
        raise RuntimeError(f"pipeline reported on {len(stats)} of {len(files)} input files")
    if rows_read == 0:
        raise InputError(f"input is empty: no rows in {len(files)} file(s) ({', '.join(files[:3])})")
    if rows_read != rows_written + rows_rejected or n_rejected_lines != rows_rejected:
        raise RuntimeError(f"row accounting failed: read {rows_read}, written {rows_written}, rejected "
                           f"{rows_rejected} ({n_rejected_lines} in rejected/)")
    first = "First: " + "; ".join(f"{r['file']} line {r['line']}: {r['reason']}" for r in first_rejected)
    if rows_written == 0:
        # Data with no rows would only fail at `ctrkit train` ("no windows"), far from the reason.
        kept = _keep_rejected(work, output_dir, fs)
        raise InputError(f"every row was rejected ({rows_rejected} of {rows_read}), so there is no data to write; "
                         f"the rejected rows, with file, line and reason, are in {kept}. {first}")
    limit = config.max_rejected_fraction
    if limit is not None and rows_rejected > limit * rows_read:
        # A log whose format or schema changed loses most of its rows: training on the rest would look fine.
        kept = _keep_rejected(work, output_dir, fs)
        raise InputError(f"{rows_rejected} of {rows_read} rows ({rows_rejected / rows_read:.2%}) were rejected, more "
                         f"than data.max_rejected_fraction ({limit:g}) allows: has the logs' format or schema "
                         f"changed? The rejected rows, with file, line and reason, are in {kept}. {first}. If "
                         "this many bad rows is expected, raise data.max_rejected_fraction (null: no limit)")
    for d in (STATS_DIR, SHARDS_DIR, "_tft_tmp"):
        fs.rmtree(os.path.join(work, d))

    by_window: dict[int, list[dict]] = {}
    for s in shards:
        by_window.setdefault(s["window"], []).append(s)
    windows = []
    for w in sorted(by_window):
        ss = sorted(by_window[w], key=lambda s: (s["file"], s["line"]))
        start = end = None
        if config.timestamp is not None:
            tz = datetime.timezone.utc
            start = datetime.datetime.fromtimestamp(w * config.window_seconds, tz).isoformat()
            end = datetime.datetime.fromtimestamp((w + 1) * config.window_seconds, tz).isoformat()
        windows.append(Window(window_name(w), tuple(s["shard"] for s in ss), sum(s["rows"] for s in ss), start, end))

    features = transformed_features(config, _vocab_sizes(config, work, fs))
    if transform_fn_dir is not None and fs.exists(f"{transform_fn_dir}/manifest.json"):
        # Numeric features enter the model's x0 in manifest order: a config whose columns were reordered must
        # not reorder them against the model trained on the data the transform came from (--warm-start).
        before = [f.name for f in _load_manifest(transform_fn_dir, fs).features]
        features.sort(key=lambda f: before.index(f.name) if f.name in before else len(before))
    manifest = Manifest(
        features=tuple(features),
        label=config.label,
        windows=tuple(windows),
        rows_read=rows_read,
        rows_written=rows_written,
        rows_rejected=rows_rejected,
        rows_padded=rows_padded,
        raw_schema={c.name: c.kind for c in config.columns},
        teacher_logit_feature=next((c.name for c in config.columns if c.kind == "teacher_logit"), None),
        # Absolute: ctrkit export reads warmup rows from these, from whatever directory it runs in.
        config={"data": to_dict(config), "inputs": [f if _remote(f) else os.path.abspath(f) for f in files],
                "transform_fn_from": transform_fn_dir,
                "pipeline_args": pipeline_args, "pipeline_options": result.get("pipeline_options", {}),
                "runner": result.get("runner"), "counters": result.get("counters", {}),
                "driver_pid": result.get("driver_pid"), "reader_pids": sorted({s["pid"] for s in stats}),
                "seconds": round(time.time() - started, 2)},
        ctrkit_version=__version__,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    log.info("ctrkit preprocess: %d rows read, %d written in %d windows (%d short rows padded), %d rejected "
             "(%.1f s)", rows_read, rows_written, len(windows), rows_padded, rows_rejected, time.time() - started)
    # Last: locally the rename that follows publishes a complete directory; remotely the manifest's
    # presence is the completeness mark.
    if _remote(work):
        fs.write_text(os.path.join(work, "manifest.json"),
                      json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    else:
        manifest.save(work)
    return manifest


if __name__ == "__main__":
    from ctrkit.runtime import exit_with_parent

    exit_with_parent()
    _stop_group_on_sigterm()
    sys.exit(_child_main(sys.argv[1]))
