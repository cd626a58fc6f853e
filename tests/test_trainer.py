"""The online trainer: sparse optimizer, progressive validation, logs, exports, resume, warm start, NaN stop."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import tensorflow as tf

from ctrkit.config import Config
from ctrkit.errors import CtrkitWarning, InputError
from ctrkit.sparse import SparseOptimizer, _sum_duplicates
from ctrkit.testing import write_dataset, write_tfrecords
from ctrkit.trainer import TrainingError, _load_checkpoint, _latest_checkpoint, load_run_model, train

ROWS, WINDOWS, BATCH = 1500, 4, 128


def small_config(**train_kw) -> Config:
    return Config.from_dict(
        {
            "name": "t",
            "model": {"embedding_dim": 4, "cross_layers": 2, "dnn_units": [16, 8]},
            "train": {"batch_size": BATCH, "optimizer": "adam", "learning_rate": 0.01, "checkpoint_every_steps": 5,
                      "log_every_steps": 5, **train_kw},
        }
    )


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("trainer") / "data", windows=WINDOWS, rows_per_window=ROWS, seed=1)


@pytest.fixture(scope="session")
def full_run(dataset, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "full")
    return train(small_config(), dataset.directory, run_dir, progress=False)


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# -- sparse optimizer -----------------------------------------------------------------------------------------
def _grads(ids, rows=10, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(len(ids), dim)).astype(np.float32)
    return tf.IndexedSlices(tf.constant(values), tf.constant(ids, tf.int64), tf.constant([rows, dim], tf.int64)), values


def test_sparse_adagrad_equals_dense_adagrad_with_duplicate_ids() -> None:
    init = np.random.default_rng(1).normal(size=(10, 3)).astype(np.float32)
    sparse_var, dense_var = tf.Variable(init), tf.Variable(init)
    sparse = SparseOptimizer("adagrad", [sparse_var], [sparse_var], learning_rate=0.1)
    dense = SparseOptimizer("adagrad", [dense_var], [], learning_rate=0.1)
    for step, ids in enumerate([[1, 4, 4, 7], [4, 0, 0, 0]]):
        g, _ = _grads(ids, seed=step)
        sparse.apply([g])
        dense.apply([tf.convert_to_tensor(g)])
    np.testing.assert_allclose(sparse_var.numpy(), dense_var.numpy(), rtol=1e-6)
    untouched = [2, 3, 5, 6, 8, 9]
    np.testing.assert_array_equal(sparse_var.numpy()[untouched], init[untouched])


def test_lazy_sparse_adam_matches_reference_and_leaves_other_rows_alone() -> None:
    init = np.random.default_rng(2).normal(size=(10, 3)).astype(np.float64)
    var = tf.Variable(init.astype(np.float32))
    opt = SparseOptimizer("adam", [var], [var], learning_rate=0.05, beta_1=0.9, beta_2=0.99, epsilon=1e-7)
    w, m, v = init.copy(), np.zeros_like(init), np.zeros_like(init)
    for t, ids in enumerate([[1, 4, 4], [4, 9]], start=1):
        g, values = _grads(ids, seed=10 + t)
        opt.apply([g])
        total = {}
        for i, row in zip(ids, values):
            total[i] = total.get(i, 0) + row.astype(np.float64)
        for i, gi in total.items():  # lazy Adam: only rows in the batch move, moments included
            m[i] = 0.9 * m[i] + 0.1 * gi
            v[i] = 0.99 * v[i] + 0.01 * gi**2
            w[i] -= 0.05 * np.sqrt(1 - 0.99**t) / (1 - 0.9**t) * m[i] / (np.sqrt(v[i]) + 1e-7)
    np.testing.assert_allclose(var.numpy(), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(opt.slot_variables()[1].numpy()[[0, 2, 3]], 0)



def _adam_steps(compiled: bool, ids: list, lookups: int = 1) -> tuple[np.ndarray, object, tf.Variable]:
    """Three sparse Adam steps on a 10 × 3 table looked up ``lookups`` times at ``ids`` per step."""
    var = tf.Variable(np.random.default_rng(3).normal(size=(10, 3)).astype(np.float32))
    opt = SparseOptimizer("adam", [var], [var], learning_rate=0.05)
    ids = tf.constant(ids, tf.int64)
    weights = tf.constant(np.random.default_rng(4).normal(size=(*ids.shape, 3)).astype(np.float32))

    def step():
        with tf.GradientTape() as tape:
            loss = sum(tf.reduce_sum(tf.gather(var, ids) * weights * (k + 1)) ** 2 for k in range(lookups))
        opt.apply(tape.gradient(loss, [var]))

    run = tf.function(step) if compiled else step
    for _ in range(3):
        run()
    return var.numpy(), run.get_concrete_function() if compiled else None, var


def _gathers_of(concrete, var: tf.Variable) -> int:
    handle = next(internal for external, internal in concrete.graph.captures if external is var.handle)
    return sum(1 for op in concrete.graph.get_operations()
               if op.type == "ResourceGather" and op.inputs[0].name == handle.name)


@pytest.mark.parametrize("ids", [[1, 4, 4, 7, 4, 0], [[1, 4], [4, 7], [4, 0]]], ids=["one id per row", "multi-valued"])
def test_compiled_sparse_adam_reuses_the_forward_lookup_and_updates_as_eager(ids) -> None:
    """In a compiled step the table's rows come from the forward gather, not a second read of the table."""
    eager, _, _ = _adam_steps(False, ids)
    compiled, concrete, var = _adam_steps(True, ids)
    np.testing.assert_allclose(compiled, eager, rtol=1e-6, atol=1e-7)
    assert not np.allclose(compiled[[1, 4, 7, 0]], np.random.default_rng(3).normal(size=(10, 3))[[1, 4, 7, 0]])
    assert _gathers_of(concrete, var) == 1  # the forward one; the optimizer reads none of the table


