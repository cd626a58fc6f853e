"""distill.teacher_as_of: previous_window — the student never distills from a teacher that saw the window."""
from __future__ import annotations

import numpy as np
import pytest

from ctrkit.config import Config, ConfigError
from ctrkit.distill import teacher_schedule, teacher_snapshots
from ctrkit.errors import InputError
from ctrkit.testing import write_dataset
from ctrkit.trainer import load_run_model, train

MODEL = {"embedding_dim": 4, "cross_layers": 1, "dnn_units": [8]}


def _cfg(distill: dict | None = None, every_windows: int = 1) -> Config:
    return Config.from_dict({
        "name": "t",
        "model": MODEL,
        "train": {"batch_size": 200, "optimizer": "adam", "learning_rate": 0.01, "checkpoint_every_steps": 1000},
        "distill": distill or {},
        "export": {"every_windows": every_windows},
    })


def test_schedule_uses_the_snapshot_after_the_previous_window():
    snaps = {"w0": "m/3.keras", "w1": "m/6.keras", "w2": "m/9.keras"}
    assert teacher_schedule(["w0", "w1", "w2", "w3"], snaps) == [None, "m/3.keras", "m/6.keras", "m/9.keras"]
    # A window whose predecessor the teacher never finished gets no teacher, not a later snapshot.
    assert teacher_schedule(["w0", "w1", "w2"], {"w0": "a"}) == [None, "a", None]


def test_previous_window_needs_a_teacher_run():
    with pytest.raises(ConfigError, match="teacher_as_of"):
        _cfg({"enabled": True, "teacher_as_of": "previous_window"})


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("asof")
    data = write_dataset(root / "data", windows=3, rows_per_window=1000, shards_per_window=1, seed=3)
    train(_cfg(), data.directory, str(root / "teacher"), progress=False)
    return root, data.directory


def test_teacher_snapshots_one_per_window(teacher_run):
    root, data = teacher_run
    from ctrkit.manifest import Manifest

    snaps = teacher_snapshots(str(root / "teacher"))
    assert sorted(snaps) == [w.name for w in Manifest.load(data).windows]
    assert all(path.endswith(".keras") for path in snaps.values())


def test_teacher_without_per_window_models_is_refused(teacher_run, tmp_path):
    root, data = teacher_run
    train(_cfg(every_windows=10), data, str(tmp_path / "coarse"), progress=False, windows=[0])
    (tmp_path / "coarse" / "models").exists() and [p.unlink() for p in (tmp_path / "coarse" / "models").iterdir()]
    with pytest.raises(InputError, match="saved no per-window models"):
        teacher_snapshots(str(tmp_path / "coarse"))


def _weights(run_dir) -> list[np.ndarray]:
    return load_run_model(str(run_dir)).get_weights()


def test_first_window_trains_without_teacher_and_later_ones_with_it(teacher_run, tmp_path):
    root, data = teacher_run
    as_of = {"enabled": True, "teacher": str(root / "teacher"), "teacher_as_of": "previous_window", "weight": 5.0}
    silent = {**as_of, "weight": 0.0}  # same model (with its distillation head), teacher ignored
    # Window 0: no snapshot precedes it, so the student must equal one whose teacher has weight 0.
    train(_cfg(as_of), data, str(tmp_path / "a0"), progress=False, windows=[0])
    train(_cfg(silent), data, str(tmp_path / "b0"), progress=False, windows=[0])
    for wa, wb in zip(_weights(tmp_path / "a0"), _weights(tmp_path / "b0")):
        np.testing.assert_allclose(wa, wb, rtol=0, atol=1e-6)
    # Windows 0-1: in window 1 the teacher's snapshot after window 0 is used, so the students differ.
    train(_cfg(as_of), data, str(tmp_path / "a1"), progress=False, windows=[0, 1])
    train(_cfg(silent), data, str(tmp_path / "b1"), progress=False, windows=[0, 1])
    diff = max(float(np.abs(wa - wb).max()) for wa, wb in zip(_weights(tmp_path / "a1"), _weights(tmp_path / "b1")))
    assert diff > 1e-3


