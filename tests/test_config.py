"""Config sections of the core (model/train/distill/calibration/export): validation names the key."""
from __future__ import annotations

import dataclasses
import math

import pytest
import yaml

from ctrkit.config import (
    Config,
    ConfigError,
    DistillConfig,
    ModelConfig,
    TrainConfig,
    builtin_config_path,
    load_config,
)


@pytest.mark.parametrize("name", ["bars_criteo", "dcn_mix", "quickstart", "small"])
def test_builtin_configs_load_and_round_trip(name: str) -> None:
    cfg = load_config(name)
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert builtin_config_path(name).endswith(f"{name}.yaml")


def test_builtin_configs_come_from_the_ctrkit_configs_package(tmp_path, monkeypatch) -> None:
    """Installed, the folder beside the ctrkit package is site-packages/configs, which another package may
    own: its small.yaml was loaded instead of ctrkit's. The package is looked up first, that folder only in a
    source checkout run without installing."""
    import os
    import sys
    import types

    import ctrkit

    package = types.ModuleType("ctrkit.configs")
    package.__file__ = str(tmp_path / "__init__.py")
    (tmp_path / "small.yaml").write_text("name: from_the_package\n")
    monkeypatch.setitem(sys.modules, "ctrkit.configs", package)
    assert load_config("small").name == "from_the_package"
    monkeypatch.setitem(sys.modules, "ctrkit.configs", None)  # importing it fails: not installed
    beside = os.path.join(os.path.dirname(os.path.dirname(ctrkit.__file__)), "configs", "small.yaml")
    assert builtin_config_path("small") == beside


def test_shipped_configs_match_the_papers() -> None:
    bars = load_config("bars_criteo").model
    assert (bars.embedding_dim, bars.cross_kind, bars.cross_layers, bars.structure, bars.dnn_units) == (
        10, "full", 3, "parallel", [500, 500, 500])
    mix = load_config("dcn_mix").model
    assert (mix.cross_kind, mix.num_experts, mix.low_rank) == ("mixture", 4, 32)


@pytest.mark.parametrize(
    "section, values, key",
    [
        ("model", {"cross_kind": "low_rank"}, "model.projection_dim"),
        ("model", {"activation": "relu6x"}, "model.activation"),
        ("model", {"dropout": 1.5}, "model.dropout"),
        ("model", {"structure": "parallel", "dnn_units": []}, "model.dnn_units"),
        ("train", {"batch_size": 0}, "train.batch_size"),
        ("train", {"learning_rate": -1.0}, "train.learning_rate"),
        ("train", {"optimizer": "sgd"}, "train.optimizer"),
        ("train", {"epochs": 2}, "train.epochs"),
        ("distill", {"select_fraction": 0.0}, "distill.select_fraction"),
        ("distill", {"temperature": 0}, "distill.temperature"),
        ("calibration", {"kind": "bias"}, "calibration.segment_feature"),
        ("calibration", {"downsampling_rate": 2.0}, "calibration.downsampling_rate"),
        ("calibration", {"kind": "bias", "segment_feature": "C1", "segment_prior_rows": -1}, "calibration.segment_prior_rows"),
        ("export", {"every_windows": 0}, "export.every_windows"),
    ],
)
def test_bad_values_name_the_key(section: str, values: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Config.from_dict({section: values})


def test_unknown_key_is_refused(tmp_path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"train": {"learning_rat": 0.1}}))
    with pytest.raises(ConfigError, match="learning_rat"):
        load_config(str(path))


@pytest.mark.parametrize(
    "text, value", [("1e-3", 1e-3), ("5E-4", 5e-4), ("+1e3", 1e3), ("1.0e3", 1e3), ("2.5e-3", 2.5e-3)]
)
def test_exponent_floats_load_as_numbers(tmp_path, text: str, value: float) -> None:
    # PyYAML's YAML 1.1 resolver reads 1e-3 (no dot) and 1.0e3 (unsigned exponent) as strings.
    path = tmp_path / "lr.yaml"
    path.write_text(f"train:\n  learning_rate: {text}\n  embedding_learning_rate: {text}\n")
    train = load_config(str(path)).train
    assert train.learning_rate == value and isinstance(train.learning_rate, float)
    assert train.embedding_learning_rate == value  # float | None


