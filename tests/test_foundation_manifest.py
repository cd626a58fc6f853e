"""The manifest is the contract between pipeline, trainer and exporter: it must refuse inconsistent data."""
from __future__ import annotations

import json

import pytest

from ctrkit.manifest import Manifest, ManifestError, TransformedFeature, Window


def _manifest(**overrides) -> Manifest:
    fields = dict(
        features=(
            TransformedFeature("C1", "categorical", vocab_size=11, source="C1"),
            TransformedFeature("tags", "categorical", vocab_size=5, multivalent=True, source="tags"),
            TransformedFeature("I1", "numeric", source="I1"),
        ),
        label="label",
        windows=(Window("w0000", ("data/w0000/part-00000.tfrecord.gz",), 7), Window("w0001", ("data/w0001/p.gz",), 3)),
        rows_read=12,
        rows_written=10,
        rows_rejected=2,
    )
    fields.update(overrides)
    return Manifest(**fields)


def test_round_trip_through_disk(tmp_path):
    m = _manifest()
    m.save(str(tmp_path))
    loaded = Manifest.load(str(tmp_path))
    assert loaded == m
    assert loaded.root == str(tmp_path)
    assert loaded.vocab_sizes() == {"C1": 11, "tags": 5}
    assert [f.name for f in loaded.numeric_features] == ["I1"]
    assert loaded.shard_paths("w0001") == [str(tmp_path / "data/w0001/p.gz")]
    assert not (tmp_path / "manifest.json.tmp").exists()


def test_parse_spec_matches_encoding():
    import tensorflow as tf

    spec = _manifest().transformed_feature_spec()
    assert spec["C1"] == tf.io.FixedLenFeature([], tf.int64)
    assert spec["tags"] == tf.io.VarLenFeature(tf.int64)
    assert spec["I1"] == tf.io.FixedLenFeature([], tf.float32)
    assert spec["label"] == tf.io.FixedLenFeature([], tf.float32)
    assert "label" not in _manifest().transformed_feature_spec(include_label=False)


def test_lost_rows_are_refused():
    with pytest.raises(ManifestError, match=r"rows read \(13\) != rows written \(10\) \+ rows rejected \(2\)"):
        _manifest(rows_read=13)


def test_window_rows_must_add_up():
    with pytest.raises(ManifestError, match="windows hold 10 rows but rows_written is 9"):
        _manifest(rows_written=9, rows_read=11)


def test_categorical_needs_vocab_size():
    with pytest.raises(ManifestError, match="categorical feature 'C9' needs vocab_size"):
        TransformedFeature("C9", "categorical")


def test_missing_manifest_names_the_directory(tmp_path):
    with pytest.raises(ManifestError, match="not a complete ctrkit pipeline output"):
        Manifest.load(str(tmp_path))
    (tmp_path / "run.json").write_text("{}")  # --data RUN instead of the data: say what it is
    with pytest.raises(ManifestError, match=r"is a ctrkit run directory \(it holds run.json\), not a pipeline output"):
        Manifest.load(str(tmp_path))


def test_the_manifest_file_itself_loads_its_directory(tmp_path):
    """`--data prep/manifest.json` looked for prep/manifest.json/manifest.json."""
    _manifest().save(str(tmp_path))
    assert Manifest.load(str(tmp_path / "manifest.json")) == Manifest.load(str(tmp_path))


def test_unknown_window_is_named(tmp_path):
    with pytest.raises(ManifestError, match="no window named 'w9'"):
        _manifest().shard_paths("w9")


def test_malformed_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"features": []}))
    with pytest.raises(ManifestError, match="malformed manifest"):
        Manifest.load(str(tmp_path))
