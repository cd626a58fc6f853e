"""Count and size arguments are checked by argparse (one line naming the argument, exit 2) before any work."""
from __future__ import annotations

import os

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


def test_run_refuses_generated_log_options_with_input(capsys, tmp_path) -> None:
    """--rows, --days and --seed were silently ignored with --input (and --help said --seed seeded the models)."""
    assert main(["run", "--input", "x.tsv", "--seed", "7", "--days", "2", "--run-dir", str(tmp_path / "r")]) == 1
    assert "--days, --seed describe the generated log; with --input there is none" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


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


def test_warmup_rows_errors_name_the_file_and_its_line(tmp_path) -> None:
    """They said "row 0" (a list index) or showed a bare [Errno 2]."""
    from ctrkit.commands.export import _name_warmup_line, _read_warmup_rows
    from ctrkit.errors import InputError

    path = tmp_path / "rows.jsonl"
    path.write_text('{"I1": 1}\n\n{"I1": "abc"}\n')
    rows, lines = _read_warmup_rows(str(path))
    assert rows == [{"I1": 1}, {"I1": "abc"}] and lines == [1, 3]
    message = "warmup_examples[1]: feature 'I1': value 'abc' is not a valid float32"
    assert _name_warmup_line(message, str(path), lines) == f"{path} line 3: feature 'I1': value 'abc' is not a valid float32"
    path.write_text('{"I1": 1}\n{"I1": \n')
    with pytest.raises(InputError, match=r"rows.jsonl line 2: not a JSON object"):
        _read_warmup_rows(str(path))
    path.write_text('{"I1": 1}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"rows.jsonl line 2: expected a JSON object of raw features, got list"):
        _read_warmup_rows(str(path))
    with pytest.raises(InputError, match=r"--warmup-rows .*nope.jsonl: No such file or directory"):
        _read_warmup_rows(str(tmp_path / "nope.jsonl"))


def test_export_takes_a_runs_other_model_with_run_dir_and_model() -> None:
    """--help promised "--model ... instead of RUN_DIR's final model", but the two together were refused."""
    from ctrkit.commands.export import run
    from ctrkit.errors import InputError

    parse = build_parser().parse_args
    with pytest.raises(InputError, match="give RUN_DIR, or --model PATH.keras with --data"):
        run(parse(["export", "--base-path", "B", "--model-name", "m"]))
    with pytest.raises(InputError, match="--model without RUN_DIR needs --data"):
        run(parse(["export", "--model", "m.keras", "--base-path", "B", "--model-name", "m"]))
    with pytest.raises(InputError, match="no_such_run"):  # both: the run's data, the given model
        run(parse(["export", "no_such_run", "--model", "m.keras", "--base-path", "B", "--model-name", "m"]))


def test_a_full_disk_or_read_only_file_system_is_a_one_line_error(monkeypatch, capsys) -> None:
    """ENOSPC / EROFS used to end in a chained traceback; the message already names the file."""
    import errno

    import ctrkit.trainer
    from ctrkit.cli import main

    for code, text in ((errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")):
        def full(*args, **kwargs):
            raise OSError(code, text, "/runs/r/batches.jsonl")

        monkeypatch.setattr(ctrkit.trainer, "train", full)
        monkeypatch.setattr("ctrkit.manifest.Manifest.load", staticmethod(lambda d: None))
        assert main(["train", "--config", "small", "--data", "D", "--run-dir", "R", "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert err == f"ctrkit train: error: [Errno {code}] {text}: '/runs/r/batches.jsonl'\n"


def test_output_under_an_ascii_locale_escapes_what_it_cannot_encode(tmp_path) -> None:
    """`ctrkit run` failed with UnicodeEncodeError on its first line ("→") under LC_ALL=C, PYTHONUTF8=0."""
    import os
    import subprocess
    import sys

    code = (
        "import argparse, sys\n"
        "from ctrkit import cli\n"
        "p = argparse.ArgumentParser(); s = p.add_subparsers(dest='command').add_parser('x')\n"
        "s.set_defaults(func=lambda args: print('raw logs \\u2192 data'))\n"  # ASCII source text
        "cli.build_parser = lambda: p\n"
        "sys.exit(cli.main(['x']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIOENCODING"))}
    env.update(LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.strip() == rb"raw logs \u2192 data"


def test_run_publishes_only_the_student_when_the_config_sets_a_base_path(tmp_path, monkeypatch) -> None:
    """With export.base_path set, train() publishes TF Serving versions by itself: the baseline and the
    second-seed student of `ctrkit run` then published under the student's model name and pruned its versions.
    Training and preprocessing are replaced: only which run gets which export is checked."""
    import types

    import ctrkit.compare
    import ctrkit.pipelines
    import ctrkit.trainer
    from ctrkit.manifest import Manifest
    from ctrkit.testing import write_dataset

    data = write_dataset(tmp_path / "data", windows=3, rows_per_window=50)
    monkeypatch.setattr(ctrkit.pipelines, "preprocess", lambda *a, **k: Manifest.load(data.directory))
    calls = []

    def fake_train(config, data_dir, run_dir, export_fn=None, **kwargs):
        calls.append((os.path.basename(run_dir), config.export.base_path, export_fn is not None))
        return types.SimpleNamespace(steps=1)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(ctrkit.trainer, "train", fake_train)
    monkeypatch.setattr(ctrkit.compare, "compare_runs", stop)
    config = tmp_path / "c.yaml"
    from ctrkit.config import load_config

    quickstart = load_config("quickstart").to_dict()
    config.write_text(yaml.safe_dump({**quickstart, "export": {**quickstart["export"],
                                                               "base_path": str(tmp_path / "serving")}}))
    with pytest.raises(Stop):
        main(["run", "--config", str(config), "--rows", "300", "--run-dir", str(tmp_path / "run"), "--no-progress"])
    assert calls == [("teacher", None, False), ("student", str(tmp_path / "serving"), True),
                     ("student_no_distillation", None, False), ("student_seed2", None, False)]
