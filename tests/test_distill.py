"""Distillation: losses, unbiased teacher-guided selection, and a student that beats itself without a teacher."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from ctrkit.calibrate import score_stream
from ctrkit.config import Config, ConfigError
from ctrkit.distill import load_teacher, selection_weights
from ctrkit.errors import InputError
from ctrkit.metrics import StreamingMetrics
from ctrkit.testing import write_dataset
from ctrkit.trainer import load_run_model, train

VOCAB = 30
STUDENT = {"embedding_dim": 4, "cross_layers": 1, "dnn_units": [16]}


def _cfg(model: dict, distill: dict | None = None, **train_kw) -> Config:
    return Config.from_dict({
        "name": "d",
        "model": model,
        "train": {"batch_size": 128, "optimizer": "adam", "learning_rate": 0.01, "checkpoint_every_steps": 1000, **train_kw},
        "distill": distill or {},
    })


def test_selection_weights_are_unbiased_and_keep_hard_examples() -> None:
    rng = np.random.default_rng(0)
    y = tf.constant((rng.random(512) < 0.3).astype(np.float32))
    t = tf.constant(rng.normal(-1, 2, 512).astype(np.float32))
    loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=t).numpy()
    draws = np.stack([selection_weights(y, t, 0.25, tf.constant([0, i], tf.int64)).numpy() for i in range(400)])
    kept = (draws > 0).mean(axis=0)
    # Σq = 0.25·512 exactly (water-filling); the mean of 400 kept counts has sd ≤ √128/20 ≈ 0.6 (0.4 %).
    assert (draws > 0).sum(axis=1).mean() == pytest.approx(0.25 * 512, rel=0.03)
    # Horvitz-Thompson: E[s_i] = 1 for every example, so the weighted loss is unbiased.
    assert np.mean(draws @ loss) == pytest.approx(loss.sum(), rel=0.03)
    hardest = np.argsort(loss)[-10:]
    assert kept[hardest].min() > kept.mean()
    np.testing.assert_array_equal(selection_weights(y, t, 1.0, tf.constant([0, 0], tf.int64)).numpy(), 1.0)


def test_bad_teacher_path_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(InputError, match="neither a ctrkit run directory"):
        load_teacher(str(tmp_path))
    with pytest.raises(InputError, match=r"no_such_run' does not exist \(distill.teacher: a ctrkit run directory"):
        load_teacher(str(tmp_path / "no_such_run"))


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    # One ground truth (truth_seed), three independent streams: the teacher's big one, the student's small
    # one, and a held-out test stream.
    big = write_dataset(root / "big", windows=4, rows_per_window=6000, shards_per_window=1, seed=10, vocab_size=VOCAB)
    small = write_dataset(root / "small", windows=2, rows_per_window=2000, shards_per_window=1, seed=11,
                          vocab_size=VOCAB, teacher_logit=True)
    test = write_dataset(root / "test", windows=1, rows_per_window=6000, shards_per_window=1, seed=12, vocab_size=VOCAB)
    teacher = train(_cfg({"embedding_dim": 8, "cross_layers": 2, "dnn_units": [64, 32]}), big.directory,
                    str(root / "teacher"), progress=False)
    return root, small, test, teacher


def _evaluate(run_dir: str, test) -> dict:
    s = score_stream(load_run_model(run_dir), test.manifest)
    m = StreamingMetrics()
    m.update(s["probabilities"], s["labels"])
    return m.result()


@pytest.mark.slow
def test_student_with_distillation_beats_the_same_student_without(streams) -> None:
    root, small, test, teacher = streams
    teacher_logloss = _evaluate(teacher.run_dir, test)["logloss"]
    gains = []
    for seed in (0, 1):
        kw = {"seed": seed, "batch_size": 32, "learning_rate": 0.005}
        plain = train(_cfg(STUDENT, **kw), small.directory, str(root / f"plain{seed}"), progress=False)
        distilled = train(_cfg(STUDENT, {"enabled": True, "teacher": teacher.run_dir, "weight": 2.0}, **kw),
                          small.directory, str(root / f"distilled{seed}"), progress=False)
        p, d = _evaluate(plain.run_dir, test), _evaluate(distilled.run_dir, test)
        print(f"seed {seed}: teacher {teacher_logloss:.4f}  student {p['logloss']:.4f} (AUC {p['auc']:.4f})  "
              f"distilled {d['logloss']:.4f} (AUC {d['auc']:.4f})")
        assert teacher_logloss < p["logloss"] - 0.03  # the bigger teacher is better
        gains.append(p["logloss"] - d["logloss"])
        assert d["auc"] > p["auc"]
    # Measured here: 0.0069 and 0.0063 log-loss gain (AUC +0.014, +0.011).
    assert min(gains) > 0.003 and np.mean(gains) > 0.005


def test_teacher_column_selection_and_confidence_weighting_train(streams) -> None:
    root, small, test, _ = streams
    cfg = _cfg(STUDENT, {"enabled": True, "select_fraction": 0.5, "confidence_weighting": True, "temperature": 2.0})
    result = train(cfg, small.directory, str(root / "column"), progress=False)
    assert result.examples == small.manifest.rows_written
    assert _evaluate(result.run_dir, test)["auc"] > 0.6
    with pytest.raises(ConfigError, match="distill.teacher"):
        train(_cfg(STUDENT, {"enabled": True}), test.directory, str(root / "noteacher"), progress=False)


def test_savedmodel_teacher_scores_like_the_run_it_was_exported_from(streams, tmp_path) -> None:
    import keras

    _, small, _, teacher = streams
    model = load_run_model(teacher.run_dir)
    spec = {f.name: tf.TensorSpec([None], tf.float32 if f.kind == "numeric" else tf.int64, name=f.name)
            for f in small.manifest.features}
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serve", fn=lambda feats: model(feats, training=False), input_signature=[spec])
    path = str(tmp_path / "teacher_sm")
    archive.write_out(path)
    feats = {k: tf.constant(v[:64]) for k, v in small.features[0].items()}
    from_run = load_teacher(teacher.run_dir)(feats).numpy()
    from_sm = load_teacher(path)(feats).numpy()
    assert from_run.shape == (64,)
    np.testing.assert_allclose(from_sm, from_run, rtol=1e-5, atol=1e-6)


def test_a_serving_export_as_teacher_is_refused_up_front(tmp_path) -> None:
    """`ctrkit export` output takes serialized raw tf.Examples; as a teacher it failed at the first training
    step with a tf.function binding traceback."""
    class Export(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
        def serve_examples(self, examples):
            return {"logits": tf.zeros([tf.shape(examples)[0], 1])}

    module = Export()
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.serve_examples})
    with pytest.raises(InputError, match=r"takes serialized tf\.Examples \(examples\), as a serving export does"):
        load_teacher(str(tmp_path / "1"))
    # The same behind a `serve` endpoint (what load_teacher tries first), taking its input positionally.
    module.serve = module.serve_examples
    tf.saved_model.save(module, str(tmp_path / "2"))
    with pytest.raises(InputError, match=r"takes serialized tf\.Examples"):
        load_teacher(str(tmp_path / "2"))


def _first_step_scalars(run_dir: str) -> dict[str, float]:
    import os

    from tensorflow.core.util import event_pb2

    out = {}
    log_dir = os.path.join(run_dir, "tensorboard")
    for name in sorted(os.listdir(log_dir)):
        for record in tf.data.TFRecordDataset(os.path.join(log_dir, name)):
            event = event_pb2.Event.FromString(record.numpy())
            for v in event.summary.value:
                if event.step == 1:
                    out[v.tag] = float(tf.make_ndarray(v.tensor))
    return out


def test_the_trainer_feeds_the_configured_losses_the_teacher_column(streams) -> None:
    """The first step's logged losses against NumPy, from the initial weights (same seed) and the pipeline's
    teacher-logit column: the trainer must pass temperature, confidence weighting, the column and the rank
    head's weight through (each of those mutated passed every other test)."""
    import keras

    from ctrkit.model import build_model

    root, small, _, _ = streams
    model_cfg = {**STUDENT, "rank_head": True, "rank_loss_weight": 0.7}
    cfg = _cfg(model_cfg, {"enabled": True, "temperature": 3.0, "confidence_weighting": True, "weight": 0.5},
               log_every_steps=1)
    result = train(cfg, small.directory, str(root / "wiring"), progress=False, max_steps=1)
    logged = _first_step_scalars(result.run_dir)

    keras.utils.set_random_seed(cfg.train.seed)
    initial = build_model(cfg, small.manifest)  # the weights the first batch was trained from
    n = cfg.train.batch_size
    out = initial({k: v[:n] for k, v in small.features[0].items()})
    z, d, r = (np.asarray(out[k], np.float64).reshape(-1) for k in ("uncalibrated_logits", "distill_logits", "rank_logits"))
    y = small.labels[0][:n].astype(np.float64)
    p_true = small.true_probabilities[0][:n]
    t = np.log(p_true / (1 - p_true))  # the column holds the generating logit

    def sigmoid(v):
        return 1 / (1 + np.exp(-v))

    def bce(target, logit):
        return np.logaddexp(0, logit) - target * logit

    T = 3.0
    distill = np.mean(T**2 * np.abs(2 * sigmoid(t) - 1) * bce(sigmoid(t / T), d / T))
    click = np.mean(bce(y, z))
    diff = r[y > 0.5][:, None] - r[y <= 0.5][None, :]
    rank = np.mean(np.logaddexp(0, -diff))
    assert logged["train/distill_loss"] == pytest.approx(distill, rel=1e-4)
    assert logged["train/click_loss"] == pytest.approx(click, rel=1e-4)
    assert logged["train/rank_loss"] == pytest.approx(rank, rel=1e-4)
    assert logged["train/loss"] == pytest.approx(click + 0.5 * distill + 0.7 * rank, rel=1e-4)
