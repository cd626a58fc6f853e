"""Calibration with the body frozen: a negative-downsampled (mis-calibrated) model gets back to ratio ~1."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

from ctrkit.calibrate import apply_downsampling_correction, fit_calibration, score_stream
from ctrkit.cli import main
from ctrkit.config import CalibrationConfig, Config, ConfigError
from ctrkit.errors import CtrkitWarning
from ctrkit.metrics import StreamingMetrics, downsampling_correction
from ctrkit.model import build_model
from ctrkit.testing import write_dataset
from ctrkit.trainer import load_run_model, train

KEEP = 0.25  # negatives kept when training


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    biased = write_dataset(root / "train", windows=3, rows_per_window=4000, shards_per_window=1, seed=20,
                           negative_keep_rate=KEEP, vocab_size=20)
    # 40k rows (~10k clicks) per stream: Σy then carries about ±1% sampling noise, small enough to check the
    # ±2% target on a stream the calibration never saw (with 8k rows that stream alone read 1.04).
    holdout = write_dataset(root / "holdout", windows=1, rows_per_window=40000, shards_per_window=1, seed=21, vocab_size=20)
    test = write_dataset(root / "test", windows=1, rows_per_window=40000, shards_per_window=1, seed=22, vocab_size=20)
    cfg = Config.from_dict({
        "name": "cal",
        "model": {"embedding_dim": 4, "cross_layers": 2, "dnn_units": [16]},
        "train": {"batch_size": 128, "optimizer": "adam", "learning_rate": 0.01, "checkpoint_every_steps": 1000},
    })
    run = train(cfg, biased.directory, str(root / "run"), progress=False)
    return root, run, holdout, test


def _ratio(model, data) -> tuple[float, float]:
    s = score_stream(model, data.manifest)
    m = StreamingMetrics()
    m.update(s["probabilities"], s["labels"])
    r = m.result()
    return r["calibration"], r["ece"]


def test_fitted_calibration_brings_a_downsampled_model_back_to_ratio_one(setup) -> None:
    _, run, holdout, test = setup
    model = load_run_model(run.run_dir)
    body_before = [w.numpy().copy() for w in model.weights if "calibration" not in w.path]
    ratio_test_before, ece_test_before = _ratio(model, test)
    report = fit_calibration(model, holdout.manifest, CalibrationConfig(kind="temperature"))
    print(json.dumps(report, indent=1))
    assert report["before"]["calibration"] > 1.5  # downsampling negatives inflates predictions
    assert abs(report["after"]["calibration"] - 1) < 0.02
    assert report["after"]["ece"] < report["before"]["ece"] / 3
    # Only the calibration layer moved.
    body_after = [w.numpy() for w in model.weights if "calibration" not in w.path]
    for a, b in zip(body_before, body_after):
        np.testing.assert_array_equal(a, b)
    # And the target holds on an independent stream, not only where the layer was fitted (measured: 1.0045).
    ratio_test, ece_test = _ratio(model, test)
    print(f"test stream: ratio {ratio_test_before:.3f} -> {ratio_test:.3f}, ECE {ece_test_before:.4f} -> {ece_test:.4f}")
    assert abs(ratio_test - 1) < 0.02 and ece_test < ece_test_before / 3


def test_closed_form_downsampling_correction_matches_the_formula(setup) -> None:
    _, run, holdout, test = setup
    model = load_run_model(run.run_dir)
    p = score_stream(model, test.manifest)["probabilities"]
    apply_downsampling_correction(model, KEEP)
    q = score_stream(model, test.manifest)["probabilities"]
    np.testing.assert_allclose(q, downsampling_correction(p, KEEP), rtol=1e-4, atol=1e-6)
    ratio, _ = _ratio(model, test)
    print(f"closed-form correction: test calibration ratio {ratio:.3f}")
    assert abs(ratio - 1) < 0.1


def test_piecewise_calibration_fits_and_stays_monotone(setup) -> None:
    _, run, holdout, _ = setup
    cfg = Config.from_dict({"model": {"embedding_dim": 4, "cross_layers": 2, "dnn_units": [16]},
                            "calibration": {"kind": "piecewise", "num_keypoints": 12}})
    model = build_model(cfg, holdout.manifest)
    model.set_weights([w for w in load_run_model(run.run_dir).get_weights()[:-2]] + model.get_weights()[-1:])
    report = fit_calibration(model, holdout.manifest, cfg.calibration)
    assert abs(report["after"]["calibration"] - 1) < 0.05 < abs(report["before"]["calibration"] - 1)
    s = score_stream(model, holdout.manifest)
    order = np.argsort(s["logits"])
    assert np.all(np.diff(s["probabilities"][order]) >= -1e-6)
    with pytest.raises(ConfigError, match="temperature"):
        apply_downsampling_correction(model, 0.5)


def test_calibrate_command_replaces_the_model_and_keeps_the_original(setup, capsys) -> None:
    root, run, holdout, _ = setup
    import shutil

    run_dir = str(root / "cli_run")
    shutil.copytree(run.run_dir, run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CtrkitWarning)  # other data than the run trained on: held out, no warning
        assert main(["calibrate", run_dir, "--data", holdout.directory]) == 0
    out = capsys.readouterr().out
    assert "examples of window(s) w000 (held out); before -> after, on those same examples" in out
    assert "calibration ratio" in out
    report = json.load(open(os.path.join(run_dir, "calibration.json")))
    assert abs(report["after"]["calibration"] - 1) < 0.02 and report["windows"] == ["w000"]
    assert os.path.exists(os.path.join(run_dir, "model_uncalibrated.keras"))
    ratio, _ = _ratio(load_run_model(run_dir), holdout)
    assert ratio == pytest.approx(report["after"]["calibration"], rel=1e-4)


def test_calibrating_on_windows_the_run_trained_on_says_they_are_not_held_out(setup, capsys) -> None:
    """The default windows are the data's last ones; after `ctrkit train --data D` on all of D they were trained
    on, and calibrate still called them held out."""
    import shutil

    root, run, _, _ = setup
    run_dir = str(root / "cli_seen")
    shutil.copytree(run.run_dir, run_dir)
    data = json.load(open(os.path.join(run_dir, "run.json")))["data_dir"]
    with pytest.warns(CtrkitWarning, match=r"trained on window\(s\) w002 of .*: they are not held out.*--windows=:-1"):
        assert main(["calibrate", run_dir, "--data", data, "--no-progress"]) == 0
    assert "examples of window(s) w002 (trained on, not held out)" in capsys.readouterr().out


def test_calibrate_command_applies_the_closed_form_correction_whatever_the_fit_settings(setup, capsys) -> None:
    # The run's config tunes the *fit*; --downsampling-rate replaces the fit, so those settings must not refuse it.
    import shutil

    import yaml

    root, run, holdout, _ = setup
    run_dir = str(root / "cli_closed_form")
    shutil.copytree(run.run_dir, run_dir)
    path = os.path.join(run_dir, "config.yaml")
    cfg = yaml.safe_load(open(path))
    cfg["calibration"] = {**cfg.get("calibration", {}), "steps": 1000, "learning_rate": 0.01}
    yaml.safe_dump(cfg, open(path, "w"))
    assert main(["calibrate", run_dir, "--data", holdout.directory, "--downsampling-rate", str(KEEP)]) == 0
    report = json.load(open(os.path.join(run_dir, "calibration.json")))
    assert abs(report["after"]["calibration"] - 1) < 0.1 < report["before"]["calibration"] - 1


def test_closed_form_correction_of_a_bias_run_whatever_its_segment_prior(tmp_path, capsys) -> None:
    """segment_prior_rows tunes the fit too; with it set, --downsampling-rate was refused ("would be ignored")."""
    data = write_dataset(tmp_path / "data", windows=2, rows_per_window=1000, shards_per_window=1, seed=3,
                         negative_keep_rate=KEEP, vocab_size=20)
    cfg = Config.from_dict({"name": "b", "model": {"embedding_dim": 4, "cross_layers": 1, "dnn_units": [8]},
                            "train": {"batch_size": 128, "checkpoint_every_steps": 1000},
                            "calibration": {"kind": "bias", "segment_feature": "c0", "segment_prior_rows": 10}})
    run = train(cfg, data.directory, str(tmp_path / "run"), windows=[0], progress=False)
    assert main(["calibrate", run.run_dir, "--data", data.directory, "--windows", "1:",
                 "--downsampling-rate", str(KEEP)]) == 0
    bias = load_run_model(run.run_dir).get_layer("calibration").segment_bias.numpy()
    np.testing.assert_allclose(bias, np.log(KEEP), rtol=1e-6)


def test_scoring_a_model_again_reuses_its_compiled_function(setup) -> None:
    """calibrate and compare score the same model several times; each call used to trace a new function."""
    from ctrkit.calibrate import _scorer

    _, run, holdout, test = setup
    model = load_run_model(run.run_dir)
    first = score_stream(model, holdout.manifest)
    traces = _scorer(model).experimental_get_tracing_count()
    again = score_stream(model, holdout.manifest)
    score_stream(model, test.manifest)
    assert _scorer(model).experimental_get_tracing_count() == traces <= 2  # full batches, then the short last one
    np.testing.assert_array_equal(first["probabilities"], again["probabilities"])


def test_scoring_several_models_once_each_raises_no_retracing_warning(setup) -> None:
    """`ctrkit run` scores five or six models once each; their scorers shared one Python function, and
    TensorFlow's frequent-retracing warning counted all their first traces together."""
    import gc
    import logging

    from ctrkit.calibrate import _SCORERS

    _, run, holdout, _ = setup
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        for _ in range(6):
            # One batch per model, as `ctrkit run` scores its small held-out streams: TensorFlow warns when 5
            # of a function's last 10 calls traced.
            score_stream(load_run_model(run.run_dir), holdout.manifest, batch_size=65536)
    finally:
        logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if "retracing" in r.getMessage()]
    gc.collect()
    assert len(_SCORERS) <= 1  # a scored model that is gone takes its compiled function with it