def test_negative_exponent_float_is_read_as_a_number(tmp_path) -> None:
    path = tmp_path / "neg.yaml"
    path.write_text("train:\n  learning_rate: -2e-1\n")
    with pytest.raises(ConfigError, match=r"neg\.yaml: train\.learning_rate: must be > 0, got -0\.2$"):
        load_config(str(path))


@pytest.mark.parametrize(
    "section, key, text",
    [
        ("train", "learning_rate", ".inf"),
        ("train", "adam_beta_1", ".nan"),
        ("train", "embedding_learning_rate", ".inf"),  # float | None
        ("model", "rank_loss_weight", ".inf"),
        ("model", "dropout", ".nan"),
        ("distill", "temperature", "-.inf"),
        ("calibration", "downsampling_rate", ".NaN"),
        ("data", "window_seconds", ".inf"),  # an int field: not a number of the right kind either
    ],
)
def test_non_finite_numbers_are_refused_naming_file_and_key(tmp_path, section: str, key: str, text: str) -> None:
    path = tmp_path / "nf.yaml"
    path.write_text(f"{section}:\n  {key}: {text}\n")
    expected = "an integer" if section == "data" else "a finite number"
    with pytest.raises(ConfigError, match=rf"nf\.yaml: {section}\.{key}: expected {expected}, got -?(inf|nan)"):
        load_config(str(path))


def test_non_finite_numbers_are_refused_in_code_too() -> None:
    with pytest.raises(ConfigError, match=r"train\.learning_rate: must be a finite number, got inf"):
        TrainConfig(learning_rate=math.inf)
    with pytest.raises(ConfigError, match=r"model\.rank_loss_weight: must be a finite number, got inf"):
        ModelConfig(rank_head=True, rank_loss_weight=math.inf)
    with pytest.raises(ConfigError, match=r"distill\.weight: must be a finite number, got nan"):
        DistillConfig(enabled=True, weight=math.nan)


# A setting the rest of the config makes ineffective is refused, naming it and the setting that makes it so.
IGNORED = [
    ({"model": {"cross_kind": "full", "projection_dim": 16}}, "model.projection_dim", "model.cross_kind"),
    ({"model": {"cross_kind": "mixture", "projection_dim": 16}}, "model.projection_dim", "model.cross_kind"),
    ({"model": {"cross_kind": "full", "num_experts": 8}}, "model.num_experts", "model.cross_kind"),
    ({"model": {"cross_kind": "low_rank", "projection_dim": 8, "low_rank": 8}}, "model.low_rank", "model.cross_kind"),
    ({"model": {"structure": "cross_only", "dnn_units": [64]}}, "model.dnn_units", "model.structure"),
    ({"model": {"structure": "cross_only", "dnn_units": [], "dropout": 0.2}}, "model.dropout", "model.structure"),
    ({"model": {"structure": "cross_only", "activation": "smelu"}}, "model.activation", "model.structure"),
    ({"model": {"rank_loss_weight": 0.5}}, "model.rank_loss_weight", "model.rank_head"),
    ({"train": {"optimizer": "adagrad", "adam_beta_1": 0.8}}, "train.adam_beta_1", "train.optimizer"),
    ({"train": {"adam_beta_2": 0.99}}, "train.adam_beta_2", "train.optimizer"),
    ({"train": {"optimizer": "adam", "adagrad_initial_accumulator": 0.5}},
     "train.adagrad_initial_accumulator", "train.optimizer"),
    ({"distill": {"teacher": "runs/teacher"}}, "distill.teacher", "distill.enabled"),
    ({"calibration": {"kind": "temperature", "segment_feature": "C1"}},
     "calibration.segment_feature", "calibration.kind"),
    ({"calibration": {"kind": "piecewise", "num_segments": 8}}, "calibration.num_segments", "calibration.kind"),
    ({"calibration": {"kind": "bias", "segment_feature": "C1", "num_keypoints": 20}},
     "calibration.num_keypoints", "calibration.kind"),
    ({"calibration": {"kind": "piecewise", "downsampling_rate": 0.1}},
     "calibration.downsampling_rate", "calibration.kind"),
    ({"calibration": {"kind": "none", "holdout_windows": 2}}, "calibration.holdout_windows", "calibration.kind"),
    ({"calibration": {"kind": "none", "steps": 100}}, "calibration.steps", "calibration.kind"),
    ({"calibration": {"downsampling_rate": 0.1, "learning_rate": 0.1}},
     "calibration.learning_rate", "calibration.downsampling_rate"),
    ({"calibration": {"downsampling_rate": 0.1, "steps": 50}}, "calibration.steps", "calibration.downsampling_rate"),
    ({"calibration": {"segment_prior_rows": 10}}, "calibration.segment_prior_rows", "calibration.kind"),
    ({"calibration": {"kind": "bias", "segment_feature": "C1", "downsampling_rate": 0.1, "segment_prior_rows": 10}},
     "calibration.segment_prior_rows", "calibration.downsampling_rate"),
]


