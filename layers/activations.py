"""SmeLU, the smooth reLU, and the activation resolver every ctrkit layer uses.

The string ``"smelu"`` works in ctrkit layers only (``DCN(activation="smelu")``, ``Cross(pre_activation=
"smelu")``, ...), which resolve activations through :func:`get`: it knows ``"smelu"`` and defers everything
else to Keras. A plain Keras layer does not take the string: ``keras.activations.get`` looks strings up in
Keras' built-in table only (not in ``keras.saving.get_custom_objects()`` nor a ``custom_object_scope``), so
``keras.layers.Dense(3, activation="smelu")`` (or ``"ctrkit>smelu"``) raises ``ValueError`` and making it
work would take patching Keras internals. Pass the function instead,
``keras.layers.Dense(3, activation=ctrkit.layers.smelu)``: it is registered as ``"ctrkit>smelu"``, so such
a layer saves to ``.keras`` and loads back in any process that has imported ``ctrkit.layers``.
"""
from __future__ import annotations

from typing import Any, Callable

import keras
from keras import ops

from ctrkit.layers import _validation as check

Activation = str | Callable[..., Any] | dict[str, Any] | None


@keras.saving.register_keras_serializable(package="ctrkit", name="smelu")
def smelu(x: Any, beta: float = 1.0) -> Any:
    """Smooth reLU (SmeLU).

    ```
    smelu(x) = 0                      if x <= -beta
             = (x + beta)^2 / (4 beta) if |x| <= beta
             = x                      if x >= beta
    ```

    A ReLU whose kink is replaced by a quadratic piece, so the gradient is continuous. Models trained
    with it are markedly more reproducible across identical runs than ReLU models at equal accuracy.

    Computed as ``(clip(x, -b, b) + b)^2 / (4 b) + relu(x - b)``, which equals the piecewise form and has
    no ``where`` branches (so no NaN leaks into the gradient of the unused branch).

    Args:
        x: input tensor.
        beta: half-width of the quadratic region, > 0.

    Example:

    ```python
    y = smelu(keras.ops.convert_to_tensor([-2.0, 0.0, 2.0]))  # [0.0, 0.25, 2.0]
    ```

    References:
    - [G. I. Shamir et al., 2022](https://arxiv.org/abs/2202.06499), Smooth activations and reproducibility.
    - [G. I. Shamir, D. Lin, 2022](https://arxiv.org/abs/2209.05310), Real world large scale recommendation
      systems reproducibility and smooth activations.
    """
    if beta <= 0:
        raise ValueError(f"smelu: beta must be > 0, got {beta}")
    x = ops.convert_to_tensor(x)
    clipped = ops.clip(x, -beta, beta)
    return ops.square(clipped + beta) / (4.0 * beta) + ops.relu(x - beta)


@keras.saving.register_keras_serializable(package="ctrkit")
class SmeLU(keras.layers.Layer):
    """Smooth reLU activation layer: see :func:`smelu` for the formula.

    Args:
        beta: half-width of the quadratic region around 0, > 0. Defaults to 1.0.
        **kwargs: base layer arguments.

    Example:

    ```python
    h = keras.layers.Dense(64)(x)
    h = SmeLU(beta=0.5)(h)
    # or, in any ctrkit layer that takes an activation: DCN(activation="smelu")
    ```

    References:
    - [G. I. Shamir et al., 2022](https://arxiv.org/abs/2202.06499)
    - [G. I. Shamir, D. Lin, 2022](https://arxiv.org/abs/2209.05310)
    """

    def __init__(self, beta: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        b = check.as_real(beta)
        if b is None or b <= 0:
            raise ValueError(f"SmeLU: beta must be a number > 0, got {beta!r}")
        self.beta = b
        self.supports_masking = True

    def call(self, inputs: Any) -> Any:
        return smelu(inputs, self.beta)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "beta": self.beta}


def get(identifier: Activation) -> Callable[..., Any]:
    """Resolve an activation identifier, accepting ``"smelu"`` besides everything Keras accepts.

    Args:
        identifier: ``None`` (identity), a string (``"smelu"``, ``"ctrkit>smelu"`` or any Keras name),
            a serialized dict, or a callable.

    Returns:
        The activation callable.
    """
    if isinstance(identifier, str) and identifier in ("smelu", "ctrkit>smelu"):
        return smelu
    try:
        return keras.activations.get(identifier)
    except ValueError as e:
        raise ValueError(
            f"unknown activation {identifier!r}: use a Keras activation name, 'smelu', or a callable"
        ) from e


def serialize(activation: Callable[..., Any]) -> Any:
    """Inverse of :func:`get` for ``get_config``: ``smelu`` is stored as the string ``"smelu"``."""
    if activation is smelu:
        return "smelu"
    return keras.activations.serialize(activation)


def serialize_identifier(identifier: Activation) -> Any:
    """An activation identifier for ``get_config``: strings, ``None`` and dicts as given (so ``"smelu"``
    round-trips by name), callables serialized."""
    if isinstance(identifier, (str, type(None), dict)):
        return identifier
    return serialize(get(identifier))