def test_calibrate_shows_progress_of_the_scoring_it_waits_on(setup, capsys, monkeypatch) -> None:
    """Scoring the held-out stream twice is calibrate's long part, and it used to show nothing; on a
    terminal only (in an orchestrator's log file each redraw was another line)."""
    import shutil
    import sys

    root, run, holdout, _ = setup
    run_dir = str(root / "cli_progress")
    shutil.copytree(run.run_dir, run_dir)
    total = sum(w.rows for w in holdout.manifest.windows)
    argv = ["calibrate", run_dir, "--data", holdout.directory, "--downsampling-rate", str(KEEP)]
    assert main(argv) == 0
    assert "scoring" not in capsys.readouterr().err  # stderr is not a terminal here
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(argv) == 0
    err = capsys.readouterr().err
    for stage in ("scoring before calibration", "scoring after calibration"):
        assert stage in err and f"/{total}" in err.split(stage, 1)[1].split("\r", 1)[0]
    assert main([*argv, "--no-progress"]) == 0
    assert "scoring" not in capsys.readouterr().err


def test_an_interrupted_copy_of_the_model_as_trained_is_not_kept_as_it(setup, monkeypatch) -> None:
    """An interrupted copy to model_uncalibrated.keras left a truncated file under that name, which every
    later calibrate took for the kept model: the model as trained was lost."""
    import shutil

    from ctrkit import calibrate

    root, run, _, _ = setup
    run_dir = root / "copy_interrupted"
    shutil.copytree(run.run_dir, run_dir)
    copy2 = shutil.copy2

    def interrupted(src, dst):
        with open(src, "rb") as f, open(dst, "wb") as out:
            out.write(f.read(100))
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copy2", interrupted)
    model = load_run_model(str(run_dir))
    with pytest.raises(KeyboardInterrupt):
        calibrate.replace_run_model(model, str(run_dir))
    assert not (run_dir / "model_uncalibrated.keras").exists()
    monkeypatch.setattr(shutil, "copy2", copy2)
    calibrate.replace_run_model(model, str(run_dir))
    assert (run_dir / "model_uncalibrated.keras").read_bytes() == (root / run.run_dir / "model.keras").read_bytes()