@pytest.mark.parametrize("config, key, other", IGNORED, ids=[key for _, key, _ in IGNORED])
def test_ineffective_settings_are_refused_naming_both_keys(tmp_path, config: dict, key: str, other: str) -> None:
    path = tmp_path / "ign.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    message = str(e.value)
    assert message.startswith(f"{path}: {key}: ") and "would be ignored because" in message, message
    assert other in message.split(": ", 2)[2], message


@pytest.mark.parametrize(
    "config",
    [
        {"model": {"cross_kind": "low_rank", "projection_dim": 16}},
        {"model": {"cross_kind": "mixture", "num_experts": 8, "low_rank": 16}},
        {"model": {"structure": "cross_only", "dnn_units": []}},
        {"model": {"structure": "cross_only"}},  # the default dnn_units: nothing was set
        {"model": {"rank_head": True, "rank_loss_weight": 0.5}},
        {"model": {"dropout": 0.2, "activation": "smelu"}},
        {"train": {"optimizer": "adam", "adam_beta_1": 0.8, "adam_beta_2": 0.99}},
        {"train": {"optimizer": "adagrad", "adagrad_initial_accumulator": 0.5}},
        {"distill": {"enabled": True, "teacher": "t", "select_fraction": 0.5, "temperature": 2.0, "weight": 0.5,
                     "confidence_weighting": True, "teacher_as_of": "previous_window"}},
        {"distill": {"teacher_model": {"embedding_dim": 16}}},  # `ctrkit run` trains it whatever distill.enabled is
        # `ctrkit run` distills its student with these whatever distill.enabled is (old run dirs hold them too)
        {"distill": {"temperature": 2.0, "weight": 0.5, "confidence_weighting": True, "select_fraction": 0.5}},
        {"calibration": {"kind": "bias", "segment_feature": "C1", "num_segments": 8, "downsampling_rate": 0.1}},
        {"calibration": {"kind": "piecewise", "num_keypoints": 20, "learning_rate": 0.1, "steps": 50}},
        {"calibration": {"kind": "bias", "segment_feature": "C1", "segment_prior_rows": 0}},
        {"calibration": {"kind": "none"}},
    ],
)
def test_settings_that_take_effect_are_accepted(config: dict) -> None:
    Config.from_dict(config)


def test_disabled_distill_keeps_only_the_teacher_model() -> None:
    teacher = ModelConfig(embedding_dim=16)
    on = DistillConfig(enabled=True, teacher="t", temperature=2.0, select_fraction=0.5, teacher_model=teacher)
    with pytest.raises(ConfigError, match=r"distill\.teacher: 't' would be ignored because distill\.enabled is false"):
        dataclasses.replace(on, enabled=False)
    assert on.disabled() == DistillConfig(teacher_model=teacher)


@pytest.mark.parametrize(
    "values, key",
    [
        ({"model": {"cross_layers": 0}}, "model.cross_layers"),  # the cross network needs >= 1 layer
        ({"calibration": {"kind": "bias", "segment_feature": "C1", "num_segments": 0}}, "calibration.num_segments"),
    ],
)
def test_values_the_model_cannot_build_are_refused(values: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ": must be >= 1"):
        Config.from_dict(values)


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "-x", "my model", "m:predict", "a\\b"])
def test_names_must_be_plain_directory_names(name: str) -> None:
    with pytest.raises(ConfigError, match=r"export\.model_name: must be a plain directory name"):
        Config.from_dict({"export": {"model_name": name}})
    with pytest.raises(ConfigError, match=r"^name: must be a plain directory name"):
        Config.from_dict({"name": name})
    ok = Config.from_dict({"name": "dcn_v2-1.0", "export": {"model_name": "ctr.model_2"}})
    assert (ok.name, ok.export.model_name) == ("dcn_v2-1.0", "ctr.model_2")


