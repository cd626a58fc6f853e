"""A stack of cross layers: the cross tower of a DCN-V2 model."""
from __future__ import annotations

from typing import Any

import keras

from ctrkit.layers import _validation as check
from ctrkit.layers import activations
from ctrkit.layers.cross import Cross, clone_initializer
from ctrkit.layers.cross_mixture import GATINGS, CrossMixture

KINDS = ("full", "low_rank", "mixture")


@keras.saving.register_keras_serializable(package="ctrkit")
class CrossNetwork(keras.layers.Layer):
    """``num_layers`` cross layers applied in sequence to the same ``x0``.

    ```
    x_1 = C_1(x0, x0),  x_{l+1} = C_{l+1}(x0, x_l),  output x_L
    ```

    with ``C`` a full-rank :class:`Cross` (``kind="full"``), a low-rank one (``kind="low_rank"``), or a
    :class:`CrossMixture` (``kind="mixture"``). ``L`` layers model feature crosses up to order ``L + 1``.

    Args:
        num_layers: number of cross layers ``L``. Defaults to 3.
        kind: ``"full"``, ``"low_rank"`` or ``"mixture"``.
        projection_dim: rank of ``"low_rank"`` layers. ``None`` means ``max(1, d // 4)`` (the rank that
            keeps full-rank accuracy in DCN-V2's study); must be ``None`` for the other kinds.
        num_experts: experts per ``"mixture"`` layer. Defaults to 4.
        low_rank: rank of each mixture expert. Defaults to 32.
        diag_scale: see :class:`Cross`.
        use_bias: see :class:`Cross`.
        pre_activation: see :class:`Cross` (full / low rank only).
        expert_activation: see :class:`CrossMixture` (mixture only). Defaults to ``"tanh"``.
        gating: see :class:`CrossMixture` (mixture only). Defaults to ``"softmax"``.
        kernel_initializer, bias_initializer, kernel_regularizer, bias_regularizer: passed to every layer.
        **kwargs: base layer arguments.

    An argument that the chosen ``kind`` does not use (``pre_activation`` for ``"mixture"``; ``num_experts``,
    ``low_rank``, ``gating``, ``expert_activation`` for ``"full"`` and ``"low_rank"``) must stay at its
    default: another value raises ``ValueError`` instead of being silently ignored.

    Example:

    ```python
    x0 = keras.Input((390,))
    h = CrossNetwork(num_layers=3, kind="low_rank", projection_dim=64)(x0)
    ```

    References:
    - [R. Wang et al., 2020](https://arxiv.org/abs/2008.13535), DCN V2.
    """

    def __init__(
        self,
        num_layers: int = 3,
        kind: str = "full",
        projection_dim: int | None = None,
        num_experts: int = 4,
        low_rank: int = 32,
        diag_scale: float | None = 0.0,
        use_bias: bool = True,
        pre_activation: activations.Activation = None,
        expert_activation: activations.Activation = "tanh",
        gating: str = "softmax",
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        bias_regularizer: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True  # row-wise: a mask over the leading axes passes through
        self.num_layers = check.positive_int("CrossNetwork", "num_layers", num_layers)
        if kind not in KINDS:
            raise ValueError(f"CrossNetwork: `kind` must be one of {KINDS}, got {kind!r}")
        if projection_dim is not None and kind != "low_rank":
            raise ValueError(f"CrossNetwork: `projection_dim` applies to kind='low_rank' only, got kind={kind!r}")
        if gating not in GATINGS:
            raise ValueError(f"CrossNetwork: `gating` must be one of {GATINGS}, got {gating!r}")
        self.kind = kind
        self.projection_dim = check.positive_int("CrossNetwork", "projection_dim", projection_dim, allow_none=True)
        self.num_experts = check.positive_int("CrossNetwork", "num_experts", num_experts)
        self.low_rank = check.positive_int("CrossNetwork", "low_rank", low_rank)
        self.diag_scale = check.non_negative_float("CrossNetwork", "diag_scale", diag_scale)
        self.use_bias = bool(use_bias)
        # Resolve now so a bad name fails at construction, but keep the identifiers for get_config.
        pre = activations.get(pre_activation)
        expert = activations.get(expert_activation)
        # An argument the chosen kind never reads is refused rather than silently dropped. Only values other
        # than the defaults count, so configs saved with every argument at its default still load.
        if kind == "mixture":
            ignored = ["pre_activation"] if pre is not keras.activations.linear else []
        else:
            ignored = [
                name
                for name, is_default in (
                    ("num_experts", self.num_experts == 4),
                    ("low_rank", self.low_rank == 32),
                    ("gating", gating == "softmax"),
                    ("expert_activation", expert is keras.activations.tanh),
                )
                if not is_default
            ]
        if ignored:
            applies_to = "kind='full' and 'low_rank'" if kind == "mixture" else "kind='mixture'"
            raise ValueError(
                f"CrossNetwork: {', '.join(f'`{n}`' for n in ignored)} "
                f"{'applies' if len(ignored) == 1 else 'apply'} to {applies_to} only, got kind={kind!r}; "
                "leave it at the default"
            )
        self.pre_activation = pre_activation
        self.expert_activation = expert_activation
        self.gating = gating
        # Objects here, serialized in get_config only: Keras' serializer imports TensorFlow on any backend.
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.cross_layers: list[keras.layers.Layer] = []

    def _make_layer(self, i: int, d: int) -> keras.layers.Layer:
        common = dict(
            use_bias=self.use_bias,
            diag_scale=self.diag_scale,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            bias_initializer=clone_initializer(self.bias_initializer),
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            dtype=self.dtype_policy,
            name=f"cross_{i}",
        )
        if self.kind == "mixture":
            return CrossMixture(
                num_experts=self.num_experts,
                low_rank=self.low_rank,
                gating=self.gating,
                expert_activation=self.expert_activation,
                **common,
            )
        rank = None if self.kind == "full" else (self.projection_dim or max(1, d // 4))
        return Cross(projection_dim=rank, pre_activation=self.pre_activation, **common)

    def build(self, x0_shape: Any) -> None:
        d = check.last_dim("CrossNetwork", x0_shape)
        # A built layer refuses another width up front (as keras.layers.Dense does), not at its first matmul.
        self.input_spec = keras.InputSpec(axes={-1: d})
        self.cross_layers = [self._make_layer(i, d) for i in range(self.num_layers)]
        for layer in self.cross_layers:
            layer.build(x0_shape)

    def call(self, x0: Any) -> Any:
        x = None  # the first layer crosses x0 with itself (Cross folds its residual then)
        for layer in self.cross_layers:
            x = layer(x0) if x is None else layer(x0, x)
        return x

    def compute_output_shape(self, x0_shape: Any) -> Any:
        return x0_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "num_layers": self.num_layers,
            "kind": self.kind,
            "projection_dim": self.projection_dim,
            "num_experts": self.num_experts,
            "low_rank": self.low_rank,
            "diag_scale": self.diag_scale,
            "use_bias": self.use_bias,
            "pre_activation": activations.serialize_identifier(self.pre_activation),
            "expert_activation": activations.serialize_identifier(self.expert_activation),
            "gating": self.gating,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
        }
