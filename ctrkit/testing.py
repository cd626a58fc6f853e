"""Write small pipeline outputs (manifest + transformed TFRecords) directly, without Beam or TFT.

The trainer, the calibrator and the exporter only need what :class:`ctrkit.manifest.Manifest` describes, so
tests can generate already-transformed ids and numerics in well under a second instead of paying the
~35 s start-up of a TFT pipeline. The data carries a known ground truth: the label is drawn from

    logit = bias + Σ_f w_f[id_f] + Σ_n a_n·x_n + cross_strength · C[id_0, id_1]

so feature 0 × feature 1 is a planted cross only a crossing model can learn, and the true probability of
every row is known (:attr:`GeneratedData.true_probabilities`).

Example:

```python
from ctrkit.testing import write_dataset
data = write_dataset(tmp_path / "data", windows=3, rows_per_window=2000, seed=0)
manifest = data.manifest  # ctrkit.manifest.Manifest, loaded back from disk
```
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ctrkit.manifest import Manifest, TransformedFeature, Window

__all__ = ["GeneratedData", "write_dataset", "write_tfrecords"]


@dataclasses.dataclass
class GeneratedData:
    """What :func:`write_dataset` wrote: the manifest and, per window, the rows in file order."""

    manifest: Manifest
    directory: str
    features: list[dict[str, np.ndarray]]  # per window: feature name -> values in record order
    labels: list[np.ndarray]  # per window
    true_probabilities: list[np.ndarray]  # per window: P(click) under the generating model


def _example_bytes(row: dict[str, np.ndarray | float | int]) -> bytes:
    import tensorflow as tf

    feature = {}
    for name, value in row.items():
        arr = np.asarray(value)
        if arr.dtype.kind in "iu":
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=arr.reshape(-1).tolist()))
        else:
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=arr.reshape(-1).tolist()))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_tfrecords(path: str, columns: dict[str, np.ndarray | list], compress: bool = True) -> int:
    """Write one shard: row ``i`` holds ``columns[name][i]`` for every column. Returns the row count.

    Integer columns become int64 lists, float columns float lists; a column given as a list of arrays
    is multi-valued (variable length per row).
    """
    import tensorflow as tf

    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1:
        raise ValueError(f"columns have different lengths: { {k: len(v) for k, v in columns.items()} }")
    n = lengths.pop()
    options = tf.io.TFRecordOptions(compression_type="GZIP" if compress else "")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with tf.io.TFRecordWriter(path, options) as writer:
        for i in range(n):
            writer.write(_example_bytes({k: v[i] for k, v in columns.items()}))
    return n


def write_dataset(
    directory: str | os.PathLike,
    *,
    windows: int = 3,
    rows_per_window: int = 2000,
    shards_per_window: int = 2,
    num_categorical: int = 4,
    vocab_size: int = 50,
    num_numeric: int = 2,
    multivalent: bool = False,
    cross_strength: float = 2.0,
    main_strength: float = 0.5,
    bias: float = -1.5,
    negative_keep_rate: float = 1.0,
    teacher_logit: bool = False,
    label: str = "label",
    seed: int = 0,
    truth_seed: int | None = None,
) -> GeneratedData:
    """Generate a transformed dataset with a planted cross and write it as a ctrkit pipeline output.

    Args:
        directory: output directory (created); ``manifest.json`` is written last.
        windows, rows_per_window, shards_per_window: layout of the time windows.
        num_categorical, vocab_size: categorical features ``c0..`` with ids in ``[0, vocab_size)``.
        num_numeric: standardized numeric features ``n0..``.
        multivalent: add a multi-valued categorical ``tags`` (0-3 ids per row) that shifts the logit.
        cross_strength: scale of the planted ``c0 × c1`` interaction.
        main_strength: scale of the per-feature main effects.
        bias: intercept of the generating logit (about 20% CTR at the default).
        negative_keep_rate: keep each negative with this probability (negative downsampling); the
            manifest rows count what was written.
        teacher_logit: also write the true logit as a ``teacher_logit`` column (a perfect teacher).
        seed: seed of the rows (ids, numerics, clicks).
        truth_seed: seed of the generating model's weights; default ``0`` so datasets written with
            different ``seed`` share one ground truth (a training stream and a held-out stream).
    """
    if num_categorical < 2:
        raise ValueError("num_categorical must be >= 2 (features c0 and c1 carry the planted cross)")
    directory = os.fspath(directory)
    truth = np.random.default_rng(0 if truth_seed is None else truth_seed)
    main = [truth.normal(0, main_strength, vocab_size) for _ in range(num_categorical)]
    cross = truth.normal(0, cross_strength, (vocab_size, vocab_size))
    slopes = truth.normal(0, 0.5, num_numeric)
    tag_weights = truth.normal(0, 0.5, 8)
    # Zipf-like id popularity, as in real click logs.
    popularity = 1.0 / np.arange(1, vocab_size + 1) ** 0.8
    popularity /= popularity.sum()

    rng = np.random.default_rng(seed)
    features_out: list[dict[str, np.ndarray]] = []
    labels_out: list[np.ndarray] = []
    probs_out: list[np.ndarray] = []
    window_meta: list[Window] = []
    for w in range(windows):
        n = rows_per_window
        cols: dict[str, object] = {}
        logit = np.full(n, bias)
        for f in range(num_categorical):
            ids = rng.choice(vocab_size, size=n, p=popularity).astype(np.int64)
            cols[f"c{f}"] = ids
            logit += main[f][ids]
        logit += cross[cols["c0"], cols["c1"]]
        for j in range(num_numeric):
            x = rng.normal(0, 1, n).astype(np.float32)
            cols[f"n{j}"] = x
            logit += slopes[j] * x
        if multivalent:
            tags = [rng.choice(8, size=rng.integers(0, 4), replace=False).astype(np.int64) for _ in range(n)]
            cols["tags"] = tags
            logit += np.array([tag_weights[t].sum() for t in tags])
        prob = 1.0 / (1.0 + np.exp(-logit))
        y = (rng.random(n) < prob).astype(np.float32)
        keep = (y > 0) | (rng.random(n) < negative_keep_rate)
        cols = {k: ([v[i] for i in np.flatnonzero(keep)] if isinstance(v, list) else v[keep]) for k, v in cols.items()}
        y, prob, logit = y[keep], prob[keep], logit[keep]
        cols[label] = y
        if teacher_logit:
            cols["teacher_logit"] = logit.astype(np.float32)

        name = f"w{w:03d}"
        rows = len(y)
        bounds = np.linspace(0, rows, shards_per_window + 1).astype(int)
        shards = []
        for s in range(shards_per_window):
            rel = os.path.join("data", name, f"part-{s:05d}-of-{shards_per_window:05d}.tfrecord.gz")
            part = {k: v[bounds[s] : bounds[s + 1]] for k, v in cols.items()}
            write_tfrecords(os.path.join(directory, rel), part)
            shards.append(rel)
        window_meta.append(Window(name=name, shards=tuple(shards), rows=rows))
        features_out.append({k: v for k, v in cols.items() if k not in (label, "teacher_logit")})
        labels_out.append(y)
        probs_out.append(prob)

    feats = [TransformedFeature(f"c{f}", "categorical", vocab_size=vocab_size, source=f"c{f}") for f in range(num_categorical)]
    feats += [TransformedFeature(f"n{j}", "numeric", source=f"n{j}") for j in range(num_numeric)]
    if multivalent:
        feats.append(TransformedFeature("tags", "categorical", vocab_size=8, multivalent=True, source="tags"))
    total = sum(w.rows for w in window_meta)
    manifest = Manifest(
        features=tuple(feats),
        label=label,
        windows=tuple(window_meta),
        rows_read=total,
        rows_written=total,
        rows_rejected=0,
        teacher_logit_feature="teacher_logit" if teacher_logit else None,
        config={"generator": "ctrkit.testing.write_dataset", "seed": seed},
    )
    os.makedirs(directory, exist_ok=True)
    manifest.save(directory)
    return GeneratedData(Manifest.load(directory), directory, features_out, labels_out, probs_out)
