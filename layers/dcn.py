"""The DCN-V2 body: a cross network and a DNN, stacked or in parallel."""
from __future__ import annotations

from typing import Any, Sequence

import keras

from ctrkit.layers import _validation as check
from ctrkit.layers import activations
from ctrkit.layers.cross_mixture import GATINGS
from ctrkit.layers.cross_network import CrossNetwork

STRUCTURES = ("stacked", "parallel", "cross_only")
DEFAULT_DNN_UNITS = (500, 500, 500)


@keras.saving.register_keras_serializable(package="ctrkit")
class DCN(keras.layers.Layer):
    """DCN-V2 body: maps ``x0`` to the final hidden representation (add your own logit head).

    ```
    stacked:    h = DNN(CrossNet(x0))
    parallel:   h = concat(CrossNet(x0), DNN(x0))
    cross_only: h = CrossNet(x0)
    DNN(z)      = a(W_n … a(W_1 z + b_1) … + b_n), with dropout after each activation
    ```

    Args:
        structure: ``"stacked"``, ``"parallel"`` or ``"cross_only"``. Defaults to ``"stacked"``.
        num_cross_layers: cross layers in the cross network. Defaults to 3.
        cross_kind: ``"full"``, ``"low_rank"`` or ``"mixture"`` (see :class:`CrossNetwork`).
        projection_dim: rank of low-rank cross layers (``None``: ``d // 4``); must be ``None`` for the other
            kinds.
        num_experts: experts per mixture layer. Defaults to 4. Like ``low_rank``, ``gating`` and
            ``expert_activation``, used only with ``cross_kind="mixture"`` and ignored by the other kinds
            (so one set of arguments serves every kind).
        low_rank: rank of each mixture expert. Defaults to 32.
        dnn_units: widths of the DNN's hidden layers, a sequence such as ``(512, 256)``. ``None`` (default)
            means ``(500, 500, 500)`` for ``"stacked"`` and ``"parallel"`` and no DNN for ``"cross_only"``.
            Must be empty (or ``None``) for ``"cross_only"``; may be empty for ``"stacked"`` (then ``h`` is
            the cross output).
        dropout: dropout rate after each DNN activation, in ``[0, 1)``. Defaults to 0.
        activation: DNN activation; any Keras activation or ``"smelu"``. Defaults to ``"relu"``.
        diag_scale: ``diag_scale`` of every cross layer (see :class:`Cross`). Defaults to 0.
        gating: gating of mixture cross layers (see :class:`CrossMixture`). Defaults to ``"softmax"``.
        expert_activation: nonlinearity of mixture experts. Defaults to ``"tanh"``.
        **kwargs: base layer arguments.

    Call arguments:
        x0: ``(batch, d)`` float tensor (e.g. the output of :class:`FeatureEmbedding`).
        training: whether dropout is active.

    Returns:
        ``(batch, h)``: ``h = dnn_units[-1]`` (stacked), ``d + dnn_units[-1]`` (parallel), ``d`` (cross only).

    Example:

    ```python
    x0 = keras.Input((390,))
    h = DCN(structure="parallel", cross_kind="low_rank", dnn_units=(512, 256), activation="smelu")(x0)
    logit = keras.layers.Dense(1)(h)
    ```

    References:
    - [R. Wang et al., 2020](https://arxiv.org/abs/2008.13535), DCN V2, Figure 2 (stacked and parallel).
    - [G. I. Shamir et al., 2022](https://arxiv.org/abs/2202.06499) for the SmeLU activation.
    """

    def __init__(
        self,
        structure: str = "stacked",
        num_cross_layers: int = 3,
        cross_kind: str = "full",
        projection_dim: int | None = None,
        num_experts: int = 4,
        low_rank: int = 32,
        dnn_units: Sequence[int] | None = None,
        dropout: float = 0.0,
        activation: activations.Activation = "relu",
        diag_scale: float = 0.0,
        gating: str = "softmax",
        expert_activation: activations.Activation = "tanh",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True  # row-wise: a mask over the leading axes passes through
        if structure not in STRUCTURES:
            raise ValueError(f"DCN: `structure` must be one of {STRUCTURES}, got {structure!r}")
        if dnn_units is None:
            dnn_units = () if structure == "cross_only" else DEFAULT_DNN_UNITS
        dnn_units = check.positive_int_sequence("DCN", "dnn_units", dnn_units)
        if structure == "cross_only" and dnn_units:
            raise ValueError(f"DCN: structure='cross_only' has no DNN, but dnn_units={dnn_units} was given")
        if structure == "parallel" and not dnn_units:
            raise ValueError("DCN: structure='parallel' needs at least one DNN layer in `dnn_units`")
        rate = check.as_real(dropout)
        if rate is None or not 0.0 <= rate < 1.0:
            raise ValueError(f"DCN: `dropout` must be in [0, 1), got {dropout!r}")
        if gating not in GATINGS:
            raise ValueError(f"DCN: `gating` must be one of {GATINGS}, got {gating!r}")
        activations.get(expert_activation)  # a bad name fails here for every cross_kind
        # The mixture-only arguments go to the cross network only for kind="mixture": CrossNetwork refuses
        # them for the other kinds, and a DCN built from one config for every kind must still construct.
        mixture_args = (
            dict(num_experts=num_experts, low_rank=low_rank, gating=gating, expert_activation=expert_activation)
            if cross_kind == "mixture"
            else {}
        )
        try:
            self.cross_network = CrossNetwork(
                num_layers=num_cross_layers,
                kind=cross_kind,
                projection_dim=projection_dim,
                diag_scale=diag_scale,
                dtype=self.dtype_policy,
                name="cross_network",
                **mixture_args,
            )
        except ValueError as e:  # the cross network checks these; name DCN's own arguments in the message
            raise ValueError(_in_dcn_terms(str(e))) from None
        self.structure = structure
        # Validated copies (plain Python numbers) so get_config stays JSON-serialisable.
        self.num_cross_layers = self.cross_network.num_layers
        self.cross_kind = cross_kind
        self.projection_dim = self.cross_network.projection_dim
        self.num_experts = check.positive_int("DCN", "num_experts", num_experts)
        self.low_rank = check.positive_int("DCN", "low_rank", low_rank)
        self.dnn_units = dnn_units
        self.dropout = rate
        self.activation = activation
        self.diag_scale = self.cross_network.diag_scale
        self.gating = gating
        self.expert_activation = expert_activation
        act = activations.get(activation)
        self.dense_layers = [
            keras.layers.Dense(u, activation=act, dtype=self.dtype_policy, name=f"dnn_{i}")
            for i, u in enumerate(dnn_units)
        ]
        # The DCN's dtype, as for the Dense layers: left to the global policy, Dropout casts a float64 (or
        # float16) DNN to float32 and back, and a .keras file reloaded under another policy changes the output dtype.
        self.dropout_layers = ([keras.layers.Dropout(self.dropout, dtype=self.dtype_policy) for _ in dnn_units]
                               if self.dropout else [])

    def _dnn(self, z: Any, training: Any) -> Any:
        for i, dense in enumerate(self.dense_layers):
            z = dense(z)
            if self.dropout_layers:
                z = self.dropout_layers[i](z, training=training)
        return z

    def build(self, x0_shape: Any) -> None:
        d = check.last_dim("DCN", x0_shape)
        # A built layer refuses another width up front (as keras.layers.Dense does), not at its first matmul.
        self.input_spec = keras.InputSpec(axes={-1: d})
        if len(x0_shape) != 2:
            raise ValueError(f"DCN: `x0` must have shape (batch, features), got {x0_shape}")
        self.cross_network.build(x0_shape)
        width = d if self.structure == "stacked" else None
        shape = (x0_shape[0], width or d)
        for dense in self.dense_layers:
            dense.build(shape)
            shape = (x0_shape[0], dense.units)

    def call(self, x0: Any, training: Any = None) -> Any:
        if self.structure == "cross_only":
            return self.cross_network(x0)
        if self.structure == "stacked":
            return self._dnn(self.cross_network(x0), training)
        return keras.ops.concatenate([self.cross_network(x0), self._dnn(x0, training)], axis=-1)

    def compute_output_shape(self, x0_shape: Any) -> Any:
        d = x0_shape[-1]
        if self.structure == "cross_only" or not self.dnn_units:
            return x0_shape
        if self.structure == "stacked":
            return (x0_shape[0], self.dnn_units[-1])
        return (x0_shape[0], d + self.dnn_units[-1])

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "structure": self.structure,
            "num_cross_layers": self.num_cross_layers,
            "cross_kind": self.cross_kind,
            "projection_dim": self.projection_dim,
            "num_experts": self.num_experts,
            "low_rank": self.low_rank,
            "dnn_units": list(self.dnn_units),
            "dropout": self.dropout,
            "activation": activations.serialize_identifier(self.activation),
            "diag_scale": self.diag_scale,
            "gating": self.gating,
            "expert_activation": activations.serialize_identifier(self.expert_activation),
        }


_DCN_ARGUMENTS = (("CrossNetwork:", "DCN:"), ("`num_layers`", "`num_cross_layers`"), ("`kind`", "`cross_kind`"),
                  ("kind=", "cross_kind="))


def _in_dcn_terms(message: str) -> str:
    for theirs, ours in _DCN_ARGUMENTS:
        message = message.replace(theirs, ours)
    return message