def _columns(*extra: dict) -> list[dict]:
    return [{"name": "y", "kind": "label"}, *extra]


@pytest.mark.parametrize(
    "data, key",
    [
        ({"analyze_windows": 0}, r"data\.analyze_windows: must be >= 1 or null"),
        ({"analyze_windows": -2}, r"data\.analyze_windows: must be >= 1 or null"),
        ({"batch_size": 0}, r"data\.batch_size: must be >= 1, got 0"),
        ({"batch_size": -1}, r"data\.batch_size: must be >= 1, got -1"),
        ({"format": "csv", "columns": _columns({"name": "a"}, {"name": "a", "kind": "numeric"})},
         r"data\.columns: duplicate column names \['a'\]"),
        ({"format": "csv", "columns": _columns({"name": "a"}, {"name": "t1", "kind": "teacher_logit"},
                                               {"name": "t2", "kind": "teacher_logit"})},
         r"data\.columns: at most one column may have kind 'teacher_logit', found \['t1', 't2'\]"),
        ({"format": "csv", "columns": [{"name": "a", "kind": "numeric"}]}, r"data\.columns: exactly one column .* 'label'"),
        ({"format": "csv", "columns": _columns()}, r"data\.columns: no feature columns"),
        ({"format": "csv", "columns": _columns({"name": "a", "kind": "ignore"}, {"name": "ts", "kind": "timestamp"})},
         r"data\.columns: no feature columns"),
        ({"format": "csv", "columns": _columns({"name": ""})}, r"data\.columns: a column has an empty name"),
        ({"format": "csv", "columns": _columns({"name": "a", "kind": "numeric", "separator": "|"})},
         r"column 'a': separator would be ignored: a numeric column uses fill, log1p, zscore, buckets"),
        ({"format": "csv", "columns": _columns({"name": "a", "separator": ""}, )},
         r"column 'a': separator must be a non-empty string or null"),
        ({"format": "csv", "delimiter": ",,"}, r"data\.delimiter: must be a single character or null .*got ',,'"),
        ({"format": "criteo_tsv", "delimiter": ""}, r"data\.delimiter: must be a single character or null .*got ''"),
        ({"format": "csv", "columns": _columns({"name": "a", "encoding": "hash", "hash_buckets": -5})},
         r"column 'a': encoding 'hash' needs hash_buckets >= 1"),
        ({"format": "csv", "columns": _columns({"name": "a", "hash_buckets": -5})},
         r"column 'a': hash_buckets would be ignored: a categorical column with encoding 'vocabulary' uses "
         r"encoding, separator, top_k, frequency_threshold, oov_buckets;"),
        ({"format": "csv", "columns": _columns({"name": "a", "frequency_threshold": 0})},
         r"column 'a': frequency_threshold must be >= 1 .*got 0"),
        ({"format": "csv", "columns": _columns({"name": "a", "encoding": "hash", "hash_buckets": 9, "top_k": 5,
                                                "oov_buckets": 3})},
         r"column 'a': top_k, oov_buckets would be ignored: a categorical column with encoding 'hash' uses "
         r"encoding, separator, hash_buckets; remove it or change the kind/encoding"),
        ({"format": "csv", "columns": _columns({"name": "a", "kind": "categorical", "log1p": True, "buckets": 4,
                                                "zscore": False, "fill": 3.0})},
         r"column 'a': fill, log1p, zscore, buckets would be ignored"),
        ({"format": "csv", "columns": _columns({"name": "a", "kind": "numeric", "encoding": "hash"})},
         r"column 'a': encoding would be ignored: a numeric column uses fill, log1p, zscore, buckets"),
        ({"format": "csv", "columns": [{"name": "y", "kind": "label", "top_k": 5}, {"name": "a"}]},
         r"column 'y': top_k would be ignored: a label column uses no other settings"),
        ({"format": "csv", "columns": _columns({"name": "a", "kind": "numeric", "buckets": 1})},
         r"column 'a': buckets must be 0 \(off\) or >= 2, got 1"),
        ({"format": "csv", "columns": _columns({"name": "a", "kind": "numeric", "buckets": 4}, {"name": "a_bucket"})},
         r"data\.columns: a_bucket \(buckets of 'a'\) collides with a raw column"),
        ({"window_rows": 0}, r"data\.window_rows: must be >= 1, got 0"),  # it named neither key nor value
    ],
)
def test_bad_data_sections_are_refused_at_load(data: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        Config.from_dict({"data": data})


def test_recorded_configs_keep_loading_with_settings_that_are_ignored() -> None:
    """A manifest or run directory written by an older ctrkit may record a setting that had no effect; it must
    still load there, while a config a user loads is refused."""
    from ctrkit.configio import reading_recorded_config

    old = {"data": {"format": "csv", "columns": _columns({"name": "a", "encoding": "hash", "hash_buckets": 9,
                                                          "frequency_threshold": 2},
                                                         {"name": "b", "frequency_threshold": 0},
                                                         {"name": "n", "kind": "numeric", "separator": "|"})},
           "model": {"cross_kind": "full", "projection_dim": 8}}
    with pytest.raises(ConfigError, match="would be ignored"):
        Config.from_dict(old)
    with reading_recorded_config():
        cfg = Config.from_dict(old)
    assert cfg.data.columns[1].hash_buckets == 9 and cfg.model.projection_dim == 8
    with pytest.raises(ConfigError, match=r"column 'a': encoding 'hash' needs hash_buckets >= 1"), \
            reading_recorded_config():
        Config.from_dict({"data": {"format": "csv", "columns": _columns({"name": "a", "encoding": "hash"})}})
    with pytest.raises(ConfigError, match="would be ignored"):  # the block ends: refused again
        Config.from_dict(old)


def test_good_data_sections_load() -> None:
    ok = Config.from_dict({"data": {"format": "csv", "delimiter": ";", "analyze_windows": 1, "batch_size": 1,
                                    "columns": _columns({"name": "a", "separator": "|"},
                                                        {"name": "t", "kind": "teacher_logit"})}})
    assert (ok.data.delimiter, ok.data.analyze_windows, ok.data.batch_size) == (";", 1, 1)
    assert Config.from_dict({"data": {"analyze_windows": None}}).data.analyze_windows is None


@pytest.mark.parametrize("text, message", [
    # The teacher's model section is checked by the same code as `model:`, which named `model.` keys.
    ("distill: {teacher_model: {embedding_dim: 0}}", "c.yaml: distill.teacher_model.embedding_dim: must be >= 1, got 0"),
    ("distill: {teacher_model: {cross_kind: full, num_experts: 8}}",
     "c.yaml: distill.teacher_model.num_experts: 8 would be ignored because distill.teacher_model.cross_kind is 'full'"),
    ("model: {embedding_dim: 0}", "c.yaml: model.embedding_dim: must be >= 1, got 0"),
    ("distill: {teacher_model: {activation: model.relu}}",  # a value is left as written
     "c.yaml: distill.teacher_model.activation: 'model.relu' is not one of"),
    # Type errors and a section's own checks read alike: FILE: section.key: problem.
    ("name: 5", "c.yaml: name: expected a string, got 5"),
    ("model: {embedding_dim: x}", "c.yaml: model.embedding_dim: expected an integer, got 'x'"),
    # A missing required key is named (it was "ColumnSpec.__init__() missing 1 required positional argument").
    ("data: {columns: [{kind: label}]}", "c.yaml: data.columns[0]: missing required key(s) 'name'"),
])
def test_errors_name_the_key_where_it_is_in_the_file(tmp_path, text, message) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value).startswith(f"{tmp_path}/{message}"), str(e.value)  # the file as given


