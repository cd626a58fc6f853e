"""Config sections of the core (model/train/distill/calibration/export): validation names the key."""
from __future__ import annotations

import pytest
import yaml

from ctrkit.config import Config, ConfigError, builtin_config_path, load_config


@pytest.mark.parametrize("name", ["bars_criteo", "dcn_mix", "small"])
def test_builtin_configs_load_and_round_trip(name: str) -> None:
    cfg = load_config(name)
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert builtin_config_path(name).endswith(f"{name}.yaml")


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