def test_a_table_looked_up_twice_reads_its_rows_again_and_updates_as_eager() -> None:
    """Two lookups concatenate the gradient's ids: no single forward gather holds them, so the table is read."""
    eager, _, _ = _adam_steps(False, [1, 4, 4, 7], lookups=2)
    compiled, concrete, var = _adam_steps(True, [1, 4, 4, 7], lookups=2)
    np.testing.assert_allclose(compiled, eager, rtol=1e-6, atol=1e-7)
    assert _gathers_of(concrete, var) == 3  # two forward gathers and the optimizer's own read


@pytest.mark.parametrize("row_shape", [(4,), (2, 3)])
def test_duplicate_ids_are_summed_once_per_id_in_first_seen_order(row_shape) -> None:
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 50, size=300)  # ~6 repeats per id
    rows = rng.normal(size=(300, *row_shape)).astype(np.float32)
    unique, positions, summed = tf.function(_sum_duplicates)(tf.constant(ids), tf.constant(rows))
    _, first = np.unique(ids, return_index=True)
    expected_ids = ids[np.sort(first)]
    np.testing.assert_array_equal(unique.numpy(), expected_ids)
    np.testing.assert_array_equal(unique.numpy()[positions.numpy()], ids)
    expected = np.stack([rows[ids == i].sum(axis=0) for i in expected_ids])
    np.testing.assert_allclose(summed.numpy(), expected, rtol=1e-5, atol=1e-5)

def test_embedding_learning_rate_moves_the_tables_and_learning_rate_the_rest(dataset) -> None:
    """Adam's first step moves every coordinate with a gradient by its learning rate (m̂/√v̂ = ±1)."""
    import keras

    from ctrkit.model import build_model, embedding_layer
    from ctrkit.trainer import make_optimizer

    cfg = small_config(learning_rate=0.01, embedding_learning_rate=0.2)
    keras.utils.set_random_seed(0)
    model = build_model(cfg, dataset.manifest)
    opt = make_optimizer(cfg, model)
    tables = {id(t.value) for t in embedding_layer(model).embedding_tables.values()}
    before = [v.numpy().copy() for v in opt.variables]
    batch = {k: v[:BATCH] for k, v in dataset.features[0].items()}
    with tf.GradientTape() as tape:
        logits = tf.reshape(model(batch, training=True)["uncalibrated_logits"], [-1])
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=dataset.labels[0][:BATCH], logits=logits))
    opt.apply(tape.gradient(loss, opt.variables))
    for var, old in zip(opt.variables, before):
        moved = np.abs(var.numpy() - old).max()
        assert moved == pytest.approx(0.2 if id(var) in tables else 0.01, rel=0.01), var.name


def test_dense_gradient_for_a_table_is_refused() -> None:
    var = tf.Variable(tf.zeros([4, 2]))
    opt = SparseOptimizer("adam", [var], [var])
    with pytest.raises(TypeError, match="dense gradient"):
        opt.apply([tf.ones([4, 2])])


# -- the online run ---------------------------------------------------------------------------------------------
def test_every_record_is_trained_exactly_once_in_time_order(full_run, dataset) -> None:
    batches = _read_jsonl(os.path.join(full_run.run_dir, "batches.jsonl"))
    assert full_run.examples == WINDOWS * ROWS == sum(b["count"] for b in batches)
    assert [b["step"] for b in batches] == list(range(1, len(batches) + 1))
    seen = set()
    for b in batches:
        span = {(b["window"], b["shard"], r) for r in range(b["offset"], b["offset"] + b["count"])}
        assert not span & seen
        seen |= span
    order = [(b["window"], b["shard"], b["offset"]) for b in batches]
    assert order == sorted(order)


def test_run_dir_records_metrics_exports_and_final_model(full_run, dataset) -> None:
    run = full_run.run_dir
    lines = _read_jsonl(os.path.join(run, "metrics.jsonl"))
    windows = [ln for ln in lines if ln["type"] == "window"]
    assert [w["window"]["examples"] for w in windows] == [ROWS] * WINDOWS
    assert windows[-1]["cumulative"]["examples"] == WINDOWS * ROWS
    assert lines[-1]["type"] == "final" and lines[-1]["cumulative"] == full_run.metrics
    for key in ("auc", "logloss", "ne", "calibration", "ece"):
        assert isinstance(full_run.metrics[key], float)
    # It learns: the last window is predicted better than the first.
    assert windows[-1]["window"]["auc"] > windows[0]["window"]["auc"] + 0.05
    assert windows[-1]["window"]["logloss"] < windows[0]["window"]["logloss"]
    assert len(full_run.exports) == WINDOWS and all(os.path.exists(p) for p in full_run.exports)
    info = json.load(open(os.path.join(run, "run.json")))
    assert info["status"] == "completed" and info["manifest"].endswith("manifest.json")
    assert os.listdir(os.path.join(run, "tensorboard"))
    model = load_run_model(run)
    first = {k: v[:5] for k, v in dataset.features[0].items()}
    assert np.asarray(model(first)["probabilities"]).shape == (5, 1)