def test_closed_form_on_downsampled_held_out_windows_reports_the_reweighted_ratio(setup, capsys) -> None:
    """Held-out windows downsampled like the training data read ~rate after a correct correction (0.53 for
    rate 0.5 in a user's run), with no word why; the reweighted ratio says what the correction achieved."""
    import shutil

    root, run, _, _ = setup
    downsampled = write_dataset(root / "holdout_downsampled", windows=1, rows_per_window=20000, shards_per_window=1,
                                seed=23, negative_keep_rate=KEEP, vocab_size=20)
    run_dir = str(root / "cli_closed_form_downsampled")
    shutil.copytree(run.run_dir, run_dir)
    assert main(["calibrate", run_dir, "--data", downsampled.directory, "--downsampling-rate", str(KEEP)]) == 0
    out = capsys.readouterr().out
    report = json.load(open(os.path.join(run_dir, "calibration.json")))
    after = report["after"]
    print(f"ratio {after['calibration']:.3f}, reweighted {after['calibration_if_held_out_downsampled']:.3f}")
    assert after["calibration"] < 0.8  # the downsampled labels, as they are (measured 0.593)
    assert abs(after["calibration_if_held_out_downsampled"] - 1) < 0.1  # what the correction predicts (1.043)
    assert f"with their negatives weighted 1/{KEEP:g}: calibration ratio" in out


