"""Experiment configuration: one YAML file = one reproducible run.

Sections: ``data`` (:class:`ctrkit.schema.DataConfig`), ``model``, ``train``, ``distill``,
``calibration``, ``export``. Unknown keys and bad values raise :class:`ConfigError` naming the key, and so
does a setting that the rest of the config would make ineffective (e.g. ``model.projection_dim`` with
``cross_kind: full``): nothing in a config is silently ignored.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, ClassVar, Literal

import yaml

from ctrkit.configio import ConfigError, from_dict, is_plain_name, load_yaml, refuses_ignored_settings, to_dict
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


def _check(cond: bool, key: str, msg: str) -> None:
    """Raise a :class:`ConfigError` naming the offending dotted key."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _check_finite(section: Any, prefix: str) -> None:
    """Every float field of ``section`` is finite (``.inf`` / ``.nan`` would poison training silently)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}.{f.name}: must be a finite number, got {value}")


def _field_default(section: Any, name: str) -> Any:
    f = next(f for f in dataclasses.fields(section) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def _check_used(section: Any, prefix: str, name: str, used: bool, because: str, fix: str) -> None:
    """A field set away from its default where the rest of the config makes it ineffective is an error.

    ``because`` names the other setting that makes it so; ``fix`` says how to make it take effect.
    """
    value = getattr(section, name)
    if not used and value != _field_default(section, name) and refuses_ignored_settings():
        raise ConfigError(f"{prefix}.{name}: {value!r} would be ignored because {because}; remove it or {fix}")


DIR_NAME_RULE = "a plain directory name (letters, digits, '_', '-', '.'; not starting with '.' or '-')"


def is_dir_name(value: str) -> bool:
    """Whether ``value`` is a run or model name ctrkit accepts (see :data:`DIR_NAME_RULE`)."""
    return is_plain_name(value)


def _check_dir_name(value: str, key: str) -> None:
    _check(is_dir_name(value), key, f"must be {DIR_NAME_RULE}, got {value!r}")


_ACTIVATIONS = ("relu", "smelu", "gelu", "swish", "tanh", "sigmoid", "elu", "selu", "linear")


@dataclasses.dataclass
class ModelConfig:
    """The network: FeatureEmbedding -> DCN-V2 (cross network + DNN) -> heads."""

    CONFIG_KEY: ClassVar[str] = "model"  # the prefix its checks name; configio rewrites it for teacher_model
    embedding_dim: int = 10  # embedding width of every categorical feature
    embedding_dims: dict[str, int] = dataclasses.field(default_factory=dict)  # per-feature overrides
    cross_kind: Literal["full", "low_rank", "mixture"] = "full"  # full-rank W, low-rank U Vᵀ, or mixture of low-rank experts
    cross_layers: int = 3  # number of cross layers (every structure has a cross network)
    projection_dim: int | None = None  # rank of the cross layers; low_rank only (and required there)
    num_experts: int = 4  # mixture only
    low_rank: int = 32  # rank of each expert; mixture only
    structure: Literal["stacked", "parallel", "cross_only"] = "parallel"  # cross → DNN, cross ∥ DNN, or no DNN
    dnn_units: list[int] = dataclasses.field(default_factory=lambda: [500, 500, 500])  # DNN widths (none for cross_only)
    dropout: float = 0.0  # DNN dropout; > 0 makes the trainer score batches in a separate inference pass
    activation: str = "relu"  # DNN activation: relu, smelu, gelu, swish, tanh, sigmoid, elu, selu or linear; "smelu" lowers run-to-run prediction difference
    rank_head: bool = False  # auxiliary head, in-batch pairwise logistic loss (TensorBoard train/rank_loss); not served
    rank_loss_weight: float = 0.1  # weight of the in-batch pairwise logistic loss of the rank head (rank_head only)

    def __post_init__(self) -> None:
        _check_finite(self, "model")
        _check(self.embedding_dim >= 1, "model.embedding_dim", f"must be >= 1, got {self.embedding_dim}")
        for name, dim in self.embedding_dims.items():
            _check(dim >= 1, f"model.embedding_dims.{name}", f"must be >= 1, got {dim}")
        _check(self.cross_layers >= 1, "model.cross_layers",
               f"must be >= 1 (every structure has a cross network), got {self.cross_layers}")
        _check(
            self.cross_kind != "low_rank" or (self.projection_dim or 0) >= 1,
            "model.projection_dim",
            "cross_kind 'low_rank' needs projection_dim >= 1",
        )
        kind = f"model.cross_kind is {self.cross_kind!r}"
        _check_used(self, "model", "projection_dim", self.cross_kind == "low_rank", kind,
                    "set model.cross_kind: low_rank")
        for name in ("num_experts", "low_rank"):
            _check_used(self, "model", name, self.cross_kind == "mixture", kind, "set model.cross_kind: mixture")
        _check(self.num_experts >= 1, "model.num_experts", f"must be >= 1, got {self.num_experts}")
        _check(self.low_rank >= 1, "model.low_rank", f"must be >= 1, got {self.low_rank}")
        _check(all(u >= 1 for u in self.dnn_units), "model.dnn_units", f"every width must be >= 1, got {self.dnn_units}")
        _check(
            self.structure == "cross_only" or len(self.dnn_units) > 0,
            "model.dnn_units",
            f"structure {self.structure!r} needs at least one DNN layer",
        )
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.activation in _ACTIVATIONS, "model.activation",
               f"{self.activation!r} is not one of {', '.join(_ACTIVATIONS)}")
        _check(self.rank_loss_weight >= 0, "model.rank_loss_weight", f"must be >= 0, got {self.rank_loss_weight}")
        no_dnn = "model.structure is 'cross_only' (no DNN)"
        dnn = self.structure != "cross_only"
        _check(dnn or not self.dnn_units or self.dnn_units == _field_default(self, "dnn_units")
               or not refuses_ignored_settings(), "model.dnn_units",
               f"{self.dnn_units!r} would be ignored because {no_dnn}; remove it or choose another model.structure")
        for name in ("dropout", "activation"):
            _check_used(self, "model", name, dnn, no_dnn, "choose another model.structure")
        _check_used(self, "model", "rank_loss_weight", self.rank_head, "model.rank_head is false",
                    "set model.rank_head: true")


@dataclasses.dataclass
class TrainConfig:
    """The online trainer: optimizer, batching, checkpoints, logging."""

    batch_size: int = 4096  # examples per step (batches never straddle a shard)
    # Sparse row-wise updates on embedding tables either way. Adagrad at the default 0.01 learns slowly in one
    # pass: on 200k generated rows the small model reached AUC 0.514 (0.587 at learning_rate 1.0) where Adam
    # at 0.01 reached 0.660; every shipped config uses adam.
    optimizer: Literal["adagrad", "adam"] = "adagrad"
    learning_rate: float = 0.01  # step size of the dense body
    # Embedding tables often want a larger step than the dense body; None: same as learning_rate. Coming from
    # Keras model.fit: its Adam sums each occurrence's squared gradient for an id repeated in a batch, so frequent
    # ids step up to √k further than here (ctrkit sums their gradient first, textbook lazy Adam); at the same
    # learning rate expect lower AUC at first. BARS model, batch 512, lr 0.001, 200k generated rows: AUC 0.570,
    # model.fit 0.577, and 0.613 with embedding_learning_rate 0.003.
    embedding_learning_rate: float | None = None
    adam_beta_1: float = 0.9  # Adam first-moment decay
    adam_beta_2: float = 0.999  # Adam second-moment decay
    epsilon: float = 1e-7  # Adam / Adagrad denominator epsilon
    adagrad_initial_accumulator: float = 0.1  # Adagrad's starting accumulator value
    epochs: int = 1  # online learning: each window is seen once (only 1 is accepted)
    checkpoint_every_steps: int = 200  # also at every window end
    keep_checkpoints: int = 2  # newest checkpoints kept in RUN/checkpoints
    log_every_steps: int = 50  # TensorBoard scalars for the cumulative metrics
    seed: int = 0  # initial weights and selection sampling
    deterministic: bool = False  # tf.config.experimental.enable_op_determinism (slower, bit-exact resumes)

    def __post_init__(self) -> None:
        _check_finite(self, "train")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.learning_rate > 0, "train.learning_rate", f"must be > 0, got {self.learning_rate}")
        _check(self.embedding_learning_rate is None or self.embedding_learning_rate > 0,
               "train.embedding_learning_rate", f"must be > 0 or null, got {self.embedding_learning_rate}")
        _check(0 <= self.adam_beta_1 < 1, "train.adam_beta_1", f"must be in [0, 1), got {self.adam_beta_1}")
        _check(0 <= self.adam_beta_2 < 1, "train.adam_beta_2", f"must be in [0, 1), got {self.adam_beta_2}")
        _check(self.epsilon > 0, "train.epsilon", f"must be > 0, got {self.epsilon}")
        _check(self.adagrad_initial_accumulator >= 0, "train.adagrad_initial_accumulator",
               f"must be >= 0, got {self.adagrad_initial_accumulator}")
        _check(self.epochs == 1, "train.epochs",
               f"online training replays each window exactly once; epochs must be 1, got {self.epochs}")
        _check(self.checkpoint_every_steps >= 1, "train.checkpoint_every_steps",
               f"must be >= 1, got {self.checkpoint_every_steps}")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        _check(self.log_every_steps >= 1, "train.log_every_steps", f"must be >= 1, got {self.log_every_steps}")
        optimizer = f"train.optimizer is {self.optimizer!r}"
        for name in ("adam_beta_1", "adam_beta_2"):
            _check_used(self, "train", name, self.optimizer == "adam", optimizer, "set train.optimizer: adam")
        _check_used(self, "train", "adagrad_initial_accumulator", self.optimizer == "adagrad", optimizer,
                    "set train.optimizer: adagrad")


# The distill options nothing reads while distill.enabled is false. Not teacher_model, temperature, weight,
# confidence_weighting or select_fraction: `ctrkit run` turns distillation on for its student whatever
# distill.enabled says and uses them (it sets teacher and teacher_as_of itself).
_DISTILL_ENABLED_ONLY = ("teacher", "teacher_as_of")


@dataclasses.dataclass
class DistillConfig:
    """Distillation from a teacher scoring each batch on the fly (or a teacher-logit column)."""

    enabled: bool = False  # add the distillation head and its loss; teacher and teacher_as_of need it (ctrkit run turns it on for its student, with its own teacher run as teacher, as of the previous window)
    teacher: str | None = None  # a ctrkit run directory (trained on data with these vocabularies), a .keras file, or a SavedModel whose `serve` takes the transformed features (`model.export()` of a ctrkit model; a TF Serving version from ctrkit export takes raw tf.Examples and is refused); None: manifest column
    temperature: float = 1.0  # softens teacher and student logits (loss scaled by T²)
    weight: float = 1.0  # weight of the distillation loss next to the click loss
    confidence_weighting: bool = False  # weight each example by the teacher's confidence |2σ(t) − 1|
    select_fraction: float = 1.0  # teacher-guided selection: keep each example with probability q ∝ its teacher loss (capped at 1, Σq = fraction · batch), weighted 1/q so the loss stays unbiased; the hardest are always kept, the rest sampled; the whole batch is still computed; 1: off
    teacher_model: ModelConfig | None = None  # the teacher `ctrkit run` trains first; None: same as model
    # "previous_window": window w is scored by the teacher run's snapshot saved after window w-1, so a teacher
    # trained on the same pipeline output never hands the student labels from windows it has not reached yet;
    # a teacher run on other data (yesterday's run) is refused there: use "final" for it
    teacher_as_of: Literal["final", "previous_window"] = "final"

    def __post_init__(self) -> None:
        _check_finite(self, "distill")
        _check(self.temperature > 0, "distill.temperature", f"must be > 0, got {self.temperature}")
        _check(self.weight >= 0, "distill.weight", f"must be >= 0, got {self.weight}")
        _check(0 < self.select_fraction <= 1, "distill.select_fraction",
               f"must be in (0, 1], got {self.select_fraction}")
        for name in _DISTILL_ENABLED_ONLY:
            _check_used(self, "distill", name, self.enabled, "distill.enabled is false", "set distill.enabled: true")
        _check(self.teacher_as_of == "final" or self.teacher is not None, "distill.teacher_as_of",
               "'previous_window' needs distill.teacher to be a ctrkit run directory")

    def disabled(self) -> DistillConfig:
        """This section with distillation off: the options that apply only while it is on back at their
        defaults (``teacher_model`` is kept). ``dataclasses.replace(d, enabled=False)`` would be refused."""
        return DistillConfig(teacher_model=self.teacher_model)


# Settings of the calibration fit, which the closed-form downsampling correction replaces.
_CALIBRATION_FIT_SETTINGS = ("learning_rate", "steps", "segment_prior_rows")


@dataclasses.dataclass
class CalibrationConfig:
    """The calibration layer after the main logit, fitted by ``ctrkit calibrate`` with the body frozen."""

    kind: Literal["none", "temperature", "piecewise", "bias"] = "temperature"  # calibration layer after the main logit
    holdout_windows: int = 1  # ctrkit calibrate fits on the last N windows of --data by default
    segment_feature: str | None = None  # bias calibration only
    num_segments: int | None = None  # bias only; None: the segment feature's vocab size
    segment_prior_rows: float = 100.0  # bias only: each segment's correction is shrunk toward one global correction; a segment with this many held-out rows moves about halfway to its own; 0: no shrinkage (segments with few rows overfit)
    num_keypoints: int = 10  # piecewise only
    downsampling_rate: float | None = None  # negatives kept at rate w in training: closed-form correction q = p / (p + (1-p)/w), temperature or bias only; set by ctrkit calibrate, and in every TF Serving version that training or ctrkit export publishes before it
    learning_rate: float = 0.05  # Adam step size of the calibration fit (not with downsampling_rate)
    steps: int = 500  # full-batch optimizer steps on the cached held-out logits (not with downsampling_rate)
    batch_size: int = 4096  # scoring batch size of the held-out stream

    def __post_init__(self) -> None:
        _check_finite(self, "calibration")
        _check(self.holdout_windows >= 1, "calibration.holdout_windows", f"must be >= 1, got {self.holdout_windows}")
        _check(self.kind != "bias" or bool(self.segment_feature), "calibration.segment_feature",
               "kind 'bias' needs a segment_feature")
        _check(self.num_segments is None or self.num_segments >= 1, "calibration.num_segments",
               f"must be >= 1 or null, got {self.num_segments}")
        _check(self.segment_prior_rows >= 0, "calibration.segment_prior_rows",
               f"must be >= 0, got {self.segment_prior_rows}")
        _check(self.num_keypoints >= 2, "calibration.num_keypoints", f"must be >= 2, got {self.num_keypoints}")
        _check(self.downsampling_rate is None or 0 < self.downsampling_rate <= 1, "calibration.downsampling_rate",
               f"must be in (0, 1] or null, got {self.downsampling_rate}")
        _check(self.learning_rate > 0, "calibration.learning_rate", f"must be > 0, got {self.learning_rate}")
        _check(self.steps >= 1, "calibration.steps", f"must be >= 1, got {self.steps}")
        _check(self.batch_size >= 1, "calibration.batch_size", f"must be >= 1, got {self.batch_size}")
        kind = f"calibration.kind is {self.kind!r}"
        if self.kind == "none":  # no calibration layer: nothing is held out, scored or fitted
            for name in ("holdout_windows", "downsampling_rate", "learning_rate", "steps", "batch_size"):
                _check_used(self, "calibration", name, False, kind, "choose a calibration.kind")
        for name in ("segment_feature", "num_segments", "segment_prior_rows"):
            _check_used(self, "calibration", name, self.kind == "bias", kind, "set calibration.kind: bias")
        _check_used(self, "calibration", "num_keypoints", self.kind == "piecewise", kind,
                    "set calibration.kind: piecewise")
        _check_used(self, "calibration", "downsampling_rate", self.kind in ("temperature", "bias"),
                    f"{kind} (the closed-form correction needs 'temperature' or 'bias')",
                    "set calibration.kind: temperature")
        for name in _CALIBRATION_FIT_SETTINGS:  # the closed-form correction fits nothing
            _check_used(self, "calibration", name, self.downsampling_rate is None,
                        "calibration.downsampling_rate is set (closed-form correction, no fit)",
                        "remove calibration.downsampling_rate")

    def closed_form(self, downsampling_rate: float) -> CalibrationConfig:
        """This section with the closed-form correction at ``downsampling_rate`` instead of a fit: the fit's
        own settings go back to their defaults (set for a fit, they would be refused as ignored)."""
        return dataclasses.replace(self, downsampling_rate=downsampling_rate,
                                   **{name: _field_default(self, name) for name in _CALIBRATION_FIT_SETTINGS})


@dataclasses.dataclass
class ExportConfig:
    """When and where training publishes TF Serving versions."""

    base_path: str | None = None  # TF Serving versions go to `base_path/model_name/<version>`; null: `RUN/models/<step>.keras`, all kept
    model_name: str = "ctrkit"  # TF Serving model name and directory under base_path (letters, digits, _ - .)
    keep_versions: int = 5  # newest TF Serving versions kept under base_path; also ctrkit export's default
    every_windows: int = 1  # export after every N windows, and at the end

    def __post_init__(self) -> None:
        _check_dir_name(self.model_name, "export.model_name")
        _check(self.keep_versions >= 1, "export.keep_versions", f"must be >= 1, got {self.keep_versions}")
        _check(self.every_windows >= 1, "export.every_windows", f"must be >= 1, got {self.every_windows}")


@dataclasses.dataclass
class Config:
    name: str = "ctrkit"  # the run's name; letters, digits, '_', '-', '.', not starting with '.' or '-'
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        _check_dir_name(self.name, "name")  # runs/<name>-<time> and the Keras model's name

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, source: str | None = None) -> Config:
        """Errors read ``section.key: problem``, after ``SOURCE: `` when a source (file) is named."""
        try:
            return from_dict(cls, {} if d is None else d, "")  # [] or "" is not a config: from_dict says so
        except ConfigError as e:
            if source is None:
                raise
            raise ConfigError(f"{source}: {e}") from e


def builtin_config_path(name: str) -> str:
    """Path of a config shipped with ctrkit (``configs/<name>.yaml``, installed as the ``ctrkit.configs`` package)."""
    import importlib

    try:
        here = os.path.dirname(importlib.import_module("ctrkit.configs").__file__)
    except ImportError:  # a source checkout run without installing: the folder beside the ctrkit package
        # Only then: installed, that folder is site-packages/configs, which any other package may own.
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    path = os.path.join(here, f"{name}.yaml")
    if not os.path.exists(path):
        available = sorted(f[:-5] for f in os.listdir(here) if f.endswith(".yaml"))
        raise ConfigError(f"no built-in config {name!r}; available: {', '.join(available)}")
    return path


def load_config(path: str, source: str | None = None) -> Config:
    """Load a YAML config file; a bare name (no ``.yaml``) loads a built-in config.

    ``source`` names the file in error messages (default: its base name)."""
    if not path.endswith((".yaml", ".yml")) and not os.path.exists(path):
        path = builtin_config_path(path)
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} not found")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a directory; give a YAML file in it")
    try:
        with open(path, encoding="utf-8") as f:
            raw = load_yaml(f)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e}); save the config as UTF-8") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_hint(e)})") from e
    if raw is None:  # an empty (or comments-only) file loaded every default, silently
        raise ConfigError(f"{path}: the config is empty; write its sections (see the config reference in README.md), "
                          "or name a built-in config such as 'small'")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return Config.from_dict(raw, source=source or path)


def _yaml_hint(e: Exception) -> str:
    """PyYAML's message on one line, with the fix for the mistakes people make most."""
    text = " ".join(str(e).split())
    if "found character '\\t'" in text:
        return f"indent with spaces, not tabs: {text}"
    if "expected a single document" in text:
        return f"one document per config file (no second '---'): {text}"
    return text