@pytest.mark.parametrize("dropout", [0.0, 0.3])  # with dropout the step scores in a separate inference pass
def test_progressive_metrics_use_predictions_made_before_the_update(dataset, tmp_path, dropout) -> None:
    import dataclasses

    import keras

    from ctrkit.model import build_model

    cfg = small_config(learning_rate=0.5)  # a big step: post-update predictions would differ clearly
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=dropout))
    result = train(cfg, dataset.directory, str(tmp_path / "one"), progress=False, max_steps=1)
    assert result.steps == 1 and result.examples == BATCH
    keras.utils.set_random_seed(cfg.train.seed)
    initial = build_model(cfg, dataset.manifest)  # same seed -> the weights the first batch was scored with
    first = {k: v[:BATCH] for k, v in dataset.features[0].items()}
    p = np.asarray(initial(first)["probabilities"]).reshape(-1)
    y = dataset.labels[0][:BATCH]
    logloss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    assert result.metrics["logloss"] == pytest.approx(logloss, rel=1e-4)
    trained = load_model_from_checkpoint(cfg, dataset, str(tmp_path / "one"))
    p_after = np.asarray(trained(first)["probabilities"]).reshape(-1)
    assert np.abs(p_after - p).max() > 1e-3  # the update happened after scoring


def _checkpoint_meta(run_dir):
    with _load_checkpoint(_latest_checkpoint(run_dir)) as (_, meta):
        return meta


def load_model_from_checkpoint(cfg, dataset, run_dir):
    import keras

    from ctrkit.model import build_model

    keras.utils.set_random_seed(cfg.train.seed)
    model = build_model(cfg, dataset.manifest)
    with _load_checkpoint(_latest_checkpoint(run_dir)) as (arrays, _):
        for i, w in enumerate(model.weights):
            w.assign(arrays[f"weight/{i}"])
    return model


def test_stop_and_resume_equals_an_uninterrupted_run(full_run, dataset, tmp_path) -> None:
    run = str(tmp_path / "resumed")
    cfg = small_config()
    part = train(cfg, dataset.directory, run, progress=False, max_steps=17)  # mid-shard, between checkpoints
    assert part.steps == 17 and not part.model_path
    done = train(cfg, dataset.directory, run, resume=True, progress=False)
    assert done.examples == full_run.examples and done.steps == full_run.steps
    assert _read_jsonl(os.path.join(run, "batches.jsonl")) == _read_jsonl(os.path.join(full_run.run_dir, "batches.jsonl"))
    assert done.metrics == pytest.approx(full_run.metrics, rel=1e-6)
    a, b = load_run_model(run), load_run_model(full_run.run_dir)
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_allclose(wa.numpy(), wb.numpy(), rtol=1e-5, atol=1e-6)


def test_resume_with_dropout_continues_the_dropout_masks(dataset, tmp_path) -> None:
    """The Dropout layers' generator states were not checkpointed: a resumed run drew the masks of steps 1,
    2, ... again and ended elsewhere (max |Δw| 0.073)."""
    import dataclasses

    cfg = small_config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.3))
    whole = train(cfg, dataset.directory, str(tmp_path / "whole"), windows=[0, 1], progress=False)
    run = str(tmp_path / "resumed")
    train(cfg, dataset.directory, run, windows=[0, 1], progress=False, max_steps=17)
    done = train(cfg, dataset.directory, run, windows=[0, 1], resume=True, progress=False)
    assert done.steps == whole.steps
    for wa, wb in zip(load_run_model(run).weights, load_run_model(whole.run_dir).weights):
        np.testing.assert_allclose(wa.numpy(), wb.numpy(), rtol=1e-5, atol=1e-6, err_msg=wa.path)


def test_throughput_counts_the_training_loop_not_exports(dataset, tmp_path) -> None:
    """A TF Serving export inside the loop (every window) was counted as training time: a distilled student
    read 270 rows/s against 1,506 without distillation in `ctrkit run`'s report."""
    import time

    calls = []

    def slow_export(model, manifest, step):
        calls.append(step)
        time.sleep(2.0)
        return str(tmp_path / f"export-{step}")

    t = time.perf_counter()
    result = train(small_config(), dataset.directory, str(tmp_path / "run"), windows=[0, 1], export_fn=slow_export,
                   progress=False)
    wall = time.perf_counter() - t
    assert len(calls) >= 2
    training_seconds = result.examples / result.examples_per_second
    # Not a speed claim: the sleeps happened inside train() and must not be in its training time.
    assert training_seconds <= wall - 2.0 * len(calls), (training_seconds, wall, calls)


def test_run_dir_misuse_is_refused(full_run, dataset, tmp_path) -> None:
    with pytest.raises(InputError, match="already holds a run"):
        train(small_config(), dataset.directory, full_run.run_dir, progress=False)
    with pytest.raises(InputError, match="holds no run to resume"):
        train(small_config(), dataset.directory, str(tmp_path / "empty"), resume=True, progress=False)
    (tmp_path / "empty").mkdir()  # a directory without a run in it: the same, from inside the lock
    with pytest.raises(InputError, match="holds no run to resume"):
        train(small_config(), dataset.directory, str(tmp_path / "empty"), resume=True, progress=False)
    with pytest.raises(InputError, match=r"config differs .* \['train'\]"):
        train(small_config(learning_rate=0.5), dataset.directory, full_run.run_dir, resume=True, progress=False)
    with pytest.raises(InputError, match="the run trained on"):
        train(small_config(), dataset.directory, full_run.run_dir, resume=True, windows=[0], progress=False)
    # Another tool's directory: a new run overwrote its config.yaml and pruned its checkpoints/ckpt-N.
    project = tmp_path / "project"
    (project / "checkpoints" / "ckpt-3").mkdir(parents=True)
    (project / "config.yaml").write_text("# the team's config\n")
    with pytest.raises(InputError, match=r"is not empty and holds no ctrkit run \(checkpoints, config.yaml\)"):
        train(small_config(), dataset.directory, str(project), progress=False)
    assert (project / "config.yaml").read_text() == "# the team's config\n"
    assert sorted(os.listdir(project)) == ["checkpoints", "config.yaml"]
    assert os.listdir(project / "checkpoints") == ["ckpt-3"]
    volume = tmp_path / "volume"  # a fresh volume mounted as the run directory, kept in git: a new run
    (volume / "lost+found").mkdir(parents=True)
    (volume / ".gitkeep").write_text("")
    assert train(small_config(), dataset.directory, str(volume), max_steps=2, progress=False).steps == 2


