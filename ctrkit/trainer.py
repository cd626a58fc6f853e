"""The online trainer: replay a pipeline output's windows once, in time order, with progressive validation.

Per batch: forward pass → progressive-validation metrics from these (pre-update) predictions → loss →
optimizer step (:class:`ctrkit.sparse.SparseOptimizer`: embedding rows touched only). The loop is our own
``tf.function`` step, not ``model.fit``, so the metrics see the predictions made before each update and the
embedding tables get sparse updates.

Run directory::

    RUN/
      config.yaml          the resolved config of this run
      run.json             data dir, manifest path, windows, status, steps, examples, final model path
      metrics.jsonl        one line per window: its name, step, window and cumulative metrics; a last "final" line
      batches.jsonl        one line per trained batch: step, window, shard, offset, count
      exports.jsonl        one line per export, written as it is published: step, path
      checkpoints/ckpt-<step>/  weights, optimizer slots, metric state (state.npz) + position (meta.json)
      checkpoints/LATEST   name of the newest complete checkpoint
      models/<step>.keras  per export interval, when no exporter is given
      model.keras          the final model
      tensorboard/         scalars

Checkpoints are written to a temporary directory and renamed into place, and ``LATEST`` is replaced
atomically, so a run killed at any instant resumes from a complete checkpoint. The checkpoint records how
many lines ``batches.jsonl`` and ``metrics.jsonl`` had; a resume truncates both to that, so the logs list
exactly the batches the resumed model has trained on: no example lost, none trained twice. An export
published after the checkpoint a resume starts from is found in ``exports.jsonl`` when the resumed run
reaches its step again, and kept rather than published a second time (the resumed weights equal the
interrupted run's there).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import operator
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import yaml

from ctrkit.config import Config, load_config
from ctrkit.configio import ConfigError, reading_recorded_config
from ctrkit.data import Position, iterate_batches
from ctrkit.errors import CtrkitWarning, InputError, listed
from ctrkit.manifest import Manifest

__all__ = ["TrainResult", "TrainingError", "train", "load_run_model", "make_optimizer", "make_train_step", "RUN_MODEL"]

log = logging.getLogger(__name__)

ExportFn = Callable[[Any, Manifest, int], str]
RUN_MODEL = "model.keras"
UNCALIBRATED_MODEL = "model_uncalibrated.keras"  # the model before calibration, kept beside RUN_MODEL
_STATE = "state.npz"
_META = "meta.json"


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); nothing was exported from the bad model."""


@dataclasses.dataclass
class TrainResult:
    run_dir: str
    steps: int
    examples: int
    metrics: dict[str, Any]  # final cumulative progressive-validation metrics
    model_path: str
    exports: list[str]
    examples_per_second: float  # over the training loop's own time: checkpoints, exports, teacher loads excluded
    already_finished: bool = False  # a --resume found the run's final checkpoint: nothing was trained


# -- small file helpers ----------------------------------------------------------------------------------
def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _append_line(path: str, obj: Any) -> None:
    """One JSON line, on disk before returning (a kill right after must not lose it)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _published_after(path: str, step: int) -> dict[int, str]:
    """Step → path of the exports ``exports.jsonl`` lists after ``step`` whose path still exists: what an
    interrupted attempt published after the checkpoint a resume starts from.

    The file is rewritten to its complete records, one per step (the newest), keeping those up to ``step``
    and the returned ones: a line the kill cut short would otherwise have the next export glued onto it.
    """
    recorded: dict[int, str] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line) if line.endswith("\n") else None
                except json.JSONDecodeError:
                    entry = None
                if entry is not None:
                    recorded[entry["step"]] = entry["path"]
    published = {s: p for s, p in recorded.items() if s > step and os.path.exists(p)}
    kept = {s: p for s, p in recorded.items() if s <= step} | published
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"step": s, "path": kept[s]}) + "\n" for s in sorted(kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return published


def _truncate_lines(path: str, keep: int) -> None:
    """Keep the first ``keep`` lines of ``path`` (the lines written before the checkpoint we resume from)."""
    if not os.path.exists(path):
        if keep:
            raise InputError(f"{path} is missing but the checkpoint expects {keep} lines in it")
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    complete = [ln for ln in lines if ln.endswith("\n")]
    if len(complete) < keep:
        raise InputError(f"{path} has {len(complete)} lines but the checkpoint expects {keep}")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(complete[:keep])
    os.replace(tmp, path)


def load_run_model(run_dir: str, name: str = RUN_MODEL) -> Any:
    """Load the final model of a ctrkit run directory (``name``: another model file kept there, such as
    :data:`UNCALIBRATED_MODEL`)."""
    import keras

    import ctrkit.layers  # noqa: F401 - registers the custom layers

    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        status = None
        if name == RUN_MODEL and os.path.exists(os.path.join(run_dir, "run.json")):
            with contextlib.suppress(InputError):
                status = read_run_info(run_dir).get("status")
        if status in ("running", "interrupted", "stopped", "failed"):
            # "running" with a live writer is still training; otherwise the process died without a word.
            raise InputError(f"{run_dir} has no {name} yet: the run's status is {status!r}. A run still training "
                             "finishes it at its end; one that was stopped or killed, after `ctrkit train ... "
                             "--resume` with its --config, --data and --run-dir")
        raise InputError(f"{run_dir} has no {name}: not a finished ctrkit run directory")
    return keras.saving.load_model(path, compile=False)


def is_calibrated(run_dir: str) -> bool:
    """Whether ``ctrkit calibrate`` has replaced the run's model (it keeps the model as trained beside it)."""
    return os.path.exists(os.path.join(run_dir, UNCALIBRATED_MODEL))


def read_run_config(run_dir: str) -> Config:
    """The run's recorded ``config.yaml``, read as recorded: settings it would ignore are accepted, since an
    older ctrkit may have written them (see :func:`ctrkit.configio.reading_recorded_config`)."""
    path = os.path.join(run_dir, "config.yaml")
    with reading_recorded_config():
        return load_config(path, source=path)


def read_run_info(run_dir: str, what: str = "a ctrkit run directory") -> dict[str, Any]:
    """The run's ``run.json``; an :class:`InputError` naming the file when it is missing or not readable."""
    path = os.path.join(run_dir, "run.json")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{run_dir} has no run.json: not {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}). ctrkit writes it atomically, so it was edited or "
                         "damaged after the run: restore it from a backup or train a new run") from e
    if not isinstance(info, dict):
        raise InputError(f"{path} holds a {type(info).__name__}, not the JSON object ctrkit writes")
    return info


def run_info_field(run_dir: str, info: dict[str, Any], key: str) -> Any:
    """``info[key]``; an :class:`InputError` naming the run's ``run.json`` and the key when it is absent."""
    if key not in info:
        raise InputError(f"{os.path.join(run_dir, 'run.json')} has no {key!r}: not written by this version of "
                         "ctrkit, or edited by hand")
    return info[key]


def trained_on_data(info: dict[str, Any], data_dir: str) -> bool:
    """Whether ``data_dir`` is the pipeline output the run whose ``run.json`` is ``info`` trained on, by real
    path: recorded at training time (a symlink such as latest -> day1 may point elsewhere since); for runs
    that predate the record, their ``data_dir`` resolved now. Window names say nothing here: every output
    with row-count windows names them w00000000, w00000001, ..."""
    recorded = info.get("data_realpath") or os.path.realpath(info.get("data_dir") or "")
    return recorded == os.path.realpath(data_dir)