def test_without_a_teacher_snapshot_the_teacher_selects_no_examples_either(teacher_run):
    """In the first window the loaded teacher has seen the labels; it must not pick or reweight examples."""
    import keras
    import tensorflow as tf

    from ctrkit.data import iterate_batches
    from ctrkit.manifest import Manifest
    from ctrkit.model import build_model
    from ctrkit.trainer import make_optimizer, make_train_step

    _, data = teacher_run
    manifest = Manifest.load(data)
    batch = next(iter(iterate_batches(manifest, 200)))
    teacher = tf.constant(np.random.default_rng(0).normal(0, 3, batch.count), tf.float32)

    def weights_after_one_step(select_fraction: float, scale: float) -> list[np.ndarray]:
        cfg = _cfg({"enabled": True, "select_fraction": select_fraction})
        keras.utils.set_random_seed(0)
        model = build_model(cfg, manifest)
        step = make_train_step(cfg, model, make_optimizer(cfg, model), None, tf.Variable(scale))
        step(batch.features, batch.labels, teacher, tf.constant([0, 0], tf.int64))
        return [w.numpy() for w in model.weights]

    plain = weights_after_one_step(1.0, 0.0)
    for a, b in zip(weights_after_one_step(0.3, 0.0), plain):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # With the teacher in use, selection does change the update (so the comparison above can fail).
    taught = weights_after_one_step(1.0, 1.0)
    selected = weights_after_one_step(0.3, 1.0)
    assert any(not np.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(selected, taught))


def test_a_teacher_from_another_stream_is_refused_or_named(teacher_run, tmp_path):
    """Yesterday's run as teacher with teacher_as_of previous_window: none of its snapshots follows a window
    before the student's, and distillation was off for the whole run without a word."""
    import warnings

    from ctrkit.errors import CtrkitWarning

    root, data = teacher_run
    # Another pipeline output names its row-count windows the same (w000, w001, ...): names prove nothing.
    other = write_dataset(tmp_path / "other", windows=3, rows_per_window=300, shards_per_window=1, seed=5)
    train(_cfg(), other.directory, str(tmp_path / "yesterday"), progress=False)
    yesterday = {"enabled": True, "teacher": str(tmp_path / "yesterday"), "teacher_as_of": "previous_window"}
    with pytest.raises(InputError, match=r"needs a teacher trained on this same data .*teacher_as_of: final"):
        train(_cfg(yesterday), data, str(tmp_path / "s"), progress=False, windows=[1])
    train(_cfg(), data, str(tmp_path / "early"), progress=False, windows=[0])  # snapshot after w000 only
    as_of = {"enabled": True, "teacher": str(tmp_path / "early"), "teacher_as_of": "previous_window"}
    with pytest.raises(InputError, match=r"saved no model after any of \['w001'\] \(it has \['w000'\]\).*teacher_as_of: final"):
        train(_cfg(as_of), data, str(tmp_path / "s2"), progress=False, windows=[2])
    with pytest.warns(CtrkitWarning, match=r"saved no model after the window before \['w002'\]: those windows train on clicks alone"):
        train(_cfg(as_of), data, str(tmp_path / "s12"), progress=False, windows=[1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CtrkitWarning)  # a teacher covering every window: nothing to say
        train(_cfg(as_of), data, str(tmp_path / "s1"), progress=False, windows=[1])


def test_a_teacher_trained_on_other_vocabularies_is_refused(teacher_run, tmp_path):
    """Its embedding rows belong to other tokens: the student trained on wrong soft labels, or died with an
    id-range error from inside the step that never named the teacher."""
    root, data = teacher_run
    other = write_dataset(tmp_path / "other", windows=1, rows_per_window=400, shards_per_window=1, seed=4, vocab_size=20)
    train(_cfg(), other.directory, str(tmp_path / "other_teacher"), progress=False)
    cfg = _cfg({"enabled": True, "teacher": str(tmp_path / "other_teacher")})
    with pytest.raises(InputError, match=r"^distill.teacher .*other_teacher: feature 'c0' has vocabulary size 20 in the "
                                         r"model but 50 .*--transform-fn"):
        train(cfg, data, str(tmp_path / "student"), progress=False)