@pytest.mark.parametrize("data, message", [
    # A column name becomes a Keras input/weight name and a TF scope: "/" failed at train, " " at export.
    ({"columns": [{"name": "click", "kind": "label"}, {"name": "a/b", "kind": "numeric"}]},
     "column 'a/b': a column the pipeline reads needs a name of letters, digits"),
    ({"columns": [{"name": "click", "kind": "label"}, {"name": "my col"}]}, "column 'my col': a column the pipeline"),
    ({"columns": [{"name": "click", "kind": "label"}, {"name": "a-b"}, {"name": "a.b"}]},
     "data.columns: 'a-b' and 'a.b' become the same argument name 'a_b' in a SavedModel signature"),
    ({"columns": [{"name": "click", "kind": "label"}, {"name": "1a"}, {"name": "arg_1a"}]},
     "data.columns: '1a' and 'arg_1a' become the same argument name 'arg_1a'"),
    # Data settings the format or the columns make ineffective, like the other sections' ignored settings.
    ({"header": False}, "data.header: False would be ignored because data.format is 'criteo_tsv'"),
    ({"format": "parquet", "delimiter": ";"}, "data.delimiter: ';' would be ignored because data.format is 'parquet'"),
    ({"format": "parquet", "short_rows": "reject"}, "data.short_rows: 'reject' would be ignored because data.format"),
    ({"window_seconds": 3600}, "data.window_seconds: 3600 would be ignored because no column has kind 'timestamp'"),
    ({"window_rows": 10, "columns": [{"name": "y", "kind": "label"}, {"name": "t", "kind": "timestamp"}, {"name": "c"}]},
     "data.window_rows: 10 would be ignored because column 't' has kind 'timestamp'"),
])
def test_data_section_refuses_unusable_names_and_ignored_settings(data, message) -> None:
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"data": data})
    assert str(e.value).startswith(message), str(e.value)