def test_export_base_path_in_the_config_publishes_without_an_export_fn(dataset, tmp_path, monkeypatch) -> None:
    """train() from Python ignored export.base_path (only the CLI built the exporter): no TF Serving version
    was written and nothing said so. The exporter itself is replaced here; its own tests cover it."""
    from ctrkit.serving import export

    made, published = [], []

    def fake_make_export_fn(base_path, model_name, keep_versions=5, **kw):
        made.append((base_path, model_name, keep_versions, kw))

        def export_fn(model, manifest, step):
            published.append(step)
            return f"{base_path}/{model_name}/{step}"

        return export_fn

    monkeypatch.setattr(export, "make_export_fn", fake_make_export_fn)
    cfg = Config.from_dict({**small_config().to_dict(), "calibration": {"downsampling_rate": 0.5},
                            "export": {"base_path": str(tmp_path / "serving"), "model_name": "ctr", "keep_versions": 2}})
    # The warmup requests come from the raw logs the manifest records; these generated data have none (as when
    # the logs were cleaned up after preprocessing): refused before training, not after the first window.
    with pytest.raises(InputError, match="export.base_path is set, so each TF Serving version gets warmup requests"):
        train(cfg, dataset.directory, str(tmp_path / "no_logs"), windows=[0, 1], progress=False)
    assert os.listdir(tmp_path / "no_logs") == [".lock"]
    rows = [{"c0": "a"}]
    monkeypatch.setattr(export, "raw_rows_from_manifest", lambda manifest: rows)
    result = train(cfg, dataset.directory, str(tmp_path / "run"), windows=[0, 1], progress=False)
    assert made == [(str(tmp_path / "serving"), "ctr", 2, {"warmup_examples": rows, "downsampling_rate": 0.5})]
    assert published and result.exports == [f"{tmp_path / 'serving'}/ctr/{s}" for s in published]

    def logs_gone(manifest):
        raise export.ExportError("raw input day1.tsv recorded in the manifest is not there")

    monkeypatch.setattr(export, "raw_rows_from_manifest", logs_gone)  # an orchestrator's retry of a finished run
    assert train(cfg, dataset.directory, str(tmp_path / "run"), windows=[0, 1], resume=True,
                 progress=False).already_finished


def test_resume_refuses_data_rewritten_or_moved_under_the_same_path(tmp_path) -> None:
    """A retry after `preprocess --overwrite` rebuilt the data (or after a `latest` symlink moved) resumed on
    the new data, trained the rest of the run on it and exited 0."""
    import shutil

    data = tmp_path / "day1"
    write_dataset(data, windows=2, rows_per_window=400, seed=3)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "created_at": "2026-01-01T00:00:00+00:00"}))
    shutil.copytree(data, tmp_path / "day1_copy")
    latest = tmp_path / "latest"
    latest.symlink_to(data)
    run = str(tmp_path / "run")
    train(small_config(), str(latest), run, max_steps=6, progress=False)  # a checkpoint at step 5

    copy = tmp_path / "day1_copy"  # another day's output: same shapes, written at another time
    (copy / "manifest.json").write_text(json.dumps({**manifest, "created_at": "2026-01-02T00:00:00+00:00"}))
    latest.unlink()
    latest.symlink_to(copy)
    with pytest.raises(InputError, match=r"not the data this run trained on \(it was written 2026-01-02T00:00:00"
                                         r"\+00:00, the run's data 2026-01-01"):
        train(small_config(), str(latest), run, resume=True, progress=False)
    latest.unlink()
    latest.symlink_to(data)
    (data / "manifest.json").write_text(json.dumps({**manifest, "created_at": "2026-01-03T00:00:00+00:00"}))
    with pytest.raises(InputError, match=r"it was written 2026-01-03T00:00:00\+00:00"):  # rebuilt in place
        train(small_config(), str(latest), run, resume=True, progress=False)
    (data / "manifest.json").write_text(json.dumps({**manifest, "created_at": "2026-01-01T00:00:00+00:00"}))
    shutil.move(data, tmp_path / "other_disk")  # the same output moved and linked back: the same data
    latest.unlink()
    latest.symlink_to(tmp_path / "other_disk")
    result = train(small_config(), str(latest), run, resume=True, progress=False)
    assert result.examples == 800