def _scalar(tag: str, value: float) -> None:
    """A TensorBoard scalar without the ``tensorboard`` package (not installed here): the scalars plugin
    reads any tensor summary tagged with its plugin name, which is all ``tf.summary.scalar`` writes."""
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    tf.summary.write(tag, tf.constant(value, tf.float32), metadata=metadata.SerializeToString())


def _truncate_tensorboard(log_dir: str, last_step: int, windows_done: int, log_every: int) -> None:
    """Drop the TensorBoard events the resumed run will log again: those after the checkpoint's step, and
    a window end at that step which the checkpoint does not count yet (a kill between a window's end and
    its checkpoint, when a periodic checkpoint fell on the window's last step). A torn last record goes too.

    Without this the resumed steps show twice in TensorBoard, as a zig-zag.
    """
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    if not os.path.isdir(log_dir):
        return
    files: dict[str, list[bytes]] = {}
    for name in sorted(os.listdir(log_dir)):
        if not name.startswith("events.out.tfevents"):
            continue
        records = files.setdefault(os.path.join(log_dir, name), [])
        try:
            for record in tf.data.TFRecordDataset(os.path.join(log_dir, name)):
                records.append(record.numpy())
        except tf.errors.DataLossError:
            pass  # torn tail: keep the complete records before it
    events = {path: [event_pb2.Event.FromString(r) for r in records] for path, records in files.items()}
    window_steps = sorted({e.step for evs in events.values() for e in evs
                           if e.step <= last_step and any(v.tag.startswith("window/") for v in e.summary.value)})
    redo = set(window_steps[windows_done:])  # window ends the resumed run logs again

    def keep(e: Any) -> bool:
        if e.step > last_step:
            return False
        if e.step in redo:  # what end_window wrote: window/*, and cumulative/* off the periodic log's steps
            for v in e.summary.value:
                if v.tag.startswith("window/") or (v.tag.startswith("cumulative/") and e.step % log_every):
                    return False
        return True

    for path, records in files.items():
        kept = [r for r, e in zip(records, events[path]) if keep(e)]
        if len(kept) == len(records) and os.path.getsize(path) == sum(len(r) + 16 for r in records):
            continue
        with tf.io.TFRecordWriter(path + ".tmp") as writer:
            for record in kept:
                writer.write(record)
        os.replace(path + ".tmp", path)


# -- checkpoint state ---------------------------------------------------------------------------------------
class _State:
    """Everything a checkpoint holds: model weights, optimizer slots, metric statistics, position."""

    def __init__(self, model: Any, optimizer: Any, pv: Any) -> None:
        self.model, self.optimizer, self.pv = model, optimizer, pv

    def _rng_states(self) -> list[Any]:
        """The model's variables that are not weights: the random-generator states of its Dropout layers.
        Left out of a checkpoint, a resumed run drew the dropout masks of steps 1, 2, … again and ended
        elsewhere than an uninterrupted one (max |Δw| 0.073 after one resume)."""
        weights = {id(w) for w in self.model.weights}
        return [v for v in self.model.variables if id(v) not in weights]

    def arrays(self) -> Iterator[tuple[str, np.ndarray]]:
        """``(key, value)`` of everything saved, one variable read at a time: a checkpoint then needs one
        table's copy in memory, not a copy of the whole state (which doubled the peak RSS of every save)."""
        for i, w in enumerate(self.model.weights):
            yield f"weight/{i}", np.asarray(w.numpy())
        for i, v in enumerate(self.optimizer.slot_variables()):
            yield f"slot/{i}", np.asarray(v.numpy())
        for i, v in enumerate(self._rng_states()):
            yield f"rng/{i}", np.asarray(v.numpy())
        yield from self.pv.state().items()

    def names(self) -> list[str]:
        return [w.path for w in self.model.weights]

    def non_finite(self) -> list[str]:
        """Names of the weights and optimizer slots holding a NaN or Inf.

        The step already refuses an update whose loss is not finite, but a finite loss can still overflow
        an optimizer slot (Adam's v = g² for a huge gradient) and poison the weights one step later; this is
        the check run before anything is exported or checkpointed.
        """
        import tensorflow as tf

        named = [(w.path, w.value) for w in self.model.weights]
        named += [(f"optimizer/{v.name}", v) for v in self.optimizer.slot_variables()]
        return [n for n, v in named if v.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(v)))]

    def restore(self, arrays: Mapping[str, np.ndarray], names: list[str], where: str, metrics: bool = True) -> None:
        weights = self.model.weights
        if names != self.names():
            raise InputError(
                f"{where}: the checkpoint's model does not match this config "
                f"({len(names)} weights there, {len(weights)} here; first difference at "
                f"{next((a, b) for a, b in zip(names + [''], self.names() + ['']) if a != b)})"
            )
        for i, w in enumerate(weights):
            a = arrays[f"weight/{i}"]
            if tuple(a.shape) != tuple(w.shape):
                raise InputError(f"{where}: weight {w.path} has shape {a.shape}, the model needs {tuple(w.shape)}")
            w.assign(a)
        slots = self.optimizer.slot_variables()
        if sum(1 for k in arrays if k.startswith("slot/")) != len(slots):
            raise InputError(f"{where}: optimizer state does not match (different optimizer in the config?)")
        for i, v in enumerate(slots):
            v.assign(arrays[f"slot/{i}"])
        if metrics:  # resuming this run (not a warm start, which draws its own dropout masks from its seed)
            self.pv.load_state(arrays)
            rng = self._rng_states()
            if sum(1 for k in arrays if k.startswith("rng/")) == len(rng):  # older checkpoints hold none
                for i, v in enumerate(rng):
                    v.assign(arrays[f"rng/{i}"])


_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d+)(?:-(\d+))?$")


