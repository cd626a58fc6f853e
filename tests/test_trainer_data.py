"""Reading a pipeline output as batches in time order from a resumable position."""
from __future__ import annotations

import os

import numpy as np
import pytest

from ctrkit.data import Position, iterate_batches, window_indices
from ctrkit.errors import InputError
from ctrkit.testing import write_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "d", windows=3, rows_per_window=250, shards_per_window=2,
                         multivalent=True, teacher_logit=True, seed=7)


def _rows(batches) -> list[tuple[int, int, int]]:
    return [(b.window, b.shard, b.offset + i) for b in batches for i in range(b.count)]


def test_batches_replay_every_record_in_order_with_the_written_values(data) -> None:
    batches = list(iterate_batches(data.manifest, 64))
    assert sum(b.count for b in batches) == data.manifest.rows_written
    assert _rows(batches) == sorted(set(_rows(batches)))
    assert all(b.count <= 64 for b in batches)
    # Values survive the round trip; the multi-valued column is padded with -1.
    w0 = [b for b in batches if b.window == 0]
    c0 = np.concatenate([b.features["c0"].numpy() for b in w0])
    np.testing.assert_array_equal(c0, data.features[0]["c0"])
    labels = np.concatenate([b.labels.numpy() for b in w0])
    np.testing.assert_array_equal(labels, data.labels[0])
    tags = w0[0].features["tags"].numpy()
    for row, expected in zip(tags, data.features[0]["tags"][: len(tags)]):
        assert sorted(row[row >= 0].tolist()) == sorted(expected.tolist())
        assert np.all(row[len(expected):] == -1)
    assert w0[0].teacher_logits is not None and w0[0].teacher_logits.shape == (64,)


@pytest.mark.parametrize("start", [Position(0, 0, 0), Position(1, 1, 37), Position(2, 0, 0), Position(1, 0, 125)])
def test_resuming_at_a_position_reads_exactly_the_rest(data, start: Position) -> None:
    everything = _rows(iterate_batches(data.manifest, 50))
    rest = _rows(iterate_batches(data.manifest, 50, start=start))
    assert rest == [r for r in everything if r >= (start.window, start.shard, start.offset)]


def test_window_selection_and_missing_shards(data, tmp_path) -> None:
    assert window_indices(data.manifest, None) == [0, 1, 2]
    assert window_indices(data.manifest, ":-1") == [0, 1]
    assert window_indices(data.manifest, "2") == [2]
    with pytest.raises(InputError, match="selects no window"):
        window_indices(data.manifest, "3:")
    with pytest.raises(InputError, match="--windows"):
        window_indices(data.manifest, "a:b")
    assert {b.window for b in iterate_batches(data.manifest, 100, windows=[1])} == {1}
    other = write_dataset(tmp_path / "gone", windows=1, rows_per_window=20, shards_per_window=1)
    os.remove(other.manifest.shard_paths(other.manifest.windows[0])[0])
    with pytest.raises(InputError, match="missing"):
        list(iterate_batches(other.manifest, 8))


