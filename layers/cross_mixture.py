"""DCN-V2's mixture of low-rank cross experts (DCN-Mix)."""
from __future__ import annotations

from typing import Any

import keras
from keras import ops

from ctrkit.layers import _validation as check
from ctrkit.layers import activations
from ctrkit.layers.cross import clone_initializer

GATINGS = ("softmax", "sigmoid")


@keras.saving.register_keras_serializable(package="ctrkit")
class CrossMixture(keras.layers.Layer):
    """Cross layer as a gated mixture of low-rank experts (DCN-V2's DCN-Mix).

    Each expert is a low-rank cross with a nonlinearity ``g`` and an ``r × r`` matrix ``C_i`` in the
    projected space; a gate on ``x_l`` weighs the experts:

    ```
    E_i(x_l) = x0 ⊙ (U_i g(C_i g(V_iᵀ x_l)) + b + diag_scale · x_l)
    G(x_l)   = softmax(x_l W_g + b_g)      (or element-wise sigmoid, gating="sigmoid")
    x_{l+1}  = Σ_i G_i(x_l) E_i(x_l) + x_l
    ```

    With ``num_experts=1``, softmax gating (so ``G_1 = 1``), ``expert_activation=None`` and ``C_1 = I``,
    the layer equals ``Cross(projection_dim=low_rank)`` with ``down_kernel = V_1`` and ``kernel = U_1``.
    The bias ``b`` is shared by the experts, as in the paper.

    Weights, in order: ``down_kernels (K, d, r)`` (the ``V_i``), ``inner_kernels (K, r, r)`` (the
    ``C_i``), ``up_kernels (K, r, d)`` (the ``U_i``), ``bias (d,)`` if ``use_bias``, ``gate_kernel (d, K)``,
    ``gate_bias (K,)`` (no gate weights for one expert with softmax gating: that gate is constantly 1).

    Args:
        num_experts: number of experts ``K``. Defaults to 4.
        low_rank: rank ``r`` of each expert. Defaults to 32.
        gating: ``"softmax"`` (weights sum to 1 over experts) or ``"sigmoid"`` (independent gates).
        expert_activation: the nonlinearity ``g``; any Keras activation, ``"smelu"``, or ``None`` for the
            identity. Defaults to ``"tanh"``.
        use_bias: whether to add the shared bias ``b``. Defaults to ``True``.
        diag_scale: non-negative float; ``diag_scale · x_l`` is added inside every expert, outside ``g``
            (see the formula). With ``expert_activation=None`` that is the same as adding ``diag_scale``
            to the diagonal of every expert's ``U_i C_i V_iᵀ``; with an activation it is not. Defaults to 0.
        kernel_initializer: initializer of ``V_i``, ``C_i``, ``U_i`` and the gate kernel.
        bias_initializer: initializer of ``b``. Defaults to ``"zeros"``.
        kernel_regularizer: regularizer of the expert kernels.
        bias_regularizer: regularizer of ``b``.
        **kwargs: base layer arguments.

    Call arguments:
        x0: input of the first cross layer, ``(batch, d)``.
        x: output of the previous cross layer, same shape; ``None`` means ``x = x0``.

    Example:

    ```python
    x0 = keras.Input((128,))
    x1 = CrossMixture(num_experts=4, low_rank=32)(x0)
    x2 = CrossMixture(num_experts=4, low_rank=32)(x0, x1)
    ```

    References:
    - [R. Wang et al., 2020](https://arxiv.org/abs/2008.13535), DCN V2, Section 4 (mixture of low-rank
      experts).
    """

    def __init__(
        self,
        num_experts: int = 4,
        low_rank: int = 32,
        gating: str = "softmax",
        expert_activation: activations.Activation = "tanh",
        use_bias: bool = True,
        diag_scale: float | None = 0.0,
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        kernel_regularizer: str | keras.regularizers.Regularizer | None = None,
        bias_regularizer: str | keras.regularizers.Regularizer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True  # row-wise: a mask over the leading axes passes through
        self.num_experts = check.positive_int("CrossMixture", "num_experts", num_experts)
        self.low_rank = check.positive_int("CrossMixture", "low_rank", low_rank)
        if gating not in GATINGS:
            raise ValueError(f"CrossMixture: `gating` must be one of {GATINGS}, got {gating!r}")
        self.gating = gating
        self.expert_activation = activations.get(expert_activation)
        self._has_activation = (
            expert_activation is not None and self.expert_activation is not keras.activations.linear
        )
        self.use_bias = bool(use_bias)
        self.diag_scale = check.non_negative_float("CrossMixture", "diag_scale", diag_scale)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)

    def build(self, x0_shape: Any, x_shape: Any = None) -> None:
        d = check.last_dim("CrossMixture", x0_shape)
        # A built layer refuses another width up front (as keras.layers.Dense does), not at its first matmul.
        self.input_spec = keras.InputSpec(axes={-1: d})
        if len(x0_shape) != 2:
            raise ValueError(f"CrossMixture: `x0` must have shape (batch, features), got {x0_shape}")
        if x_shape is not None and tuple(x_shape)[-1] not in (None, d):
            raise ValueError(f"CrossMixture: `x0` and `x` must have the same last dimension, got {x0_shape} and {x_shape}")
        k, r = self.num_experts, self.low_rank
        self.input_dim = d

        def kernel(name: str, shape: tuple[int, ...], regularize: bool = True) -> Any:
            return self.add_weight(
                name=name,
                shape=shape,
                initializer=clone_initializer(self.kernel_initializer),
                regularizer=self.kernel_regularizer if regularize else None,
            )

        self.down_kernels = kernel("down_kernels", (k, d, r))
        self.inner_kernels = kernel("inner_kernels", (k, r, r))
        self.up_kernels = kernel("up_kernels", (k, r, d))
        self.bias = (
            self.add_weight(
                name="bias",
                shape=(d,),
                initializer=clone_initializer(self.bias_initializer),
                regularizer=self.bias_regularizer,
            )
            if self.use_bias
            else None
        )
        if self.gating == "softmax" and k == 1:
            # A softmax over one expert is constantly 1: a gate there would be weights without gradients.
            self.gate_kernel = self.gate_bias = None
        else:
            self.gate_kernel = kernel("gate_kernel", (d, k), regularize=False)
            self.gate_bias = self.add_weight(name="gate_bias", shape=(k,), initializer="zeros")

    def _g(self, t: Any) -> Any:
        return self.expert_activation(t) if self._has_activation else t

    def call(self, x0: Any, x: Any = None) -> Any:
        if x is None:
            x = x0
        else:
            check.same_shape("CrossMixture", x0, x)
        if self.gate_kernel is None:
            gates = ops.ones_like(x[:, :1])
        else:
            gate_logits = ops.add(ops.matmul(x, self.gate_kernel), self.gate_bias)  # (B, K)
            gates = ops.softmax(gate_logits, axis=-1) if self.gating == "softmax" else ops.sigmoid(gate_logits)
        h = self._g(ops.einsum("bd,kdr->bkr", x, self.down_kernels))
        h = self._g(ops.einsum("bkr,krs->bks", h, self.inner_kernels))
        # Gate before projecting back up: Σ_i G_i U_i h_i is one (B, K·r) × (K·r, d) product.
        h = ops.multiply(h, ops.expand_dims(gates, -1))
        mixed = ops.einsum("bkr,krd->bd", h, self.up_kernels)
        # The shared bias and diagonal term enter every expert, hence scaled by Σ_i G_i (1 for softmax).
        shared = None
        if self.bias is not None:
            shared = self.bias
        if self.diag_scale:
            diag = ops.multiply(self.diag_scale, x)
            shared = diag if shared is None else ops.add(shared, diag)
        if shared is not None:
            if self.gating == "softmax":
                mixed = ops.add(mixed, shared)
            else:
                mixed = ops.add(mixed, ops.multiply(ops.sum(gates, axis=-1, keepdims=True), shared))
        return ops.add(ops.multiply(x0, mixed), x)

    def compute_output_shape(self, x0_shape: Any, x_shape: Any = None) -> Any:
        return x0_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "num_experts": self.num_experts,
            "low_rank": self.low_rank,
            "gating": self.gating,
            "expert_activation": activations.serialize(self.expert_activation) if self._has_activation else None,
            "use_bias": self.use_bias,
            "diag_scale": self.diag_scale,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
        }