def _checkpoint_key(name: str) -> tuple[int, int] | None:
    """(step, save number at that step) of a checkpoint directory name; None for anything else."""
    match = _CHECKPOINT_NAME.match(name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def _complete_checkpoints(ckpt_dir: str) -> list[str]:
    """The names of the complete checkpoints in ``ckpt_dir``, oldest first (no ``.tmp`` directories)."""
    keyed = sorted((k, d) for d in os.listdir(ckpt_dir) if (k := _checkpoint_key(d)) is not None)
    return [d for _, d in keyed]


def _save_checkpoint(ckpt_dir: str, state: _State, meta: dict[str, Any], keep: int,
                     same_state_as: str | None = None) -> str:
    """Write a checkpoint; returns its directory. ``same_state_as``: an earlier checkpoint whose state file
    holds exactly this state (nothing trained since), hard-linked instead of written again."""
    os.makedirs(ckpt_dir, exist_ok=True)
    # A step can be saved more than once (a window's last batch, then the run's final save). Each save gets
    # a new directory, so LATEST always names a complete checkpoint: replacing one in place would leave a
    # moment where LATEST points at nothing, and a kill there would make the run unresumable.
    name = f"ckpt-{meta['step']:09d}"
    repeat = 0
    while os.path.exists(os.path.join(ckpt_dir, name)):
        repeat += 1
        name = f"ckpt-{meta['step']:09d}-{repeat}"
    final = os.path.join(ckpt_dir, name)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    linked = False
    if same_state_as is not None:
        try:
            os.link(os.path.join(same_state_as, _STATE), os.path.join(tmp, _STATE))
            linked = True
        except OSError:  # a file system without hard links: write it
            pass
    if not linked:
        with open(os.path.join(tmp, _STATE), "wb") as f:
            _write_npz(f, state.arrays())
            f.flush()
            os.fsync(f.fileno())
    with open(os.path.join(tmp, _META), "w", encoding="utf-8") as f:
        json.dump({**meta, "weight_names": state.names()}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)  # the rename itself, before LATEST may name it
    latest = os.path.join(ckpt_dir, "LATEST")
    with open(latest + ".tmp", "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest + ".tmp", latest)
    _fsync_dir(ckpt_dir)
    # An earlier save at this step is superseded now that LATEST names this one; left, it would count
    # towards `keep` (a finished run kept two copies of its last step and no older checkpoint).
    complete = _complete_checkpoints(ckpt_dir)
    superseded = [c for c in complete if c != name and _checkpoint_key(c)[0] == meta["step"]]
    kept = [c for c in complete if c not in superseded]
    for old in superseded + [c for c in kept[:-keep] if c != name]:
        shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    return final


def _write_npz(f: Any, items: Iterable[tuple[str, np.ndarray]]) -> None:
    """``np.savez(f, **dict(items))`` (the same file, ``np.load`` reads it), writing each array as it comes
    instead of after all of them exist."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, value in items:
            with zf.open(key + ".npy", "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.asanyarray(value), allow_pickle=False)


def _same_arrays(a: Mapping[str, np.ndarray] | None, b: Mapping[str, np.ndarray] | None) -> bool:
    return a is not None and b is not None and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (new files, renames) durable: a rename is atomic against a
    kill, but only an fsync of its directory makes it survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _latest_checkpoint(run_dir: str) -> str | None:
    latest = os.path.join(run_dir, "checkpoints", "LATEST")
    if not os.path.exists(latest):
        return None
    with open(latest, encoding="utf-8") as f:
        path = os.path.join(run_dir, "checkpoints", f.read().strip())
    if not os.path.exists(os.path.join(path, _META)):
        raise InputError(f"{latest} points at {path}, which is incomplete")
    return path


# What reading a cut or corrupted checkpoint raises (JSONDecodeError is a ValueError; a bad CRC a BadZipFile).
_DAMAGED_FILE_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile)


class _CheckpointArrays(Mapping[str, np.ndarray]):
    """A checkpoint's arrays, read from its file one at a time as they are asked for, so restoring one
    needs one table in memory rather than a second copy of the whole state. Close it after use."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = np.load(os.path.join(path, _STATE))

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self._file[key]  # a key not in the file: KeyError, as a Mapping must raise
        except _DAMAGED_FILE_ERRORS as e:  # a member cut short or corrupted
            raise _damaged(self.path, e) from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._file.files)

    def __len__(self) -> int:
        return len(self._file.files)

    def close(self) -> None:
        self._file.close()


def _damaged(path: str, error: BaseException) -> InputError:
    ckpt_dir = os.path.dirname(path)
    kept = [d for d in _complete_checkpoints(ckpt_dir) if d != os.path.basename(path)]
    older = (f"; an older checkpoint is kept ({kept[-1]}): point {ckpt_dir}/LATEST at it to resume from "
             "there") if kept else ""
    return InputError(f"checkpoint {path} is damaged ({type(error).__name__}: {error}){older}")


@contextlib.contextmanager
def _load_checkpoint(path: str) -> Iterator[tuple[_CheckpointArrays, dict[str, Any]]]:
    """``(arrays, meta)`` of the checkpoint at ``path``; the arrays are read as they are used, inside the
    ``with`` block."""
    try:
        with open(os.path.join(path, _META), encoding="utf-8") as f:
            meta = json.load(f)
        arrays = _CheckpointArrays(path)
    except _DAMAGED_FILE_ERRORS as e:
        raise _damaged(path, e) from e
    try:
        yield arrays, meta
    finally:
        arrays.close()


# -- the loss ----------------------------------------------------------------------------------------------
def _make_loss(config: Config, distill_scale: Any = None) -> Callable[..., Any]:
    """The training loss; ``distill_scale`` (a scalar variable, default 1) switches the distillation term off
    where there is no teacher yet, without retracing the step."""
    import tensorflow as tf

    from ctrkit.distill import distillation_loss

    d, m = config.distill, config.model

    def loss_fn(outputs: dict[str, Any], labels: Any, teacher: Any, sample_weights: Any) -> tuple[Any, dict[str, Any]]:
        y = tf.reshape(labels, [-1])
        n = tf.cast(tf.size(y), tf.float32)
        click = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=tf.reshape(outputs["uncalibrated_logits"], [-1]))
        # Divide by B (not Σ weights): with importance weights the sum stays an unbiased estimate.
        parts = {"click_loss": tf.reduce_sum(sample_weights * click) / n}
        total = parts["click_loss"]
        if d.enabled:
            dl = distillation_loss(outputs["distill_logits"], teacher, d.temperature, d.confidence_weighting)
            parts["distill_loss"] = tf.reduce_sum(sample_weights * dl) / n
            scale = 1.0 if distill_scale is None else distill_scale
            total += d.weight * scale * parts["distill_loss"]
        if m.rank_head:
            s = tf.reshape(outputs["rank_logits"], [-1])
            pos, neg = tf.boolean_mask(s, y > 0.5), tf.boolean_mask(s, y <= 0.5)
            # Pairwise logistic loss over every (click, non-click) pair of the batch.
            diff = pos[:, None] - neg[None, :]
            pairs = tf.cast(tf.size(diff), tf.float32)
            parts["rank_loss"] = tf.math.divide_no_nan(tf.reduce_sum(tf.nn.softplus(-diff)), pairs)
            total += m.rank_loss_weight * parts["rank_loss"]
        return total, parts

    return loss_fn


def make_optimizer(config: Config, model: Any) -> Any:
    """The trainer's optimizer: embedding tables of ``model`` sparse, everything else dense."""
    from ctrkit.model import embedding_layer
    from ctrkit.sparse import SparseOptimizer

    tc = config.train
    trainable = model.trainable_variables
    tables = {id(t) for t in embedding_layer(model).embedding_tables.values()}
    return SparseOptimizer(
        tc.optimizer,
        [v.value for v in trainable],
        sparse_variables=[v.value for v in trainable if id(v) in tables],
        learning_rate=tc.learning_rate,
        sparse_learning_rate=tc.embedding_learning_rate,
        beta_1=tc.adam_beta_1,
        beta_2=tc.adam_beta_2,
        epsilon=tc.epsilon,
        initial_accumulator=tc.adagrad_initial_accumulator,
    )


