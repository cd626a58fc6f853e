"""Reproducibility: prediction difference between runs; SmeLU lowers it against ReLU (Shamir & Lin 2022)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ctrkit.cli import main
from ctrkit.compare import compare_runs, prediction_difference
from ctrkit.config import Config
from ctrkit.testing import write_dataset
from ctrkit.trainer import train


def test_prediction_difference_formula() -> None:
    p1 = np.array([0.1, 0.2, 0.5])
    p2 = np.array([0.1, 0.3, 0.3])
    assert prediction_difference(p1, p2) == pytest.approx((0 + 0.1 / 0.25 + 0.2 / 0.4) / 3)
    assert prediction_difference(p1, p1) == 0
    with pytest.raises(ValueError):
        prediction_difference(p1, p2[:2])


@pytest.fixture(scope="module")
def pd_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    data = write_dataset(root / "train", windows=3, rows_per_window=3000, shards_per_window=1, seed=30, vocab_size=20)
    test = write_dataset(root / "test", windows=1, rows_per_window=4000, shards_per_window=1, seed=31, vocab_size=20)
    runs = {}
    for act in ("relu", "smelu"):
        for seed in (0, 1, 2, 3):
            cfg = Config.from_dict({
                "name": "pd",
                "model": {"embedding_dim": 4, "cross_layers": 1, "structure": "stacked", "dnn_units": [32, 16], "activation": act},
                "train": {"batch_size": 64, "optimizer": "adam", "learning_rate": 0.01, "seed": seed, "checkpoint_every_steps": 10000},
            })
            runs[act, seed] = train(cfg, data.directory, str(root / f"{act}{seed}"), progress=False).run_dir
    return runs, test


@pytest.mark.slow
def test_smelu_reduces_prediction_difference_against_relu(pd_runs) -> None:
    runs, test = pd_runs
    pd = {}
    for act in ("relu", "smelu"):
        for pair in ((0, 1), (2, 3)):
            report = compare_runs(runs[act, pair[0]], runs[act, pair[1]], test.directory)
            pd[act, pair] = report["pd"]
            print(f"{act} seeds {pair}: PD {report['pd']:.4f}  AUC {report['a']['auc']:.4f} / {report['b']['auc']:.4f}")
    for pair in ((0, 1), (2, 3)):
        assert pd["smelu", pair] < pd["relu", pair]  # same seeds, same data: only the activation differs
    relu = np.mean([pd["relu", p] for p in ((0, 1), (2, 3))])
    smelu = np.mean([pd["smelu", p] for p in ((0, 1), (2, 3))])
    # Measured here: ReLU 0.141, SmeLU 0.106 (-25%); three pairs: 0.132 vs 0.101.
    assert smelu < 0.9 * relu


def test_compare_command_reports_pd_as_json(pd_runs, capsys, monkeypatch) -> None:
    import sys

    runs, test = pd_runs
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # progress bars show on a terminal only
    assert main(["compare", runs["relu", 0], runs["relu", 1], "--data", test.directory, "--json"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)  # the progress bars go to stderr, so stdout stays one JSON document
    assert report["examples"] == 4000 and 0 < report["pd"] < 1
    assert "scoring run A" in out.err and "scoring run B" in out.err and "/4000" in out.err
    assert main(["compare", runs["relu", 0], runs["relu", 0], "--data", test.directory, "--json", "--no-progress"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["pd"] == 0 and "scoring" not in out.err


def test_compare_refuses_data_and_runs_that_do_not_belong_together(pd_runs, tmp_path, capsys) -> None:
    import shutil

    from ctrkit.errors import InputError

    runs, test = pd_runs
    other = write_dataset(tmp_path / "other", windows=1, rows_per_window=500, shards_per_window=1, seed=32, vocab_size=50)
    with pytest.raises(InputError, match=r"feature 'c0' has vocabulary size 20 in the model but 50"):
        compare_runs(runs["relu", 0], runs["relu", 1], other.directory)
    assert main(["compare", runs["relu", 0], runs["relu", 1], "--data", other.directory]) != 0
    assert "vocabulary size" in capsys.readouterr().err  # a one-line error, not a traceback

    # A calibrated run (model_uncalibrated.keras beside model.keras) against an uncalibrated one.
    calibrated = str(tmp_path / "calibrated")
    shutil.copytree(runs["relu", 0], calibrated)
    shutil.copy(f"{calibrated}/model.keras", f"{calibrated}/model_uncalibrated.keras")
    with pytest.raises(InputError, match="calibrated model .*--uncalibrated"):
        compare_runs(calibrated, runs["relu", 0], test.directory)
    assert compare_runs(calibrated, runs["relu", 0], test.directory, uncalibrated=True)["pd"] == 0


def test_compare_prints_na_for_metrics_that_one_class_data_leaves_undefined(pd_runs, tmp_path, capsys) -> None:
    """A window without a click has no AUC or calibration ratio (None); the text output crashed on it."""
    runs, _ = pd_runs
    no_clicks = write_dataset(tmp_path / "no_clicks", windows=1, rows_per_window=300, shards_per_window=1, seed=33,
                              vocab_size=20, bias=-60.0)
    assert not no_clicks.labels[0].any()
    assert main(["compare", runs["relu", 0], runs["relu", 1], "--data", no_clicks.directory, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "300 examples: PD" in out
    assert "run A: AUC n/a  log loss 0." in out and "calibration n/a" in out
