"""Read a pipeline output's windows as batches, in time order, from a resumable position.

A position is ``(window, shard, offset)``: the next record to read. Batches never straddle a shard, so every
batch is exactly records ``[offset, offset + count)`` of one shard; the trainer logs these spans, and a
checkpoint stores the position after the last trained batch, so a resumed run reads each record once.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from typing import Any

from ctrkit.errors import InputError
from ctrkit.manifest import Manifest

__all__ = ["Batch", "Position", "iterate_batches", "window_indices"]


@dataclasses.dataclass(frozen=True)
class Position:
    """The next record to read: window index (into ``manifest.windows``), shard index, record offset."""

    window: int = 0
    shard: int = 0
    offset: int = 0

    def __post_init__(self) -> None:
        if min(self.window, self.shard, self.offset) < 0:
            raise ValueError(f"a data position cannot be negative, got {self}")

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> Position:
        return cls(int(d["window"]), int(d["shard"]), int(d["offset"]))


@dataclasses.dataclass
class Batch:
    """One batch of transformed features and where it came from."""

    features: dict[str, Any]  # name -> tf.Tensor (B,) ; multivalent: (B, L) padded with -1
    labels: Any  # tf.Tensor (B,) float32
    teacher_logits: Any | None  # tf.Tensor (B,) float32 when the manifest has a teacher-logit column
    window: int
    shard: int
    offset: int  # first record of the batch within its shard
    count: int

    @property
    def end(self) -> Position:
        """The position right after this batch."""
        return Position(self.window, self.shard, self.offset + self.count)


def window_indices(manifest: Manifest, spec: str | None) -> list[int]:
    """Window indices selected by a Python-style slice ``"A:B"`` (``None``: all windows)."""
    n = len(manifest.windows)
    if not spec:
        return list(range(n))
    try:
        parts = [int(p) if p.strip() else None for p in spec.split(":")]
        if len(parts) == 1:
            sel = [range(n)[parts[0]]]
        elif len(parts) == 2:
            sel = list(range(n))[slice(*parts)]
        else:
            raise ValueError
    except (ValueError, IndexError) as e:
        raise InputError(f"--windows {spec!r}: expected an index or a slice A:B over {n} windows") from e
    if not sel:
        raise InputError(f"--windows {spec!r} selects no window (the data has {n})")
    return sel


def _parser(manifest: Manifest):
    import tensorflow as tf

    label = manifest.label
    teacher = manifest.teacher_logit_feature

    def parse(serialized: tf.Tensor) -> tuple[dict[str, tf.Tensor], tf.Tensor, tf.Tensor]:
        parsed = manifest.parse_examples(serialized, include_label=True)
        feats = {f.name: parsed[f.name] for f in manifest.features}
        t = parsed[teacher] if teacher else tf.zeros_like(parsed[label])
        return feats, parsed[label], t

    return parse


def iterate_batches(
    manifest: Manifest,
    batch_size: int,
    start: Position = Position(),
    windows: Sequence[int] | None = None,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """Yield batches of the selected windows in time order, starting at ``start``.

    Windows before ``start.window`` are skipped; within the start window, shards before ``start.shard``
    are skipped and the start shard is read from record ``start.offset``. A shard that holds fewer records
    than ``start.offset`` is an error (the data changed under a checkpoint), not a silent skip.
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parse = _parser(manifest)
    has_teacher = bool(manifest.teacher_logit_feature)
    selected = list(range(len(manifest.windows))) if windows is None else list(windows)
    if selected != sorted(set(selected)) or (selected and not 0 <= selected[0] <= selected[-1] < len(manifest.windows)):
        raise ValueError(f"windows must be distinct indices into the manifest's {len(manifest.windows)} windows, in "
                         f"time order; got {selected}")
    if start.window < len(manifest.windows) and start.shard > len(manifest.windows[start.window].shards):
        # shard == the count is a window read to its end; beyond it, the data changed under a checkpoint.
        raise InputError(
            f"window {manifest.windows[start.window].name!r} has {len(manifest.windows[start.window].shards)} "
            f"shards but the start position is at shard {start.shard}"
        )
    for w in selected:
        if w < start.window:
            continue
        paths = manifest.shard_paths(manifest.windows[w])
        whole_window = w != start.window or (start.shard, start.offset) == (0, 0)
        window_records = 0
        for s, path in enumerate(paths):
            offset = 0
            if w == start.window:
                if s < start.shard:
                    continue
                if s == start.shard:
                    offset = start.offset
            if not tf.io.gfile.exists(path):
                raise InputError(f"window {manifest.windows[w].name!r}: shard {path} listed in the manifest is missing")
            compression = "GZIP" if path.endswith(".gz") else ""
            ds = tf.data.TFRecordDataset(path, compression_type=compression)
            if offset:
                ds = ds.skip(offset)
            ds = ds.batch(batch_size).map(parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(prefetch)
            position = offset
            try:
                for feats, labels, teacher in ds:
                    count = int(labels.shape[0])
                    yield Batch(feats, labels, teacher if has_teacher else None, w, s, position, count)
                    position += count
            except tf.errors.OpError as e:
                reason = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", e.message.splitlines()[0])
                raise InputError(
                    f"window {manifest.windows[w].name!r}, shard {path}, near record {position}: "
                    f"cannot read transformed examples ({reason})"
                ) from e
            window_records += position - offset
            if offset and position == offset:
                # Nothing left after the resume offset: fine when it is exactly the shard's length (the
                # checkpoint fell on the shard's last batch); a larger offset means the shard shrank.
                n = sum(1 for _ in tf.data.TFRecordDataset(path, compression_type=compression))
                if offset > n:
                    raise InputError(f"shard {path} has {n} records but the checkpoint is at record {offset}")
        if whole_window and window_records != manifest.windows[w].rows:
            # An emptied or replaced shard read as a shorter window, and the run trained on less, silently.
            raise InputError(
                f"window {manifest.windows[w].name!r}: its shards hold {window_records} records but the manifest "
                f"lists {manifest.windows[w].rows} rows; the data changed after preprocessing (a shard emptied, "
                "cut or replaced?): preprocess again"
            )