def make_train_step(
    config: Config,
    model: Any,
    optimizer: Any,
    teacher_fn: Callable[..., Any] | None = None,
    distill_scale: Any = None,
) -> Any:
    """The compiled step ``(features, labels, teacher_logits, seed) -> (served probabilities, loss, parts)``.

    The probabilities returned are the served ones, computed before this step's update (progressive
    validation). The update is applied whatever the loss: a caller must stop on a non-finite loss, as
    :func:`train` does, and must not save the model after it. Guarding the update with ``tf.cond`` instead
    cost 3-7% of a BARS step (three interleaved A/B runs in one process on a 2-core Xeon), likely because
    the conditional waits for every gradient before any update starts.
    """
    import tensorflow as tf

    from ctrkit.distill import selection_weights

    dc = config.distill
    loss_fn = _make_loss(config, distill_scale)
    tf_vars = optimizer.variables
    needs_separate_eval = config.model.dropout > 0  # dropout makes training-mode outputs noisy predictions
    select = dc.enabled and dc.select_fraction < 1.0

    @tf.function(reduce_retracing=True)
    def train_step(features, labels, teacher, seed):
        if needs_separate_eval:
            served = model(features, training=False)["probabilities"]
        if teacher_fn is not None:
            teacher = teacher_fn(features)
        weights = tf.ones_like(labels)
        if select:
            weights = selection_weights(labels, teacher, dc.select_fraction, seed)
            if distill_scale is not None:
                # Where the schedule has no teacher snapshot (the first window with teacher_as_of
                # "previous_window") the loaded teacher has already seen these labels: it must not pick
                # the examples either, so every example trains with weight 1 there.
                weights = tf.where(distill_scale > 0, weights, tf.ones_like(weights))
        with tf.GradientTape() as tape:
            outputs = model(features, training=True)
            loss, parts = loss_fn(outputs, labels, teacher, weights)
        if not needs_separate_eval:
            served = outputs["probabilities"]
        optimizer.apply(tape.gradient(loss, tf_vars))
        return served, loss, parts

    return train_step


# -- the trainer -------------------------------------------------------------------------------------------
def _configured_export(config: Config, run_dir: str, manifest: Manifest) -> ExportFn:
    """What the config's ``export`` section names: TF Serving versions under ``export.base_path`` (with the
    downsampling correction of ``calibration.downsampling_rate``), else ``RUN/models/<step>.keras``.

    The versions' warmup requests come from the raw rows the pipeline read (the manifest records its
    inputs), read once here: when those logs are gone (cleaned up after preprocessing) the run fails at
    its start, not after its first window."""
    ec = config.export
    if not ec.base_path:
        return _default_export(run_dir)
    from ctrkit.serving.export import ExportError, make_export_fn, raw_rows_from_manifest
    from ctrkit.serving.versions import model_dir

    model_dir(ec.base_path, ec.model_name)  # a path TensorFlow cannot export to fails now, not after a window
    try:
        warmup = raw_rows_from_manifest(manifest)
    except ExportError as e:
        raise InputError(f"export.base_path is set, so each TF Serving version gets warmup requests built from the "
                         f"raw logs the pipeline read, but {e}. Keep the logs until training ends, or train without "
                         "export.base_path and export afterwards") from None
    return make_export_fn(ec.base_path, ec.model_name, ec.keep_versions, warmup_examples=warmup,
                          downsampling_rate=config.calibration.downsampling_rate)


def _default_export(run_dir: str) -> ExportFn:
    def export(model: Any, manifest: Manifest, step: int) -> str:
        out = os.path.join(run_dir, "models")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"{step:09d}.keras")
        tmp = os.path.join(out, f".{step:09d}.tmp.keras")
        model.save(tmp)
        os.replace(tmp, path)
        return path

    return export


def vocabulary_fingerprint(manifest: Manifest) -> str | None:
    """SHA-256 of the vocabulary files in the data's ``transform_fn/assets`` (None: the data has none).

    Ids are row numbers in these vocabularies, so two datasets with the same fingerprint map every token to
    the same embedding row; equal vocabulary *sizes* do not guarantee that.
    """
    import hashlib

    assets = os.path.join(manifest.transform_output_dir, manifest.transform_fn_dir, "assets")
    if not os.path.isdir(assets):
        return None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(assets)):
        path = os.path.join(assets, name)
        if os.path.isfile(path):
            digest.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def _warn_if_other_columns(config: Config, manifest: Manifest, data_dir: str, run_dir: str) -> None:
    """The model follows the data's manifest, whatever the config's ``data:`` says; a config that describes
    other columns would go into the run's config.yaml as if it had been used."""
    import warnings

    from ctrkit.schema import differing_columns, recorded_columns

    try:
        theirs = recorded_columns(manifest.config.get("data"), os.path.join(data_dir, "manifest.json"))
    except ConfigError as e:  # a record an older ctrkit wrote, which this one would refuse: only a warning
        warnings.warn(f"cannot compare the config's data.columns with the data's: {e}", CtrkitWarning, stacklevel=3)
        return
    diff = differing_columns(config.data.columns, theirs) if theirs is not None else []
    if diff:
        warnings.warn(f"{data_dir} was preprocessed with other data.columns than this config's (they differ at "
                      f"{diff}): the model follows the data, but {os.path.join(run_dir, 'config.yaml')} records the "
                      "config as given; train with the config the data was preprocessed with", CtrkitWarning,
                      stacklevel=3)


def _warn_if_other_model(config: Config, warm_start: str) -> None:
    """Weights load whenever their names and shapes match, which a changed activation, dropout or head
    weight keeps: say which model settings the warm-start run was trained with instead."""
    import warnings

    try:
        theirs = read_run_config(warm_start).model
    except (ConfigError, OSError) as e:
        warnings.warn(f"--warm-start {warm_start}: cannot compare its model settings with this config's: {e}",
                      CtrkitWarning, stacklevel=3)
        return
    ours = config.model
    differ = [f"model.{f.name}: {getattr(theirs, f.name)!r} there, {getattr(ours, f.name)!r} here"
              for f in dataclasses.fields(ours) if getattr(theirs, f.name) != getattr(ours, f.name)]
    if differ:
        warnings.warn(f"--warm-start {warm_start}: that run's model had other settings ({'; '.join(differ)}). Its "
                      "weights were loaded because their names and shapes match, but they were trained for "
                      "those settings", CtrkitWarning, stacklevel=3)


def check_same_vocabulary(run_dir: str, manifest: Manifest, fingerprint: str | None, who: str, advice: str) -> None:
    """Refuse data whose vocabularies differ from those ``run_dir`` was trained on (its run.json records
    their :func:`vocabulary_fingerprint`): that run's embedding rows would belong to other tokens there.

    ``fingerprint`` is the data's own (computed once by the caller); ``who`` starts the message and
    ``advice`` ends it. A run that predates the record only gets a warning.
    """
    info = read_run_info(run_dir) if os.path.exists(os.path.join(run_dir, "run.json")) else {}
    if "vocabulary_fingerprint" not in info:  # a run from before ctrkit recorded it
        import warnings

        warnings.warn(f"{who} {run_dir}: that run did not record its vocabularies; cannot check that "
                      f"{manifest.transform_output_dir} maps tokens to the same embedding rows", CtrkitWarning,
                      stacklevel=3)
        return
    before = info["vocabulary_fingerprint"]
    if before != fingerprint:
        raise InputError(
            f"{who} {run_dir}: that run's data had different vocabularies "
            f"({'none' if before is None else before[:12]}) from {manifest.transform_output_dir} "
            f"({'none' if fingerprint is None else fingerprint[:12]}), so its embedding rows belong to other "
            f"tokens. {advice}"
        )