def test_the_command_draws_no_progress_bar_when_stderr_is_not_a_terminal(dataset, tmp_path, capsys) -> None:
    """Under an orchestrator stderr is a log file: each bar redraw went into it. From Python (a notebook,
    whose stderr is no terminal either) progress=True still draws it."""
    import yaml

    from ctrkit.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(small_config().to_dict()))
    assert main(["train", "--config", str(config), "--data", dataset.directory, "--run-dir", str(tmp_path / "cli")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "ex/s" not in err, err[-500:]
    train(small_config(), dataset.directory, str(tmp_path / "lib"), windows=[0], progress=True)
    assert "ex/s" in capsys.readouterr().err


def test_resume_without_a_recorded_writing_time_still_checks_where_the_data_is(tmp_path) -> None:
    """A manifest without created_at is recorded as None: that is no record, and the real path decides."""
    import shutil

    data = tmp_path / "day1"
    write_dataset(data, windows=2, rows_per_window=400, seed=3)  # no created_at in its manifest
    shutil.copytree(data, tmp_path / "day2")
    latest = tmp_path / "latest"
    latest.symlink_to(data)
    run = str(tmp_path / "run")
    train(small_config(), str(latest), run, max_steps=6, progress=False)
    latest.unlink()
    latest.symlink_to(tmp_path / "day2")
    with pytest.raises(InputError, match=r"not the data this run trained on \(it resolves to .*day2"):
        train(small_config(), str(latest), run, resume=True, progress=False)


@pytest.mark.parametrize("windows", [[1, 0], [WINDOWS], [-1], ["a"]])
def test_bad_windows_are_refused_before_anything_is_written(dataset, tmp_path, windows) -> None:
    """They failed mid-run (an IndexError, or [1, 0] after run.json was written) and left a failed run that
    neither a corrected call nor --resume accepted."""
    run = tmp_path / "run"
    with pytest.raises(InputError, match="windows must be"):
        train(small_config(), dataset.directory, str(run), windows=windows, progress=False)
    assert not run.exists()


def test_train_rechecks_a_changed_config_and_leaves_the_callers_global_state(dataset, tmp_path) -> None:
    """From a notebook: a config edited after loading trained unchecked; train() left op determinism on for
    the whole process and reseeded the caller's random generators (np.random repeated the seed-0 draws)."""
    import random

    from tensorflow.python.framework.config import is_op_determinism_enabled as determinism_enabled

    from ctrkit.configio import ConfigError

    cfg = small_config()
    cfg.train.learning_rate = -0.01
    with pytest.raises(ConfigError, match="learning_rate"):
        train(cfg, dataset.directory, str(tmp_path / "mutated"), progress=False)
    assert not (tmp_path / "mutated").exists()
    with pytest.raises(TypeError, match="config must be a ctrkit.config.Config"):
        train(cfg.data, dataset.directory, str(tmp_path / "data_section"), progress=False)

    np.random.seed(123), random.seed(123)
    expected = (np.random.rand(), random.random())
    np.random.seed(123), random.seed(123)
    assert not determinism_enabled()
    # numpy integers are whole numbers too (they failed at the first log line)
    train(small_config(deterministic=True), dataset.directory, str(tmp_path / "ok"), windows=np.arange(2),
          progress=False)
    assert (np.random.rand(), random.random()) == expected
    assert not determinism_enabled()


def test_warm_start_continues_from_the_previous_run(dataset, tmp_path) -> None:
    cfg = small_config()
    day1 = train(cfg, dataset.directory, str(tmp_path / "day1"), windows=[0, 1, 2], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CtrkitWarning)  # the same model settings: nothing to warn about
        warm = train(cfg, dataset.directory, str(tmp_path / "day2"), windows=[3], warm_start=day1.run_dir,
                     progress=False)
    calls = []

    def export_fn(model, manifest, step):  # what the serving exporter receives
        calls.append((step, manifest.rows_written, sorted(model(dataset.features[3])) ))
        return f"/exports/{step}"

    cold = train(cfg, dataset.directory, str(tmp_path / "cold"), windows=[3], progress=False, export_fn=export_fn)
    assert calls == [(cold.steps, dataset.manifest.rows_written, ["logits", "probabilities", "uncalibrated_logits"])]
    assert cold.exports == [f"/exports/{cold.steps}"] and not os.path.exists(os.path.join(cold.run_dir, "models"))
    assert warm.examples == cold.examples == ROWS
    assert warm.metrics["logloss"] < cold.metrics["logloss"] - 0.01
    assert warm.metrics["auc"] > cold.metrics["auc"]


def test_warm_start_names_model_settings_that_differ_from_the_previous_run(dataset, tmp_path) -> None:
    day1 = train(small_config(), dataset.directory, str(tmp_path / "day1"), windows=[0], progress=False)
    changed = small_config().to_dict()
    changed["model"].update(activation="smelu", dropout=0.1)  # the same weight shapes: the weights still load
    with pytest.warns(CtrkitWarning) as caught:
        train(Config.from_dict(changed), dataset.directory, str(tmp_path / "day2"), windows=[1],
              warm_start=day1.run_dir, progress=False)
    message = " ".join(str(w.message) for w in caught if issubclass(w.category, CtrkitWarning))
    assert "model.activation: 'relu' there, 'smelu' here" in message
    assert "model.dropout: 0.0 there, 0.1 here" in message and "embedding_dim" not in message


def test_non_finite_loss_stops_naming_step_and_window_and_exports_nothing_more(dataset, tmp_path) -> None:
    bad = write_dataset(tmp_path / "bad", windows=2, rows_per_window=300, shards_per_window=1, seed=3)
    feats = dict(bad.features[1])
    feats["n0"] = feats["n0"].copy()
    feats["n0"][200] = np.inf
    write_tfrecords(os.path.join(bad.directory, bad.manifest.windows[1].shards[0]), {**feats, "label": bad.labels[1]})
    run = str(tmp_path / "run")
    with pytest.raises(TrainingError, match=r"step 5 in window 'w001'.*nothing was exported"):
        train(small_config(), bad.directory, run, progress=False)
    exported = sorted(os.listdir(os.path.join(run, "models")))
    assert exported == ["000000003.keras"]  # window w000 only (300 rows = 3 batches)
    assert not os.path.exists(os.path.join(run, "model.keras"))
    assert json.load(open(os.path.join(run, "run.json")))["status"] == "failed"


def test_rank_head_and_dropout_train(dataset, tmp_path) -> None:
    cfg = Config.from_dict({
        "model": {"embedding_dim": 4, "cross_layers": 1, "dnn_units": [8], "dropout": 0.3, "rank_head": True},
        "train": {"batch_size": BATCH, "optimizer": "adagrad", "learning_rate": 0.05},
    })
    result = train(cfg, dataset.directory, str(tmp_path / "rank"), windows=[0], progress=False)
    assert result.examples == ROWS and np.isfinite(result.metrics["logloss"])
    model = load_run_model(result.run_dir)
    out = model({k: v[:8] for k, v in dataset.features[0].items()})
    assert "rank_logits" in out
    # Inference is deterministic although the model has dropout (progressive metrics use inference outputs).
    again = model({k: v[:8] for k, v in dataset.features[0].items()})
    np.testing.assert_array_equal(np.asarray(out["probabilities"]), np.asarray(again["probabilities"]))


def test_an_overflowed_update_with_a_finite_loss_is_not_exported(tmp_path) -> None:
    # n0 = 1e12 keeps the loss finite but overflows Adam's v = g² slot; one step later the weights are NaN.
    data = write_dataset(tmp_path / "data", windows=2, rows_per_window=300, shards_per_window=1, seed=3)
    feats = dict(data.features[0])
    feats["n0"] = feats["n0"].copy()
    feats["n0"][5] = 1e12
    write_tfrecords(os.path.join(data.directory, data.manifest.windows[0].shards[0]), {**feats, "label": data.labels[0]})
    cfg = small_config(batch_size=512)  # one batch per window: the overflow happens on the window's last step
    run = str(tmp_path / "run")
    with pytest.raises(TrainingError, match=r"after step 1 in window 'w000' .*NaN/Inf.*Nothing was exported"):
        train(cfg, data.directory, run, progress=False)
    assert not os.path.exists(os.path.join(run, "models")) or not os.listdir(os.path.join(run, "models"))
    assert _latest_checkpoint(run) is None
    assert json.load(open(os.path.join(run, "run.json")))["status"] == "failed"
    # Also when the run stops at --max-steps right after the overflow (the save on that path checks too).
    stopped = str(tmp_path / "stopped")
    with pytest.raises(TrainingError, match=r"after step 1 in window 'w000' .*NaN/Inf.*Nothing was checkpointed"):
        train(small_config(), data.directory, stopped, progress=False, max_steps=1)  # 1 of 3 batches in w000
    assert json.load(open(os.path.join(stopped, "run.json")))["status"] == "failed"


class _Killed(BaseException):
    """Stands in for SIGKILL at one exact point (a real kill cannot be aimed that precisely)."""


def test_a_kill_while_a_step_is_saved_again_leaves_a_resumable_run(dataset, tmp_path, monkeypatch) -> None:
    import re

    import ctrkit.trainer as trainer_module

    run = str(tmp_path / "run")
    ckpts = os.path.join(run, "checkpoints")
    real_replace = os.replace

    def replace(src, dst):
        # The run's last save repeats the step of its last window-end checkpoint; die while publishing it.
        latest = os.path.join(ckpts, "LATEST")
        if src.endswith(".tmp") and os.path.isdir(src) and os.path.exists(latest):
            step = lambda name: re.match(r"ckpt-(\d+)", os.path.basename(name)).group(1)  # noqa: E731
            if step(dst) == step(open(latest).read().strip()):
                raise _Killed()
        return real_replace(src, dst)

    monkeypatch.setattr(trainer_module.os, "replace", replace)
    with pytest.raises(_Killed):
        train(small_config(), dataset.directory, run, progress=False)
    monkeypatch.setattr(trainer_module.os, "replace", real_replace)
    assert _latest_checkpoint(run) is not None  # LATEST still names a complete checkpoint
    done = train(small_config(), dataset.directory, run, resume=True, progress=False)
    assert done.examples == WINDOWS * ROWS
    assert _checkpoint_meta(run)["finished"]


def test_a_finished_run_keeps_its_newest_distinct_checkpoints(dataset, tmp_path) -> None:
    """The final save repeats the last window's step; both copies counted towards keep_checkpoints, so a
    finished run held two identical checkpoints of its last step and nothing to roll back to."""
    from ctrkit.trainer import _checkpoint_key

    run = str(tmp_path / "run")
    train(small_config(keep_checkpoints=2), dataset.directory, run, windows=[0], progress=False)
    names = sorted(n for n in os.listdir(os.path.join(run, "checkpoints")) if _checkpoint_key(n))
    steps = [_checkpoint_key(n)[0] for n in names]
    assert len(names) == 2 and len(set(steps)) == 2, names
    last = -(-ROWS // BATCH)
    assert max(steps) == last and min(steps) < last
    assert open(os.path.join(run, "checkpoints", "LATEST")).read().strip() == max(names, key=_checkpoint_key)
    assert _checkpoint_meta(run)["finished"]


def test_an_export_published_before_a_kill_is_kept_not_published_again(dataset, tmp_path, monkeypatch) -> None:
    """The resume published the interrupted window's export a second time: an orphan version beside it."""
    import ctrkit.trainer as trainer_module

    published = []

    def export_fn(model, manifest, step):  # publishes a version directory, as the serving exporter does
        path = str(tmp_path / "versions" / str(len(published) + 1))
        os.makedirs(path)
        published.append(step)
        return path

    real_save = trainer_module._save_checkpoint

    def save(ckpt_dir, state, meta, keep, **kw):
        if meta["exports"]:  # the checkpoint right after the first window's export: killed before it
            raise _Killed()
        return real_save(ckpt_dir, state, meta, keep, **kw)

    run = str(tmp_path / "run")
    monkeypatch.setattr(trainer_module, "_save_checkpoint", save)
    with pytest.raises(_Killed):
        train(small_config(), dataset.directory, run, progress=False, export_fn=export_fn)
    monkeypatch.setattr(trainer_module, "_save_checkpoint", real_save)
    window_end = published[0]
    assert _checkpoint_meta(run)["step"] < window_end  # the resume trains up to it again
    with open(os.path.join(run, "exports.jsonl"), "a") as f:
        f.write('{"step": 99, "pa')  # a line cut by a kill: the next export must not be glued onto it
    train(small_config(), dataset.directory, run, resume=True, progress=False, export_fn=export_fn,
          max_steps=window_end + 1)
    done = train(small_config(), dataset.directory, run, resume=True, progress=False, export_fn=export_fn)
    assert published.count(window_end) == 1 and len(published) == WINDOWS
    assert done.exports == [str(tmp_path / "versions" / str(i)) for i in range(1, WINDOWS + 1)]
    assert [e["step"] for e in _read_jsonl(os.path.join(run, "exports.jsonl"))] == published


def test_trained_on_data_goes_by_the_real_path_recorded_at_training(tmp_path) -> None:
    """A run trained through latest -> day1 was taken to have trained on day2 once latest pointed there."""
    from ctrkit.trainer import trained_on_data

    (tmp_path / "day1").mkdir()
    (tmp_path / "day2").mkdir()
    os.symlink(tmp_path / "day2", tmp_path / "latest")  # repointed since the run trained through it
    info = {"data_dir": str(tmp_path / "latest"), "data_realpath": str(tmp_path / "day1")}
    assert trained_on_data(info, str(tmp_path / "day1"))
    assert not trained_on_data(info, str(tmp_path / "day2")) and not trained_on_data(info, str(tmp_path / "latest"))
    assert trained_on_data({"data_dir": str(tmp_path / "latest")}, str(tmp_path / "day2"))  # older run.json


def test_warm_start_refuses_data_from_another_vocabulary(dataset, tmp_path) -> None:
    import shutil

    def with_vocabulary(name: str, tokens: str) -> str:
        data = str(tmp_path / name)
        shutil.copytree(dataset.directory, data)
        os.makedirs(os.path.join(data, "transform_fn", "assets"))
        with open(os.path.join(data, "transform_fn", "assets", "vocab_c0"), "w") as f:
            f.write(tokens)
        return data

    day1, same, other = (with_vocabulary(n, t) for n, t in (("d1", "a\nb\n"), ("same", "a\nb\n"), ("other", "b\na\n")))
    prev = train(small_config(), day1, str(tmp_path / "day1"), windows=[0], progress=False)
    ok = train(small_config(), same, str(tmp_path / "day2"), windows=[1], warm_start=prev.run_dir, progress=False)
    assert ok.examples == ROWS
    with pytest.raises(InputError, match=r"different vocabularies.*--transform-fn"):
        train(small_config(), other, str(tmp_path / "day2b"), windows=[1], warm_start=prev.run_dir, progress=False)
    # The same vocabularies, numeric columns listed in another order (re-analyzed with a reordered config): x0
    # would feed n1 to n0's weights, and the weights load by name and shape.
    import dataclasses

    from ctrkit.manifest import Manifest

    swapped = with_vocabulary("swapped", "a\nb\n")
    m = Manifest.load(swapped)
    order = {"n0": "n1", "n1": "n0"}
    dataclasses.replace(m, features=tuple(sorted(m.features, key=lambda f: order.get(f.name, f.name)))).save(swapped)
    assert [f.name for f in Manifest.load(swapped).numeric_features] == ["n1", "n0"]
    with pytest.raises(InputError, match=r"numeric features in the order \['n0', 'n1'\].*lists them as \['n1', 'n0'\]"):
        train(small_config(), swapped, str(tmp_path / "day2c"), windows=[1], warm_start=prev.run_dir, progress=False)


def _tensorboard_events(run_dir: str) -> list[tuple[str, int]]:
    from tensorflow.core.util import event_pb2

    out = []
    log_dir = os.path.join(run_dir, "tensorboard")
    for name in sorted(os.listdir(log_dir)):
        for record in tf.data.TFRecordDataset(os.path.join(log_dir, name)):
            event = event_pb2.Event.FromString(record.numpy())
            out += [(v.tag, event.step) for v in event.summary.value]
    return out


def test_resume_after_a_crash_logs_every_tensorboard_point_once(dataset, tmp_path, monkeypatch) -> None:
    import ctrkit.trainer as trainer_module

    cfg = small_config(log_every_steps=1)  # checkpoints every 5 steps; the crash comes 3 steps after one
    run = str(tmp_path / "run")
    calls = []

    def sleep(seconds):
        calls.append(seconds)
        if len(calls) == 13:
            raise _Killed()

    monkeypatch.setattr(trainer_module.time, "sleep", sleep)
    with pytest.raises(_Killed):
        train(cfg, dataset.directory, run, progress=False, step_delay=0.001)
    monkeypatch.undo()
    import gc

    gc.collect()  # the crashed run's summary writer flushes what it buffered, as a slow kill might
    before = _tensorboard_events(run)
    assert max(step for _, step in before) > 10  # events past the step-10 checkpoint reached the disk
    done = train(cfg, dataset.directory, run, resume=True, progress=False)
    events = _tensorboard_events(run)
    assert len(events) == len(set(events))  # no (tag, step) twice
    assert sorted(step for tag, step in events if tag == "train/loss") == list(range(1, done.steps + 1))


def test_a_window_end_logged_before_a_crash_is_not_logged_twice(dataset, tmp_path) -> None:
    # 1500 rows / 128 = 12 batches: window w000 ends at step 12, where the periodic checkpoint (every 4) also
    # falls. A crash in the window-end export leaves that checkpoint, which does not count the window yet.
    cfg = small_config(checkpoint_every_steps=4, log_every_steps=5)
    run = str(tmp_path / "run")

    def crash(model, manifest, step):
        raise _Killed()

    with pytest.raises(_Killed):
        train(cfg, dataset.directory, run, progress=False, export_fn=crash)
    import gc

    gc.collect()  # the crashed run's summary writer flushes what it buffered
    assert ("window/auc", 12) in _tensorboard_events(run)  # the window end reached the disk before the crash
    done = train(cfg, dataset.directory, run, resume=True, progress=False)
    events = _tensorboard_events(run)
    assert len(events) == len(set(events))  # no (tag, step) twice
    assert sorted(step for tag, step in events if tag == "window/auc") == [12, 24, 36, done.steps]


def test_config_describing_other_columns_than_the_data_is_warned_about(tmp_path) -> None:
    """The model follows the manifest; a config whose data section describes other columns trained without
    a word and went into the run's config.yaml as if it had been used."""
    import warnings

    from ctrkit.configio import to_dict

    data = write_dataset(tmp_path / "data", windows=1, rows_per_window=300, seed=2)
    path = os.path.join(data.directory, "manifest.json")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["config"]["data"] = to_dict(Config().data)  # as if preprocessed with the default (Criteo) columns
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    with pytest.warns(UserWarning, match=r"preprocessed with other data\.columns than this config's \(they differ "
                                         r"at \[.*'c \(only here\)'"):
        train(Config.from_dict({**small_config().to_dict(), "data": {"format": "csv", "columns": [
            {"name": "y", "kind": "label"}, {"name": "c"}]}}), data.directory, str(tmp_path / "a"),
              progress=False, max_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the config the data was made with: no warning
        train(small_config(), data.directory, str(tmp_path / "b"), progress=False, max_steps=1)
    # The CLI still raises it as a warning (pytest.warns, catch_warnings(record=True) record it) ...
    import yaml

    from ctrkit.cli import _print_ctrkit_warnings_as_lines, main
    from ctrkit.errors import CtrkitWarning

    config = tmp_path / "other.yaml"
    config.write_text(yaml.safe_dump({**small_config().to_dict(), "data": {"format": "csv", "columns": [
        {"name": "y", "kind": "label"}, {"name": "c"}]}}))
    with pytest.warns(CtrkitWarning, match="preprocessed with other data.columns"):
        assert main(["train", "--config", str(config), "--data", data.directory, "--run-dir", str(tmp_path / "c"),
                     "--no-progress", "--max-steps", "1"]) == 0
    assert warnings.formatwarning.__module__ == "warnings"  # restored after the command
    # ... and shows it as one line, not as Python's "path:line: UserWarning" plus a source line.
    default = _print_ctrkit_warnings_as_lines("train")
    try:
        shown = warnings.formatwarning(CtrkitWarning("data differs"), CtrkitWarning, "/x/trainer.py", 7)
        other = warnings.formatwarning(UserWarning("else"), UserWarning, "/x/y.py", 3)
    finally:
        warnings.formatwarning = default
    assert shown == "ctrkit train: warning: data differs\n"
    assert other.startswith("/x/y.py:3: UserWarning: else")


def test_the_final_save_links_the_last_windows_state_instead_of_writing_it_again(dataset, tmp_path, monkeypatch) -> None:
    """A finished run wrote its whole state twice at the end (the last window's checkpoint, then the final
    one with the same weights, slots and metrics): at scale ~5-8 s and a transient copy per GB."""
    import ctrkit.trainer as trainer

    writes: list[int] = []
    real = trainer._write_npz
    monkeypatch.setattr(trainer, "_write_npz", lambda f, items: (writes.append(1), real(f, items))[1])
    steps_per_window = -(-ROWS // BATCH)  # the last batch of a window is short
    run = str(tmp_path / "run")
    # Periodic saves on each window's last step, then end_window saves there again with the window's metrics
    # closed: that state differs and must be written; only the final save repeats one.
    done = train(small_config(checkpoint_every_steps=steps_per_window), dataset.directory, run, progress=False)
    assert done.steps == WINDOWS * steps_per_window
    assert len(writes) == 2 * WINDOWS  # before: 2 * WINDOWS + 1
    ckpts = os.path.join(run, "checkpoints")
    with trainer._load_checkpoint(trainer._latest_checkpoint(run)) as (arrays, meta):
        assert meta["finished"] and meta["step"] == done.steps
        model = load_run_model(run)
        for i, w in enumerate(model.weights):
            np.testing.assert_array_equal(arrays[f"weight/{i}"], w.numpy())
    assert os.stat(os.path.join(trainer._latest_checkpoint(run), "state.npz")).st_nlink == 1  # the earlier one pruned
    assert len(os.listdir(ckpts)) == 1 + 2  # LATEST and keep_checkpoints = 2