def test_a_shard_changed_after_preprocessing_is_an_error_not_a_shorter_window(tmp_path) -> None:
    """An emptied or replaced shard read as fewer records: the run trained on less and exited 0."""
    import gzip

    other = write_dataset(tmp_path / "d", windows=2, rows_per_window=40, shards_per_window=1)
    w1 = other.manifest.shard_paths(other.manifest.windows[1])[0]
    with open(w1, "wb") as f:
        f.write(gzip.compress(b""))  # a valid, empty shard
    batches = iterate_batches(other.manifest, 16)
    with pytest.raises(InputError, match=r"window 'w001': its shards hold 0 records but the manifest lists 40 rows"):
        list(batches)
    # A resume inside a window cannot count what it skipped, so only whole windows are checked.
    assert sum(b.count for b in iterate_batches(other.manifest, 16, start=Position(0, 0, 8), windows=[0])) == 32
    w0 = other.manifest.shard_paths(other.manifest.windows[0])[0]
    with open(w0, "r+b") as f:  # cut mid-stream: the error reads without TF's function-node tags
        f.truncate(os.path.getsize(w0) // 2)
    # Where the cut falls depends on how the records serialized (feature order follows the hash seed): inside
    # a record TF reports the damage; at a record boundary the stream just ends early and the count check
    # fires. Either way the window is named and the run stops.
    with pytest.raises(InputError, match=r"window 'w000'(, shard .*near record \d+: cannot read|: its shards hold "
                                         r"\d+ records but the manifest lists 40 rows)") as cut:
        list(iterate_batches(other.manifest, 16, windows=[0]))
    assert "function_node" not in str(cut.value)


def test_positions_and_window_lists_that_would_skip_records_are_refused(data) -> None:
    # Each of these used to read on quietly past records it should have read or refused.
    with pytest.raises(ValueError, match="cannot be negative"):
        Position(0, 0, -3)
    with pytest.raises(InputError, match="has 2 shards but the start position is at shard 5"):
        list(iterate_batches(data.manifest, 50, start=Position(0, 5, 0)))
    with pytest.raises(ValueError, match="in time order"):
        list(iterate_batches(data.manifest, 50, windows=[2, 0]))
    with pytest.raises(ValueError, match="in time order"):
        list(iterate_batches(data.manifest, 50, windows=[0, 7]))
    # A window read to its end (shard == number of shards) is a valid resume point: the next window follows.
    assert {b.window for b in iterate_batches(data.manifest, 50, start=Position(0, 2, 0))} == {1, 2}


def test_a_users_own_tf_data_pipeline_feeds_the_model_what_the_trainer_does(data) -> None:
    """Parsed with the documented transformed_feature_spec, a multi-valued feature is a SparseTensor, and a
    Keras model densifies it with 0, a real id: predictions differed by up to 0.11 from the trainer's and
    the served model's after training. Manifest.parse_examples pads with -1 as the trainer does, and
    FeatureEmbedding called on the SparseTensor itself pads it with -1 too."""
    import textwrap

    import keras
    import tensorflow as tf

    from ctrkit.config import load_config
    from ctrkit.layers import FeatureEmbedding
    from ctrkit.model import build_model

    m = data.manifest
    example = m.parse_examples.__doc__.split("Example::")[1]
    scope = {"tf": tf, "manifest": m, "model": None}
    code = textwrap.dedent(example.strip("\n")).replace("model.fit(", "fed = (")
    exec(code, scope)  # the docstring's pipeline, fed to a variable instead of a model
    features, labels = next(iter(scope["fed"]))  # window 0's 250 rows; the trainer reads them a shard at a time
    trainer = [b for b in iterate_batches(m, 512) if b.window == 0]
    assert sorted(features) == sorted(trainer[0].features) and len(labels) == sum(b.count for b in trainer) == 250
    for name in trainer[0].features:
        if name != "tags":
            np.testing.assert_array_equal(features[name].numpy(),
                                          np.concatenate([b.features[name].numpy() for b in trainer]), err_msg=name)
    theirs = [row for b in trainer for row in b.features["tags"].numpy()]
    assert [r[r >= 0].tolist() for r in features["tags"].numpy()] == [r[r >= 0].tolist() for r in theirs]
    assert (features["tags"].numpy() == -1).any() and not (features["tags"].numpy() < -1).any()
    np.testing.assert_array_equal(labels.numpy(), np.concatenate([b.labels.numpy() for b in trainer]))

    keras.utils.set_random_seed(3)
    model = build_model(load_config("small"), m)
    first = {k: v[: trainer[0].count] for k, v in features.items()}
    first["tags"] = first["tags"][:, : trainer[0].features["tags"].shape[1]]
    np.testing.assert_allclose(model.predict(first, verbose=0)["probabilities"],
                               model(trainer[0].features)["probabilities"].numpy(), rtol=1e-6)
    sparse = tf.io.parse_example(next(iter(tf.data.TFRecordDataset(m.shard_paths(m.windows[0]),
                                                                   compression_type="GZIP").batch(512))),
                                 m.transformed_feature_spec())
    assert isinstance(sparse["tags"], tf.SparseTensor)
    embed = FeatureEmbedding({"tags": 60, "c0": 60}, 4, multivalued_features=["tags"])
    dense_tags = features["tags"]
    expected = embed({"tags": dense_tags, "c0": features["c0"]}).numpy()
    np.testing.assert_allclose(embed({"tags": sparse["tags"], "c0": features["c0"]}).numpy(), expected)
    ragged = tf.RaggedTensor.from_sparse(sparse["tags"])
    np.testing.assert_allclose(embed({"tags": ragged, "c0": features["c0"]}).numpy(), expected)
    # pandas category codes are int8/int16: the same ids, not a TF kernel error
    np.testing.assert_allclose(embed({"tags": tf.cast(dense_tags, tf.int16), "c0": tf.cast(features["c0"], tf.int8)}),
                               expected)