def _check_same_numeric_order(run_dir: str, manifest: Manifest) -> None:
    """Numeric features enter x0 in manifest order and weights load by name and shape, so a warm start on data
    whose config lists them in another order would feed each one to another feature's weights without a word.
    (--transform-fn keeps the order; re-analyzing data with a reordered config does not.)"""
    before = read_run_info(run_dir).get("numeric_features")  # None: a run from before ctrkit recorded it
    now = [f.name for f in manifest.numeric_features]
    if before is not None and before != now:
        raise InputError(
            f"--warm-start {run_dir}: that run's model read the numeric features in the order {before}, but "
            f"{manifest.transform_output_dir} lists them as {now}, so each would meet another feature's weights. "
            "Preprocess the new data with the previous transform (ctrkit preprocess ... --transform-fn "
            "PREVIOUS_DATA_DIR), which keeps the order, or list the numeric columns in the previous order"
        )


def check_model_fits_data(who: str, source: str, model: Any, manifest: Manifest, fingerprint: str | None,
                          advice: str) -> None:
    """``model``, loaded from ``source`` (a run directory or a model file), must read the data's ids as it was
    trained to: the same vocabularies (checked when ``source`` is a run directory, which records them), sizes
    and features. Otherwise its embedding rows belong to other tokens, or an id past its table fails deep in
    a step. ``who`` starts the message and ``advice`` ends it.
    """
    import keras

    from ctrkit.model import EMBEDDING_LAYER, embedding_layer

    if os.path.isdir(source) and os.path.exists(os.path.join(source, "run.json")):
        check_same_vocabulary(source, manifest, fingerprint, who, advice)
    if not isinstance(model, keras.Model) or EMBEDDING_LAYER not in {layer.name for layer in model.layers}:
        return  # not a ctrkit model (a SavedModel, a user's own Keras model): nothing more to compare
    wanted = embedding_layer(model).vocab_sizes
    have = manifest.vocab_sizes()
    for name in sorted(set(wanted) | set(have)):
        if wanted.get(name) != have.get(name):
            raise InputError(
                f"{who} {source}: feature {name!r} has vocabulary size {wanted.get(name, 'absent')} in the model but "
                f"{have.get(name, 'absent')} in {manifest.transform_output_dir}/manifest.json: not the data it was "
                f"trained for. {advice}"
            )
    missing = sorted({t.name for t in model.inputs} - {f.name for f in manifest.features})
    if missing:
        raise InputError(f"{who} {source}: the model reads features {missing} that {manifest.transform_output_dir} "
                         f"lacks. {advice}")


def _check_teacher_covers(teacher: str, windows: list[int], names: list[str], schedule: list[str | None],
                          teacher_windows: list[str]) -> None:
    """With ``teacher_as_of: previous_window`` a window distils only from the teacher's snapshot after the window
    before it. A teacher run on other windows of the same data may have none of those snapshots, and
    distillation was then off for the whole run without a word. (A teacher run on other data is refused
    before this, whatever its window names.)"""
    import warnings

    without = [names[i] for i in windows if schedule[i] is None]
    if not without:
        return
    if len(without) == len(windows):
        raise InputError(
            f"distill.teacher {teacher}: with teacher_as_of 'previous_window' each window distils from the teacher "
            f"as it was after the window before it, but the teacher saved no model after any of "
            f"{[names[i - 1] for i in windows]} (it has {teacher_windows}): it was trained on other windows. "
            "Use distill.teacher_as_of: final to distil from its final model, or a teacher trained on the windows "
            "before the student's"
        )
    warnings.warn(f"distill.teacher {teacher} saved no model after the window before {without}: those windows "
                  "train on clicks alone", CtrkitWarning, stacklevel=3)


def _check_same_run(run_dir: str, config: Config, data_dir: str, windows: list[str]) -> None:
    """A resume must continue the same run: same config, same data, same windows."""
    saved = read_run_config(run_dir).to_dict()
    differ = [k for k, v in config.to_dict().items() if saved.get(k) != v]
    if differ:
        raise InputError(f"--resume: the config differs from the run's {run_dir}/config.yaml in section(s) {differ}")
    info = read_run_info(run_dir)
    trained_on = run_info_field(run_dir, info, "data_dir"), run_info_field(run_dir, info, "windows")
    if (os.path.abspath(data_dir), windows) != trained_on:
        raise InputError(
            f"--resume: the run trained on {info['data_dir']} windows {info['windows']}, "
            f"not {os.path.abspath(data_dir)} windows {windows}"
        )


def _check_same_data(run_dir: str, data_dir: str, manifest: Manifest, fingerprint: str | None) -> None:
    """A resume must read the very data the run started on, not only a directory of the same name. A retry
    after ``preprocess --overwrite`` rebuilt the output (an orchestrator clearing a task and what follows it),
    or after a ``latest`` symlink moved, trained the first windows on one data set and the rest on another,
    and finished with exit 0; with top-k vocabularies of unchanged size the embedding rows silently changed
    tokens."""
    info = read_run_info(run_dir)
    differs = []
    # Where the data is matters only for runs that did not record which writing of it they read: the same
    # output moved to another disk and linked back is the same data.
    if info.get("data_created_at") is None and not trained_on_data(info, data_dir):
        differs.append(f"it resolves to {os.path.realpath(data_dir)}, the run's data was {info.get('data_realpath')}")
    if "vocabulary_fingerprint" in info and info["vocabulary_fingerprint"] != fingerprint:
        differs.append("its vocabularies differ")
    if info.get("data_created_at") not in (None, manifest.created_at):
        differs.append(f"it was written {manifest.created_at}, the run's data {info['data_created_at']}")
    if differs:
        raise InputError(f"--resume: {data_dir} is not the data this run trained on ({'; '.join(differs)}); resume "
                         "it on that data, or start a new run (a new --run-dir) on this one")


def _finished_run(run_dir: str, meta: dict[str, Any]) -> TrainResult:
    """The result of a run whose final checkpoint exists. A process killed between that checkpoint and its
    last run.json write left run.json "running", with no model or metrics: complete it from what the run
    wrote before the checkpoint (RUN/model.keras, the "final" line of metrics.jsonl)."""
    run_json = os.path.join(run_dir, "run.json")
    info = read_run_info(run_dir)
    if info.get("status") != "completed":
        final: dict[str, Any] = {}
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if record.get("type") == "final":
                    final = record["cumulative"]
        model = os.path.join(run_dir, RUN_MODEL)
        info = {**info, "status": "completed", "steps": meta["step"], "examples": meta["examples"],
                "model": model if os.path.exists(model) else None, "exports": list(meta.get("exports", [])),
                "metrics": final}
        _write_json_atomic(run_json, info)
    return TrainResult(run_dir, meta["step"], meta["examples"], info.get("metrics", {}), info.get("model") or "",
                       list(meta.get("exports", [])), float("nan"), already_finished=True)


