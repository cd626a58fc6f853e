"""Experiment configuration: one YAML file = one reproducible run.

Sections: ``data`` (:class:`ctrkit.schema.DataConfig`), ``model``, ``train``, ``distill``,
``calibration``, ``export``. Unknown keys and bad values raise :class:`ConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

import yaml

from ctrkit.configio import ConfigError, from_dict, to_dict
from ctrkit.schema import DataConfig

__all__ = [
    "CalibrationConfig",
    "Config",
    "ConfigError",
    "DistillConfig",
    "ExportConfig",
    "ModelConfig",
    "TrainConfig",
    "load_config",
    "builtin_config_path",
]


@dataclasses.dataclass
class ModelConfig:
    embedding_dim: int = 10
    embedding_dims: dict[str, int] = dataclasses.field(default_factory=dict)  # per-feature overrides
    cross_kind: Literal["full", "low_rank", "mixture"] = "full"
    cross_layers: int = 3
    projection_dim: int | None = None  # low_rank only
    num_experts: int = 4  # mixture only
    low_rank: int = 32  # mixture only
    structure: Literal["stacked", "parallel", "cross_only"] = "parallel"
    dnn_units: list[int] = dataclasses.field(default_factory=lambda: [500, 500, 500])
    dropout: float = 0.0
    activation: str = "relu"
    rank_head: bool = False


@dataclasses.dataclass
class TrainConfig:
    batch_size: int = 4096
    optimizer: Literal["adagrad", "adam"] = "adagrad"
    learning_rate: float = 0.01
    epochs: int = 1  # online learning: each window is seen once
    checkpoint_every_steps: int = 200
    seed: int = 0


@dataclasses.dataclass
class DistillConfig:
    enabled: bool = False
    teacher: str | None = None  # a ctrkit run directory or a SavedModel directory
    temperature: float = 1.0
    weight: float = 1.0
    confidence_weighting: bool = False
    select_fraction: float = 1.0  # train on the top fraction by teacher loss (importance-weighted)


@dataclasses.dataclass
class CalibrationConfig:
    kind: Literal["none", "temperature", "piecewise", "bias"] = "temperature"
    holdout_windows: int = 1
    segment_feature: str | None = None  # bias calibration only
    num_keypoints: int = 10  # piecewise only
    downsampling_rate: float | None = None  # closed-form correction q = p / (p + (1-p)/w)


@dataclasses.dataclass
class ExportConfig:
    base_path: str | None = None
    model_name: str = "ctrkit"
    keep_versions: int = 5
    every_windows: int = 1


@dataclasses.dataclass
class Config:
    name: str = "ctrkit"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, source: str = "config") -> Config:
        return from_dict(cls, d or {}, source)


def builtin_config_path(name: str) -> str:
    """Path of a config shipped with ctrkit (``configs/<name>.yaml``)."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    if not os.path.isdir(here):  # installed wheel: configs ship as the ctrkit.configs package
        import ctrkit.configs

        here = os.path.dirname(ctrkit.configs.__file__)
    path = os.path.join(here, f"{name}.yaml")
    if not os.path.exists(path):
        available = sorted(f[:-5] for f in os.listdir(here) if f.endswith(".yaml"))
        raise ConfigError(f"no built-in config {name!r}; available: {', '.join(available)}")
    return path


def load_config(path: str) -> Config:
    """Load a YAML config file; a bare name (no ``.yaml``) loads a built-in config."""
    if not path.endswith((".yaml", ".yml")) and not os.path.exists(path):
        path = builtin_config_path(path)
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} not found")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return Config.from_dict(raw, source=os.path.basename(path))