def test_column_names_the_model_can_take_and_recorded_ignored_data_settings_load() -> None:
    cfg = Config.from_dict({"data": {"format": "csv", "columns": [
        {"name": "click-y", "kind": "label"}, {"name": "click_y"}, {"name": "user-id"},
        {"name": "ad.price", "kind": "numeric"}, {"name": "free text (ignored)", "kind": "ignore"}]}})
    # The label is no serving argument: it may equal a feature after TF's renaming.
    assert [c.name for c in cfg.data.columns][:4] == ["click-y", "click_y", "user-id", "ad.price"]
    from ctrkit.configio import reading_recorded_config

    with reading_recorded_config():  # what an older ctrkit wrote in a manifest still loads
        assert Config.from_dict({"data": {"header": False}}).data.header is False


def test_recorded_data_without_columns_means_the_criteo_columns() -> None:
    """As in a config: the comparison of columns (train's warning, --transform-fn) must not skip it."""
    from ctrkit.schema import criteo_columns, differing_columns, recorded_columns

    assert recorded_columns(None, "m") is None  # nothing recorded (a hand-written manifest): nothing to compare
    assert differing_columns(recorded_columns({"format": "criteo_tsv"}, "m"), criteo_columns()) == []
    assert differing_columns(recorded_columns({"columns": []}, "m"), Config().data.columns) == []


@pytest.mark.parametrize(
    "content, message",
    [
        (b"model:\n  embedding_dim: 8\n  embedding_dim: 9\n", r"c.yaml: not valid YAML \(key 'embedding_dim' appears twice"),
        (b"model:\n\tembedding_dim: 8\n", r"c.yaml: not valid YAML \(indent with spaces, not tabs"),
        (b"name: a\n---\nname: b\n", r"one document per config file"),
        (b"# only a comment\n", r"c.yaml: the config is empty"),
        (b"", r"c.yaml: the config is empty"),
        (b"# caf\xe9\nname: x\n", r"c.yaml: not UTF-8 text .*save the config as UTF-8"),
    ],
)
def test_config_file_mistakes_are_one_line_errors_saying_what_to_do(tmp_path, content: bytes, message: str) -> None:
    """A duplicate key silently kept the last value; an empty file loaded every default; a non-UTF-8 file or a
    directory gave a traceback; tabs and a second document gave PyYAML's message without the fix."""
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(str(path))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="is a directory; give a YAML file in it"):
        load_config(str(tmp_path))


def test_errors_name_the_config_file_as_given(tmp_path) -> None:
    """dev/my.yaml and prod/my.yaml both read "my.yaml: ..." before."""
    (tmp_path / "prod").mkdir()
    path = tmp_path / "prod" / "my.yaml"
    path.write_text("model: {embedding_dim: 0}\n")
    with pytest.raises(ConfigError, match=f"^{path}: model.embedding_dim: must be >= 1"):
        load_config(str(path))
    for not_a_config in ([], ""):
        with pytest.raises(ConfigError):
            Config.from_dict(not_a_config)  # loaded every default before