def save_run_model(model: Any, run_dir: str) -> str:
    """Write ``model`` as ``RUN/model.keras`` atomically (a temporary file, then a rename)."""
    path = os.path.join(run_dir, RUN_MODEL)
    tmp = os.path.join(run_dir, ".model.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)
    return path


def train(
    config: Config,
    data_dir: str,
    run_dir: str,
    *,
    resume: bool = False,
    warm_start: str | None = None,
    export_fn: ExportFn | None = None,
    windows: list[int] | None = None,
    progress: bool = True,
    step_delay: float = 0.0,
    max_steps: int | None = None,
) -> TrainResult:
    """Train online over ``data_dir``'s windows (all, or the indices in ``windows``) into ``run_dir``.

    Args:
        resume: continue from the newest checkpoint in ``run_dir``; a run that stopped before its first
            checkpoint starts over; an error when ``run_dir`` holds no run.
        warm_start: a previous run directory: start from its final weights and optimizer state (the
            model must have the same shapes: same config, same vocabulary sizes); metrics start fresh.
        export_fn: called as ``export_fn(model, manifest, step)`` every ``export.every_windows`` windows
            and at the end; default: what the config's ``export`` section says, a TF Serving version under
            ``export.base_path/export.model_name`` or, without a base path, ``run_dir/models/<step>.keras``.
        step_delay: sleep this long after every step (only for crash-recovery tests: gives a test a
            window to kill the process mid-run).
        max_steps: stop after this many steps in total (the run stays resumable); None: the whole data.
    """
    import keras
    import tensorflow as tf

    if not isinstance(config, Config):
        raise TypeError(f"config must be a ctrkit.config.Config (ctrkit.config.load_config), got "
                        f"{type(config).__name__}")
    # A config changed after loading (cfg.train.epochs = 3 in a notebook) is checked again as load_config
    # checked it: it trained silently and wrote a config.yaml that calibrate, export and --resume refused.
    config = Config.from_dict(config.to_dict())
    policy = keras.config.dtype_policy().name
    if policy != "float32":
        # Under a mixed policy the sparse optimizer would get 16-bit gradients without loss scaling.
        raise ConfigError(f"ctrkit train trains float32 models, but the global Keras dtype policy is {policy!r} "
                          "(set by keras.mixed_precision.set_global_policy or keras.config.set_dtype_policy); "
                          "call keras.config.set_dtype_policy('float32') before training")
    manifest = Manifest.load(data_dir)
    _warn_if_other_columns(config, manifest, data_dir, run_dir)
    tc = config.train
    selected = _selected_windows(windows, len(manifest.windows), data_dir)

    run_dir = os.path.abspath(run_dir)
    if resume and warm_start:
        raise InputError("--resume and --warm-start exclude each other (a resumed run already has its weights)")
    if resume and not os.path.isdir(run_dir):  # checked before the lock, which would create it
        raise InputError(f"--resume: {run_dir} holds no run to resume (no such directory)")
    if not resume and os.path.isdir(run_dir) and _latest_checkpoint(run_dir) is None \
            and not os.path.exists(os.path.join(run_dir, "run.json")):
        _refuse_foreign_run_dir(run_dir)  # before the lock, which would leave its .lock file there
    with run_dir_lock(run_dir, "ctrkit train"), _callers_random_state(), _op_determinism(tc.deterministic):
        return _train(config, manifest, data_dir, run_dir, selected, resume=resume, warm_start=warm_start,
                      export_fn=export_fn, progress=progress, step_delay=step_delay, max_steps=max_steps)


def _selected_windows(windows: Sequence[int] | None, n: int, data_dir: str) -> list[int]:
    """``windows`` checked before anything is written: a bad list failed mid-run (numpy ints at the first
    log line, an out-of-range index as a bare IndexError) and left a failed run that blocked the directory."""
    if windows is None:
        selected = list(range(n))
    else:
        try:
            selected = [operator.index(w) for w in windows]
        except TypeError:
            raise InputError(f"windows must be whole numbers (indices into {data_dir}'s {n} windows), got "
                             f"{list(windows)!r}"[:300]) from None
        if selected != sorted(set(selected)) or (selected and not 0 <= selected[0] <= selected[-1] < n):
            raise InputError(f"windows must be distinct indices into {data_dir}'s {n} windows (0 to {n - 1}), in "
                             f"time order; got {selected}"[:300])
    if not selected:
        raise InputError(f"{data_dir}: no windows to train on")
    return selected


@contextlib.contextmanager
def _callers_random_state() -> Any:
    """Put Python's and NumPy's global random state back after training, which seeds them (train.seed): a
    notebook's later np.random draws repeated the seed-0 sequence after every train()."""
    import random

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def _op_determinism(deterministic: bool) -> Any:
    """TensorFlow's op determinism (train.deterministic) for this run only: it is process-wide, and left on it
    slowed every later run and the caller's own TensorFlow code."""
    # Only enable_ is exported under tf.config; is_/disable_ live beside it in TF's own module (TF 2.21 pinned).
    from tensorflow.python.framework import config as tf_framework_config

    turn_on = deterministic and not tf_framework_config.is_op_determinism_enabled()
    if turn_on:
        tf_framework_config.enable_op_determinism()
    try:
        yield
    finally:
        if turn_on:
            tf_framework_config.disable_op_determinism()


def _refuse_foreign_run_dir(run_dir: str) -> None:
    """A new run writes config.yaml, its logs and checkpoints/ in ``run_dir`` and prunes old checkpoints: in
    a directory of other files (".", a project folder) it overwrote and deleted them."""
    # Hidden entries (.gitkeep, .ipynb_checkpoints, .lock) and a mount point's lost+found are not files a run
    # would overwrite.
    foreign = sorted(e for e in os.listdir(run_dir) if not e.startswith(".") and e != "lost+found")
    if foreign:
        raise InputError(f"--run-dir {run_dir} is not empty and holds no ctrkit run ({listed(foreign)}); a new run "
                         "needs a new or empty directory")


@contextlib.contextmanager
def run_dir_lock(run_dir: str, who: str) -> Any:
    """Hold ``RUN/.lock`` (an exclusive ``flock``) while this process writes the run. A second writer, e.g.
    ``--resume`` while the first process still trains, is refused: two writers interleaved their logs and
    checkpoints, and both reported success. The lock dies with its process, SIGKILL included."""
    os.makedirs(run_dir, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not a POSIX system (Windows): run unlocked, and say so
        import warnings

        warnings.warn(f"{run_dir}: cannot lock the run directory on this platform (no fcntl); do not start a "
                      "second train or calibrate on it while one runs", CtrkitWarning, stacklevel=3)
        yield
        return
    with open(os.path.join(run_dir, ".lock"), "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise InputError(f"{run_dir} is in use by {holder}; wait for it to end or use another run directory") from None
        f.seek(0)
        f.truncate()
        f.write(f"{who} (pid {os.getpid()})\n")
        f.flush()
        yield


def _train(
    config: Config,
    manifest: Manifest,
    data_dir: str,
    run_dir: str,
    selected: list[int],
    *,
    resume: bool,
    warm_start: str | None,
    export_fn: ExportFn | None,
    progress: bool,
    step_delay: float,
    max_steps: int | None,
) -> TrainResult:
    """:func:`train` with ``RUN`` locked."""
    import keras
    import tensorflow as tf

    from ctrkit.distill import load_teacher
    from ctrkit.metrics import ProgressiveValidation
    from ctrkit.model import build_model

    tc = config.train
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    batches_log = os.path.join(run_dir, "batches.jsonl")
    metrics_log = os.path.join(run_dir, "metrics.jsonl")
    exports_log = os.path.join(run_dir, "exports.jsonl")
    run_json = os.path.join(run_dir, "run.json")
    latest = _latest_checkpoint(run_dir)
    started = os.path.exists(run_json)
    restart = False
    if resume and latest is None:
        if not started:
            raise InputError(f"--resume: {run_dir} holds no run to resume (no run.json, no checkpoint)")
        # It stopped before its first checkpoint: nothing trained was kept, so it starts over, as the same
        # run (same config, data and warm start). Refusing both a fresh start and a resume left it stuck.
        _check_same_run(run_dir, config, data_dir, [manifest.windows[i].name for i in selected])
        warm_start = read_run_info(run_dir).get("warm_start")
        resume, restart = False, True
        log.info("%s stopped before its first checkpoint: starting it over", run_dir)
    elif not resume and (latest is not None or started):
        raise InputError(f"{run_dir} already holds a run; pass --resume to continue it (one that stopped before its "
                         "first checkpoint starts over) or choose a new --run-dir")
    elif not resume:
        _refuse_foreign_run_dir(run_dir)  # again, under the lock

    # Before anything is written (a resumed run: once it is known not to be finished already): a configured
    # export that cannot build its warmup requests failed only at the end of the first window.
    export_to = None if resume else export_fn or _configured_export(config, run_dir, manifest)

    # Distillation source: a teacher model scoring each batch, or the manifest's teacher-logit column.
    dc = config.distill
    teacher_fn = None
    if dc.enabled:
        if dc.teacher:
            teacher_fn = load_teacher(dc.teacher)
        elif not manifest.teacher_logit_feature:
            raise ConfigError("distill.enabled: set distill.teacher, or use data with a teacher-logit column")

    keras.utils.set_random_seed(tc.seed)
    model = build_model(config, manifest)
    optimizer = make_optimizer(config, model)
    pv = ProgressiveValidation()
    state = _State(model, optimizer, pv)

    step, examples, position = 0, 0, Position(selected[0], 0, 0)
    fingerprint = vocabulary_fingerprint(manifest)  # hashes every vocabulary file: once per run start
    if teacher_fn is not None:
        check_model_fits_data("distill.teacher", dc.teacher, teacher_fn.model, manifest, fingerprint,
                              "The teacher must have been trained on data with these vocabularies: preprocess "
                              "with the same transform (ctrkit preprocess ... --transform-fn).")
    windows_done = 0
    exports: list[str] = []
    if resume:
        _check_same_run(run_dir, config, data_dir, [manifest.windows[i].name for i in selected])
        _check_same_data(run_dir, data_dir, manifest, fingerprint)
        with _load_checkpoint(latest) as (arrays, meta):
            if meta.get("finished"):
                return _finished_run(run_dir, meta)
            export_to = export_fn or _configured_export(config, run_dir, manifest)
            state.restore(arrays, meta["weight_names"], latest)
        step, examples, windows_done = meta["step"], meta["examples"], meta["windows_done"]
        position = Position.from_dict(meta["position"])
        exports = list(meta.get("exports", []))
        published = _published_after(exports_log, meta["step"])
        _truncate_lines(batches_log, meta["batches_logged"])
        _truncate_lines(metrics_log, meta["metrics_logged"])
        _truncate_tensorboard(os.path.join(run_dir, "tensorboard"), meta["step"], meta["windows_done"],
                              tc.log_every_steps)
    else:
        if warm_start:
            prev = _latest_checkpoint(warm_start)
            if prev is None:
                raise InputError(f"--warm-start {warm_start}: no checkpoint there (not a ctrkit run directory?)")
            with _load_checkpoint(prev) as (arrays, meta):
                if not meta.get("finished"):
                    raise InputError(f"--warm-start {warm_start}: that run did not finish; resume it first")
                check_same_vocabulary(warm_start, manifest, fingerprint, "--warm-start",
                                      "Preprocess the new data with the previous transform "
                                      "(ctrkit preprocess ... --transform-fn PREVIOUS_DATA_DIR) and warm-start on that.")
                _check_same_numeric_order(warm_start, manifest)
                state.restore(arrays, meta["weight_names"], prev, metrics=False)
            _warn_if_other_model(config, warm_start)
        with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(config.to_dict(), f, sort_keys=False)
        # A restart retrains from the same seed and warm start, so it reaches the same weights at the steps
        # the abandoned attempt exported.
        published = _published_after(exports_log, 0) if restart else {}
        for path in (batches_log, metrics_log) if restart else (batches_log, metrics_log, exports_log):
            open(path, "w").close()
        if restart:  # the abandoned attempt's events would show its steps twice
            shutil.rmtree(os.path.join(run_dir, "tensorboard"), ignore_errors=True)
    previous = read_run_info(run_dir) if resume else {}
    run_info = {  # this process is run.json's only writer until it returns: later writes update this dict
        **previous,
        "data_dir": os.path.abspath(data_dir),
        # Where the data really is: a symlink such as latest -> day1 may point elsewhere by the time another
        # command asks whether it is this run's data.
        "data_realpath": os.path.realpath(data_dir),
        "manifest": os.path.join(os.path.abspath(data_dir), "manifest.json"),
        "windows": [manifest.windows[i].name for i in selected],
        "warm_start": previous.get("warm_start") if resume else (os.path.abspath(warm_start) if warm_start else None),
        "status": "running",
        "config": config.name,
        "vocabulary_fingerprint": fingerprint,
        # x0 takes the numeric features in this order (categorical ones sorted by name): --warm-start checks it.
        "numeric_features": [f.name for f in manifest.numeric_features],
        "data_created_at": manifest.created_at or None,  # which writing of data_dir: checked by --resume
    }
    _write_json_atomic(run_json, run_info)

    # With teacher_as_of "previous_window" the teacher model's weights are swapped at each window boundary
    # (set_weights: no retrace) and the distillation term is off where the teacher has no earlier snapshot.
    distill_scale = tf.Variable(1.0, trainable=False, dtype=tf.float32)
    schedule = None
    if teacher_fn is not None and dc.teacher_as_of == "previous_window":
        from ctrkit.distill import teacher_schedule, teacher_snapshots

        teacher_info = read_run_info(dc.teacher)
        if not trained_on_data(teacher_info, data_dir):
            raise InputError(
                f"distill.teacher {dc.teacher}: teacher_as_of 'previous_window' distils each window from the "
                f"teacher as it was after the window before, which needs a teacher trained on this same data "
                f"({os.path.abspath(data_dir)}); it trained on {teacher_info.get('data_dir')}. For a teacher from "
                "another stream (e.g. yesterday's run) use distill.teacher_as_of: final"
            )
        names = [w.name for w in manifest.windows]
        snapshots = teacher_snapshots(dc.teacher)
        schedule = teacher_schedule(names, snapshots)
        _check_teacher_covers(dc.teacher, [i for i in selected if i > 0], names, schedule, sorted(snapshots))
    teacher_window = [None]

    def use_teacher_for(w: int) -> None:
        path = schedule[w]
        teacher_window[0] = w
        if path is None:
            distill_scale.assign(0.0)
            return
        teacher_fn.model.set_weights(keras.saving.load_model(path, compile=False).get_weights())
        distill_scale.assign(1.0)

    train_step = make_train_step(config, model, optimizer, teacher_fn, distill_scale)

    def export(model: Any, manifest: Manifest, step: int) -> str:
        if step in published:
            log.info("step %d was exported to %s before the run was interrupted; keeping that export", step,
                     published[step])
            return published[step]
        path = export_to(model, manifest, step)
        _append_line(exports_log, {"step": step, "path": path})
        return path

    tb = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard"))
    total_rows = sum(manifest.windows[i].rows for i in selected)
    from tqdm import tqdm

    bar = tqdm(total=total_rows, initial=examples, unit="ex", disable=not progress, dynamic_ncols=True)
    log_b = open(batches_log, "a", encoding="utf-8")
    log_m = open(metrics_log, "a", encoding="utf-8")
    # Lines in the logs so far (after a resume: what the checkpoint kept); a checkpoint records them.
    lines = {"batches": meta["batches_logged"], "metrics": meta["metrics_logged"]} if resume else {"batches": 0, "metrics": 0}

    verified_step = [-1]  # the weights only change in a step: scan them once per step, not per save

    def require_finite(window: int, action: str) -> None:
        if verified_step[0] == step:
            return
        bad = state.non_finite()
        if bad:
            raise TrainingError(
                f"after step {step} in window {manifest.windows[min(window, len(manifest.windows) - 1)].name!r} the model holds NaN/Inf in "
                f"{len(bad)} variable(s) ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) although the loss "
                f"was finite: an update overflowed. Nothing was {action} from this state. Lower "
                "train.learning_rate or check the data for extreme numeric values."
            )
        verified_step[0] = step

    last_save: dict[str, Any] = {}  # step, metric state and directory of this process's newest checkpoint

    def checkpoint(pos: Position, window: int, finished: bool = False) -> None:
        require_finite(window, "checkpointed")
        for log_file in (log_b, log_m):  # on disk, not in the page cache: a power loss must not leave the
            log_file.flush()             # checkpoint counting log lines that were never written
            os.fsync(log_file.fileno())
        tb.flush()  # what the checkpoint covers must be on disk: a resume keeps events up to its step
        meta = {
            "step": step,
            "examples": examples,
            "windows_done": windows_done,
            "position": pos.to_dict(),
            "batches_logged": lines["batches"],
            "metrics_logged": lines["metrics"],
            "exports": exports,
            "finished": finished,
        }
        # A run's final save repeats the last window's (same step, same metric state, only the meta says
        # "finished"): its state file is linked, not written again (~5-8 s and a transient copy per GB).
        pv_state = pv.state()
        previous = last_save.get("path") if last_save.get("step") == step and _same_arrays(
            pv_state, last_save.get("pv")) else None
        last_save.update(step=step, pv=pv_state,
                         path=_save_checkpoint(ckpt_dir, state, meta, tc.keep_checkpoints, same_state_as=previous))

    def end_window(w: int) -> None:
        nonlocal windows_done, now
        windows_done += 1
        result = pv.end_window()
        # result holds the "window" and "cumulative" metric dicts; "name" says which window this was.
        line = {"type": "window", "name": manifest.windows[w].name, "step": step, **result}
        log_m.write(json.dumps(line) + "\n")
        lines["metrics"] += 1
        with tb.as_default(step=step):
            for scope, values in result.items():
                if scope == "cumulative" and step % tc.log_every_steps == 0:
                    continue  # the step's own log already wrote these same values at this step
                for k, v in values.items():
                    if isinstance(v, float):
                        _scalar(f"window/{k}" if scope == "window" else f"cumulative/{k}", v)
        if windows_done % config.export.every_windows == 0:
            require_finite(w, "exported")
            exports.append(export(model, manifest, step))
        now = Position(w + 1, 0, 0)
        checkpoint(now, w)

    now = position  # the position after the last trained batch
    # Throughput counts the training loop only: a TF Serving export (~15 s), a checkpoint or a teacher
    # snapshot load inside the loop made a distilled student read 270 rows/s against 1,506 without.
    side_work = [0.0]

    def timed_aside(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            side_work[0] += time.perf_counter() - t

    started = time.perf_counter()
    trained_here = 0
    current_window = position.window
    stopped_early = False
    try:
        for batch in iterate_batches(manifest, tc.batch_size, start=position, windows=selected):
            if batch.window != current_window:
                # The previous window ended (or we resumed exactly at a window boundary).
                if pv.window.count and current_window in selected:
                    timed_aside(end_window, current_window)
                current_window = batch.window
            if max_steps is not None and step >= max_steps:
                stopped_early = True
                break
            if schedule is not None and teacher_window[0] != batch.window:
                timed_aside(use_teacher_for, batch.window)
            teacher = batch.teacher_logits if batch.teacher_logits is not None else tf.zeros_like(batch.labels)
            seed = tf.constant([tc.seed, step], tf.int64)
            served, loss, parts = train_step(batch.features, batch.labels, teacher, seed)
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"loss is {loss_value} at step {step + 1} in window {manifest.windows[batch.window].name!r} "
                    f"(shard {batch.shard}, records {batch.offset}-{batch.offset + batch.count - 1}); nothing was exported "
                    "or checkpointed from that step on. Lower train.learning_rate or check the data."
                )
            pv.update(served.numpy(), batch.labels.numpy())
            step += 1
            examples += batch.count
            trained_here += batch.count
            log_b.write(
                json.dumps({"step": step, "window": batch.window, "shard": batch.shard, "offset": batch.offset, "count": batch.count})
                + "\n"
            )
            lines["batches"] += 1
            bar.update(batch.count)
            if step % tc.log_every_steps == 0:
                cum = pv.cumulative.result()
                bar.set_postfix(auc=f"{cum['auc'] or 0:.4f}", logloss=f"{cum['logloss']:.4f}", refresh=False)
                with tb.as_default(step=step):
                    _scalar("train/loss", loss_value)
                    for k, v in parts.items():
                        _scalar(f"train/{k}", float(v))
                    for k, v in cum.items():
                        if isinstance(v, float):
                            _scalar(f"cumulative/{k}", v)
            now = batch.end
            if step % tc.checkpoint_every_steps == 0:
                timed_aside(checkpoint, now, batch.window)
            if step_delay:
                timed_aside(time.sleep, step_delay)
        if not stopped_early and pv.window.count:
            timed_aside(end_window, current_window)
        bar.close()
        elapsed = time.perf_counter() - started - side_work[0]
        final = pv.cumulative.result()
        model_path = ""
        # Still inside the try: a non-finite model found here must mark the run failed too.
        if not stopped_early:
            require_finite(current_window, "saved")
            log_m.write(json.dumps({"type": "final", "step": step, "cumulative": final}) + "\n")
            lines["metrics"] += 1
            log_m.flush()
            model_path = save_run_model(model, run_dir)
            if windows_done % config.export.every_windows != 0:  # the last window did not export already
                exports.append(export(model, manifest, step))
            checkpoint(Position(len(manifest.windows), 0, 0), current_window, finished=True)
        else:
            checkpoint(now, current_window)
    except BaseException as failure:
        log_b.close()
        log_m.close()
        bar.close()
        try:
            status = "interrupted" if isinstance(failure, KeyboardInterrupt) else "failed"  # Terminated too
            _write_json_atomic(run_json, {**run_info, "status": status, "steps": step, "examples": examples})
        except OSError as e:  # e.g. the disk that failed the run is still full: report the first failure
            log.warning("could not mark %s %s (%s) after: %s", run_json, status, e, failure)
        raise
    log_b.close()
    log_m.close()
    tb.flush()
    _write_json_atomic(
        run_json,
        {
            **run_info,
            "status": "stopped" if stopped_early else "completed",
            "steps": step,
            "examples": examples,
            "model": model_path or None,
            "exports": exports,
            "metrics": final,
        },
    )
    return TrainResult(
        run_dir=run_dir,
        steps=step,
        examples=examples,
        metrics=final,
        model_path=model_path,
        exports=exports,
        examples_per_second=trained_here / elapsed if elapsed > 0 else float("nan"),
    )

