"""Count and size arguments are checked by argparse (one line naming the argument, exit 2) before any work."""
from __future__ import annotations

import pytest
import yaml

from ctrkit.cli import build_parser, main
from ctrkit.config import Config


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--rows", "0"], "argument --rows: must be a positive integer, got 0"),
        (["run", "--days", "0"], "argument --days: must be a positive integer, got 0"),
        (["run", "--rows", "-3"], "argument --rows: must be a positive integer, got -3"),
        (["run", "--rows", "ten"], "argument --rows: must be a positive integer, got 'ten'"),
        (["demo", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        (["train", "--config", "small", "--data", "D", "--run-dir", "R", "--max-steps", "0"],
         "argument --max-steps: must be a positive integer, got 0"),
        (["train", "--config", "small", "--data", "D", "--run-dir", "R", "--max-steps", "-5"],
         "argument --max-steps: must be a positive integer, got -5"),
        (["export", "R", "--base-path", "B", "--model-name", "m", "--keep-versions", "0"],
         "argument --keep-versions: must be a positive integer, got 0"),
        (["export", "R", "--base-path", "B", "--model-name", "m", "--version", "0"],
         "argument --version: must be a positive integer, got 0"),
        (["serve", "B", "--model-name", "m", "--port", "70000"], "argument --port: must be a port number (1-65535), got 70000"),
        (["serve", "B", "--model-name", "m", "--port", "0"], "argument --port: must be a port number (1-65535), got 0"),
        (["serve", "B", "--model-name", "m", "--num-versions", "0"], "argument --num-versions: must be a positive integer, got 0"),
        (["serve", "B", "--model-name", "m", "--max-batch-size", "0"],
         "argument --max-batch-size: must be a positive integer, got 0"),
        (["serve", "B", "--model-name", "m", "--poll-seconds", "0"], "argument --poll-seconds: must be a positive number, got 0"),
        (["export", "R", "--base-path", "B", "--model-name", "a b"],
         "argument --model-name: must be a plain directory name (letters, digits, '_', '-', '.'; not starting with "
         "'.' or '-'), got 'a b'"),
        (["serve", "B", "--model-name", "../up"],
         "argument --model-name: must be a plain directory name (letters, digits, '_', '-', '.'; not starting with "
         "'.' or '-'), got '../up'"),
    ],
)
def test_non_positive_counts_exit_2_naming_the_argument(argv, message, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # `ctrkit run` without --run-dir would create runs/ here
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].endswith(message) and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_run_with_zero_rows_creates_no_run_directory(capsys, tmp_path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["run", "--rows", "0", "--run-dir", str(run_dir)])
    assert e.value.code == 2
    assert "argument --rows: must be a positive integer, got 0" in capsys.readouterr().err
    assert not run_dir.exists()  # a retry with a good --rows is not refused as 'not empty'


def test_positive_counts_parse() -> None:
    args = build_parser().parse_args(["run", "--rows", "10", "--days", "1"])
    assert (args.rows, args.days) == (10, 1)
    args = build_parser().parse_args(["serve", "B", "--model-name", "m", "--port", "65535", "--poll-seconds", "0.5"])
    assert (args.port, args.poll_seconds) == (65535, 0.5)


def test_export_keep_versions_defaults_to_the_runs_config(tmp_path) -> None:
    from ctrkit.commands.export import _keep_versions

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = Config.from_dict({"export": {"keep_versions": 2}})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    parse = build_parser().parse_args
    args = parse(["export", str(run_dir), "--base-path", "B", "--model-name", "m"])
    assert args.keep_versions is None and _keep_versions(args) == 2
    args = parse(["export", str(run_dir), "--base-path", "B", "--model-name", "m", "--keep-versions", "7"])
    assert _keep_versions(args) == 7  # the flag wins
    args = parse(["export", "--model", "m.keras", "--data", "D", "--base-path", "B", "--model-name", "m"])
    assert _keep_versions(args) == 5  # no run: the config default
    bare = tmp_path / "bare"  # a run directory put together by hand: run.json + model.keras, no config.yaml
    bare.mkdir()
    assert _keep_versions(parse(["export", str(bare), "--base-path", "B", "--model-name", "m"])) == 5


def test_an_unknown_option_shows_the_commands_usage_line(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", "small", "--data", "D", "--run-dir", "R", "--bogus", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: ctrkit train" in err  # the command's own options, not `ctrkit [-h] [--version] COMMAND`
    assert "unrecognized arguments: --bogus 1" in err
    assert not (tmp_path / "R").exists()