def test_bias_calibration_shrinks_rare_segments_toward_one_global_correction(tmp_path) -> None:
    """A segment with a few held-out rows and no click must not be scored ~0 for ever after; one absent
    from the held-out stream gets the global correction; a big segment still gets (nearly) its own."""
    vocab = 1000  # 8000 Zipf-distributed rows: ~40 ids absent, ~260 with <= 5 rows and no click
    holdout = write_dataset(tmp_path / "holdout", windows=1, rows_per_window=8000, shards_per_window=1, seed=2,
                            vocab_size=vocab)
    cfg = Config.from_dict({"model": {"embedding_dim": 4, "cross_layers": 1, "dnn_units": [8]},
                            "calibration": {"kind": "bias", "segment_feature": "c0"}})
    model = build_model(cfg, holdout.manifest)  # untrained: its logits are near 0, far from the ~20% CTR
    stream = score_stream(model, holdout.manifest, segment="c0")
    z, y, s = stream["logits"], stream["labels"], stream["segments"].reshape(-1)
    report = fit_calibration(model, holdout.manifest, cfg.calibration)
    assert abs(report["after"]["calibration"] - 1) < 0.01  # the global term is unpenalised: Σp = Σy
    bias = model.get_layer("calibration").segment_bias.numpy()
    rows, clicks = np.bincount(s, minlength=vocab), np.bincount(s, weights=y, minlength=vocab)
    absent, rare_no_click = rows == 0, (rows > 0) & (rows <= 5) & (clicks == 0)
    assert absent.any() and rare_no_click.any(), "the generated stream must hold both kinds of segment"
    global_bias = np.median(bias[absent])
    np.testing.assert_allclose(bias[absent], global_bias, atol=1e-6)
    assert abs(global_bias) > 0.5  # the untrained model's rate is far off: the shared correction moved
    # Unshrunk, these ran to about -6.6 below the rest (only the step budget stopped them).
    assert np.all(np.abs(bias[rare_no_click] - global_bias) < 1.0), bias[rare_no_click] - global_bias
    # The largest segment: its correction solves the documented objective, here by Newton's method on that
    # segment alone given the fitted global term: Σ_i∈s (σ(z_i + g + δ) − y_i) + τ δ = 0, τ = k ȳ(1 − ȳ).
    big = int(np.argmax(rows))
    zb, yb = z[s == big].astype(np.float64) + global_bias, y[s == big]
    tau = cfg.calibration.segment_prior_rows * y.mean() * (1 - y.mean())
    delta = unshrunk = 0.0
    for _ in range(50):
        p, q = 1 / (1 + np.exp(-(zb + delta))), 1 / (1 + np.exp(-(zb + unshrunk)))
        delta -= (p.sum() - yb.sum() + tau * delta) / ((p * (1 - p)).sum() + tau)
        unshrunk -= (q.sum() - yb.sum()) / (q * (1 - q)).sum()
    print(f"largest segment ({rows[big]} rows): fitted {bias[big] - global_bias:.4f}, solved {delta:.4f}, "
          f"unshrunk {unshrunk:.4f}; global {global_bias:.3f}")
    assert abs(unshrunk) > 0.1 and abs(delta) < abs(unshrunk)  # the check below can tell shrunk from not
    assert abs(bias[big] - global_bias - delta) < 0.02, (bias[big] - global_bias, delta, unshrunk)


