"""Typed config loading: typos and bad values fail with the dotted path of the key."""
from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
import yaml

from ctrkit.configio import ConfigError, from_dict, load_yaml, to_dict


@dataclasses.dataclass
class Inner:
    units: list[int] = dataclasses.field(default_factory=lambda: [4])
    mode: Literal["a", "b"] = "a"
    rate: float = 0.5
    name: str | None = None


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    flag: bool = False
    steps: int = 1


def test_builds_nested_dataclasses_and_round_trips():
    cfg = from_dict(Outer, {"inner": {"units": [8, 2], "mode": "b", "rate": 1}, "sizes": {"C1": 3}, "flag": True})
    assert cfg == Outer(Inner([8, 2], "b", 1.0, None), {"C1": 3}, True, 1)
    assert isinstance(cfg.inner.rate, float)
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inner": {"unitz": [1]}}, r"Outer\.inner: unknown key\(s\) 'unitz'; allowed keys are"),
        ({"inner": {"mode": "c"}}, r"Outer\.inner\.mode: 'c' is not one of 'a', 'b'"),
        ({"inner": {"units": [1, "x"]}}, r"Outer\.inner\.units\[1\]: expected an integer, got 'x'"),
        ({"flag": "yes"}, r"Outer\.flag: expected true/false, got 'yes'"),
        ({"steps": 2.5}, r"Outer\.steps: expected an integer, got 2\.5"),
        ({"steps": True}, r"Outer\.steps: expected an integer, got True"),
        ({"sizes": [1]}, r"Outer\.sizes: expected a mapping"),
        ({"inner": 3}, r"Outer\.inner: expected a mapping for Inner"),
        ({"inner": {"rate": float("inf")}}, r"Outer\.inner\.rate: expected a finite number, got inf"),
        ({"inner": {"rate": float("-inf")}}, r"Outer\.inner\.rate: expected a finite number, got -inf"),
        ({"inner": {"rate": float("nan")}}, r"Outer\.inner\.rate: expected a finite number, got nan"),
        ({"inner": {"rate": 10**400}}, r"Outer\.inner\.rate: expected a finite number, got 1000"),
        ({"inner": {"rate": "1e-3"}}, r"Outer\.inner\.rate: expected a number, got '1e-3'"),  # a quoted string
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_an_aliased_value_is_quoted_short_in_the_error():
    """YAML aliases make a value whose repr is exponential in the text: a 415-byte config ran to 1 GB building
    the message. Here 6 levels of 10 (a 3 MB repr); the message stays short and still names the key."""
    text = "x0: &x0 [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 10) + "]\n" for i in range(1, 6))
    data = load_yaml(text)
    with pytest.raises(ConfigError, match=r"Outer\.inner\.units\[0\]: expected an integer, got \[\[\[") as e:
        from_dict(Outer, {"inner": {"units": data["x5"]}})
    assert len(str(e.value)) < 500


def test_default_config_is_criteo(tmp_path):
    from ctrkit.config import Config, load_config

    cfg = Config()
    assert cfg.data.label == "label"
    assert [c.name for c in cfg.data.columns if c.kind == "numeric"] == [f"I{i}" for i in range(1, 14)]
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train: unknown key\(s\) 'batch_sise'"):
        load_config(str(path))
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-3", 1e-3), ("5E-4", 5e-4), ("+1e3", 1e3), ("-2e-1", -0.2), ("1.0e3", 1e3), (".5e1", 5.0), ("1_0e2", 1e3),
        ("1.5e-3", 1.5e-3), ("0.25", 0.25), (".inf", float("inf")),  # what YAML 1.1 already reads as floats
    ],
)
def test_load_yaml_reads_exponent_floats_as_floats(text, value):
    loaded = load_yaml(f"x: {text}")["x"]
    assert isinstance(loaded, float) and loaded == value


@pytest.mark.parametrize(
    "text, value",
    [("1000", 1000), ("-7", -7), ("1_000", 1000), ("0x1F", 31), ("1e", "1e"), ("e3", "e3"), ("1e3e3", "1e3e3"),
     ("1.2.3", "1.2.3"), ("'1e-3'", "1e-3"), ("true", True), ("null", None)],
)
def test_load_yaml_resolves_everything_else_as_safe_load(text, value):
    loaded = load_yaml(f"x: {text}")["x"]
    assert loaded == value and type(loaded) is type(value)
    assert yaml.safe_load(f"x: {text}")["x"] == value


def test_load_yaml_leaves_safe_load_alone():
    load_yaml("x: 1e-3")
    assert yaml.safe_load("x: 1e-3") == {"x": "1e-3"}  # the resolver is ConfigLoader's own

