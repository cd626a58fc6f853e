"""The data contract between the pipeline, the trainer and the exporter.

The pipeline writes ``manifest.json`` last, after every shard is in place; the trainer and the exporter
read it through :class:`Manifest` and never re-derive vocabulary sizes or shard lists themselves.

On-disk layout of a pipeline output directory::

    OUTPUT/
      manifest.json                 written last: its presence means the output is complete
      transform_fn/                 TFT transform graph (tft.TFTransformOutput reads OUTPUT)
      transformed_metadata/
      raw_metadata/
      data/<window>/part-*.tfrecord.gz   gzip TFRecords of tf.Example, transformed features
      rejected/                     rejected raw rows with file, line number and reason

Transformed tf.Example encoding (what :meth:`Manifest.transformed_feature_spec` parses):
  * categorical, univalent:  int64, one value per example, id in ``[0, vocab_size)``
  * categorical, multivalent: int64, variable length (0..n ids), read as VarLen (the model takes them
    dense, padded with -1: :meth:`Manifest.parse_examples`)
  * numeric:                 float32, one value per example
  * label:                   float32 0.0/1.0
  * optional teacher logit:  float32 (``teacher_logit_feature``)
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1

FeatureKind = Literal["categorical", "numeric"]


class ManifestError(ValueError):
    """A manifest is missing, incomplete or inconsistent."""


@dataclasses.dataclass(frozen=True)
class TransformedFeature:
    """One model input as written to the TFRecords."""

    name: str
    kind: FeatureKind
    vocab_size: int | None = None  # categorical only; includes OOV / hash buckets
    multivalent: bool = False  # categorical only
    source: str | None = None  # the raw column it came from

    def __post_init__(self) -> None:
        if self.kind not in ("categorical", "numeric"):
            raise ManifestError(f"feature {self.name!r}: kind must be 'categorical' or 'numeric', got {self.kind!r}")
        if self.kind == "categorical" and (self.vocab_size is None or self.vocab_size < 1):
            raise ManifestError(f"categorical feature {self.name!r} needs vocab_size >= 1, got {self.vocab_size!r}")


@dataclasses.dataclass(frozen=True)
class Window:
    """A time window of transformed data, in the order the trainer must replay it."""

    name: str
    shards: tuple[str, ...]  # paths relative to the pipeline output directory
    rows: int
    start: str | None = None  # first timestamp in the window, when the schema has one
    end: str | None = None


@dataclasses.dataclass(frozen=True)
class Manifest:
    features: tuple[TransformedFeature, ...]
    label: str
    windows: tuple[Window, ...]
    rows_read: int
    rows_written: int
    rows_rejected: int
    # Short rows padded with missing values (data.short_rows: pad); counted in rows_written.
    rows_padded: int = 0
    raw_schema: dict[str, Any] = dataclasses.field(default_factory=dict)
    teacher_logit_feature: str | None = None
    rejected_path: str = "rejected"
    transform_fn_dir: str = "transform_fn"
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    ctrkit_version: str = ""
    created_at: str = ""
    format_version: int = FORMAT_VERSION
    # Directory the manifest was loaded from; not serialized.
    root: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.rows_read != self.rows_written + self.rows_rejected:
            raise ManifestError(
                f"rows read ({self.rows_read}) != rows written ({self.rows_written}) + rows rejected "
                f"({self.rows_rejected}): the pipeline lost rows"
            )
        if not 0 <= self.rows_padded <= self.rows_written:
            raise ManifestError(f"rows_padded ({self.rows_padded}) must lie in [0, rows_written = {self.rows_written}]")
        if sum(w.rows for w in self.windows) != self.rows_written:
            raise ManifestError(
                f"windows hold {sum(w.rows for w in self.windows)} rows but rows_written is {self.rows_written}"
            )
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ManifestError(f"duplicate transformed feature names: {names}")
        if self.label in names:
            raise ManifestError(f"label {self.label!r} is also listed as a feature")

    # -- views -----------------------------------------------------------------------------------
    @property
    def categorical_features(self) -> list[TransformedFeature]:
        return [f for f in self.features if f.kind == "categorical"]

    @property
    def numeric_features(self) -> list[TransformedFeature]:
        return [f for f in self.features if f.kind == "numeric"]

    def vocab_sizes(self) -> dict[str, int]:
        """Vocabulary size (OOV buckets included) of every categorical feature, by feature name."""
        return {f.name: int(f.vocab_size) for f in self.categorical_features}

    def shard_paths(self, window: Window | str) -> list[str]:
        """Absolute shard paths of one window."""
        if isinstance(window, str):
            matches = [w for w in self.windows if w.name == window]
            if not matches:
                raise ManifestError(f"no window named {window!r}; windows are {[w.name for w in self.windows]}")
            window = matches[0]
        return [self._abs(p) for p in window.shards]

    @property
    def transform_output_dir(self) -> str:
        """The directory ``tft.TFTransformOutput`` expects (it holds transform_fn/ and the metadata)."""
        if self.root is None:
            raise ManifestError("manifest was not loaded from a directory")
        return self.root

    def transformed_feature_spec(self, include_label: bool = True) -> dict[str, Any]:
        """``tf.io.parse_example`` spec of the transformed TFRecords.

        Multi-valued features parse as ``tf.SparseTensor``. The model takes them dense, padded with ``-1``;
        a Keras model fed the ``SparseTensor`` would fill its gaps with ``0``, a real id, and train and
        predict on it without an error. :meth:`parse_examples` parses into what the model takes.
        """
        import tensorflow as tf  # local: keep this module importable without TensorFlow

        spec: dict[str, Any] = {}
        for f in self.features:
            if f.kind == "numeric":
                spec[f.name] = tf.io.FixedLenFeature([], tf.float32)
            elif f.multivalent:
                spec[f.name] = tf.io.VarLenFeature(tf.int64)
            else:
                spec[f.name] = tf.io.FixedLenFeature([], tf.int64)
        if include_label:
            spec[self.label] = tf.io.FixedLenFeature([], tf.float32)
        if self.teacher_logit_feature:
            spec[self.teacher_logit_feature] = tf.io.FixedLenFeature([], tf.float32)
        return spec

    def parse_examples(self, serialized: Any, include_label: bool = True) -> dict[str, Any]:
        """Serialized transformed ``tf.Example`` s (a batch, as a ``tf.data`` pipeline reads the shards) → the
        features as the model built from this manifest takes them, plus the label and teacher logit columns
        when present and ``include_label``. Multi-valued features are dense ``(B, L)``, padded with ``-1``.

        Example::

            ds = (tf.data.TFRecordDataset(manifest.shard_paths(manifest.windows[0]), compression_type="GZIP")
                  .batch(512).map(manifest.parse_examples)
                  .map(lambda p: ({f.name: p[f.name] for f in manifest.features}, p[manifest.label])))
            model.fit(ds)
        """
        import tensorflow as tf  # local: keep this module importable without TensorFlow

        parsed = tf.io.parse_example(serialized, self.transformed_feature_spec(include_label))
        for f in self.features:
            if f.multivalent:
                parsed[f.name] = tf.sparse.to_dense(parsed[f.name], default_value=-1)
        return parsed

    def _abs(self, path: str) -> str:
        if os.path.isabs(path) or "://" in path or self.root is None:
            return path
        return os.path.join(self.root, path)

    # -- (de)serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("root")
        return d

    def save(self, directory: str) -> str:
        """Write ``manifest.json`` atomically (write a temp file, then rename)."""
        path = os.path.join(directory, MANIFEST_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: str | None = None) -> Manifest:
        d = dict(d)
        version = d.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ManifestError(f"manifest format_version {version} is not supported (expected {FORMAT_VERSION})")
        try:
            d["features"] = tuple(TransformedFeature(**f) for f in d["features"])
            d["windows"] = tuple(Window(**{**w, "shards": tuple(w["shards"])}) for w in d["windows"])
            return cls(**d, root=root)
        except (KeyError, TypeError) as e:
            raise ManifestError(f"malformed manifest{' in ' + root if root else ''}: {e}") from e

    @classmethod
    def load(cls, directory: str) -> Manifest:
        """The manifest of a pipeline output directory (its ``manifest.json`` itself is accepted too)."""
        if os.path.basename(os.path.normpath(directory)) == MANIFEST_FILE and os.path.isfile(directory):
            directory = os.path.dirname(os.path.normpath(directory)) or "."
        path = os.path.join(directory, MANIFEST_FILE)
        if not os.path.exists(path):
            if os.path.exists(os.path.join(directory, "run.json")):
                raise ManifestError(f"{directory!r} is a ctrkit run directory (it holds run.json), not a pipeline "
                                    "output: give the directory `ctrkit preprocess` wrote (the run's data_dir)")
            raise ManifestError(
                f"{path} not found: {directory!r} is not a complete ctrkit pipeline output "
                "(run `ctrkit preprocess` first; the manifest is written last)"
            )
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(d, root=os.path.abspath(directory))