def test_bias_fit_reaches_the_documented_optimum_for_every_segment_size() -> None:
    """A model off by ~2 logits overall, segments of 20000 to 5 rows: every fitted c[s] solves the documented
    objective (solved here independently by alternating Newton steps). With the global term started at 0,
    the 5-row segment ended 0.8 logit short of it after the default 500 steps."""
    import tensorflow as tf

    from ctrkit.calibrate import _fit_segment_biases
    from ctrkit.layers import BiasCalibration

    rng = np.random.default_rng(0)
    rows, deviations, shift = [20000, 3000, 3000, 50, 5], np.array([0.5, 0.0, -1.0, 0.5, 0.0]), -2.0
    s = np.concatenate([np.full(n, i) for i, n in enumerate(rows)]).astype(np.int64)
    z = (rng.normal(size=len(s)) - 3.5).astype(np.float32)
    y = (rng.random(len(s)) < 1 / (1 + np.exp(-(z + shift + deviations[s])))).astype(np.float32)
    config = CalibrationConfig(kind="bias", segment_feature="c")
    layer = BiasCalibration(len(rows))
    layer(tf.zeros([1, 1]), tf.zeros([1], tf.int64))
    _fit_segment_biases(layer, z, y, s, config)

    tau = config.segment_prior_rows * y.mean() * (1 - y.mean())
    # Newton's method on (g, δ) jointly: Hessian [[Σw, W_s], [W_s, diag(W_s + τ)]], w = p(1 − p).
    zd, theta = z.astype(np.float64), np.zeros(len(rows) + 1)
    for _ in range(30):
        p = 1 / (1 + np.exp(-(zd + theta[0] + theta[1:][s])))
        w_s = np.bincount(s, p * (1 - p), len(rows))
        grad = np.concatenate([[np.sum(p - y)], np.bincount(s, p - y, len(rows)) + tau * theta[1:]])
        hessian = np.diag(np.concatenate([[w_s.sum()], w_s + tau]))
        hessian[0, 1:] = hessian[1:, 0] = w_s
        theta -= np.linalg.solve(hessian, grad)
    assert np.abs(grad).max() < 1e-8
    g, delta = theta[0], theta[1:]
    np.testing.assert_allclose(layer.segment_bias.numpy(), g + delta, atol=0.02)
    assert g < -1.5  # the case is the hard one: a large shared correction


def test_calibrate_and_export_refuse_data_with_other_vocabularies(setup, tmp_path, capsys) -> None:
    """train --warm-start and compare refused data re-analyzed without --transform-fn; calibrate fitted on it
    (reporting "held out") and export published day-2 vocabularies over day-1 embedding rows, exit 0."""
    import shutil

    root, run, holdout, _ = setup
    run_dir = str(tmp_path / "run")
    shutil.copytree(run.run_dir, run_dir)
    other = str(tmp_path / "reanalyzed")
    shutil.copytree(holdout.directory, other)
    os.makedirs(os.path.join(other, "transform_fn", "assets"))
    with open(os.path.join(other, "transform_fn", "assets", "vocab_c0"), "w") as f:
        f.write("b\na\n")  # same sizes, other ids: what a re-analysis of day 2 gives
    before = open(os.path.join(run_dir, "model.keras"), "rb").read()
    assert main(["calibrate", run_dir, "--data", other]) != 0
    assert "different vocabularies" in capsys.readouterr().err
    assert open(os.path.join(run_dir, "model.keras"), "rb").read() == before  # not replaced
    base = str(tmp_path / "models")
    assert main(["export", run_dir, "--data", other, "--base-path", base, "--model-name", "ctr"]) != 0
    assert "different vocabularies" in capsys.readouterr().err and not os.path.exists(base)
