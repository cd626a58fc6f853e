"""Knowledge distillation: an auxiliary head trained on a teacher's temperature-softened predictions."""
from __future__ import annotations

from typing import Any, Sequence

import keras
from keras import ops

from ctrkit.layers import _validation as check
from ctrkit.layers import activations
from ctrkit.layers.cross import clone_initializer


def _bce_with_logits(labels: Any, logits: Any) -> Any:
    """Element-wise binary cross-entropy of soft ``labels`` against ``sigmoid(logits)``, overflow-safe."""
    return ops.relu(logits) - logits * labels + ops.log1p(ops.exp(-ops.abs(logits)))


def teacher_confidence(teacher_logits: Any) -> Any:
    """Confidence weight ``|2 σ(t) − 1|`` of a teacher logit: 0 for a coin flip, → 1 when certain."""
    return ops.abs(2.0 * ops.sigmoid(teacher_logits) - 1.0)


@keras.saving.register_keras_serializable(package="ctrkit", name="distillation_loss")
def distillation_loss(
    teacher_logits: Any,
    student_logits: Any,
    temperature: float = 1.0,
    confidence_weighting: bool = False,
    form: str = "bce",
) -> Any:
    """Per-example distillation loss of a binary student against a binary teacher.

    ```
    p_T = σ(t / T),  q_T = σ(s / T)
    L   = T² · w · BCE(p_T, q_T)                          form="bce"
    L   = T² · w · (BCE(p_T, q_T) − H(p_T)) = T² w KL(p_T‖q_T)   form="kl"
    w   = |2 σ(t) − 1|  if confidence_weighting else 1
    ```

    Both forms have the same gradient in ``s``; ``"kl"`` is 0 when the student matches the teacher,
    which makes it readable as a metric. ``T²`` keeps gradient magnitudes comparable across
    temperatures (Hinton et al.). Confidence weighting down-weights examples the teacher is unsure about
    (its un-softened probability near 0.5).

    Args:
        teacher_logits: teacher logits ``t``, any shape.
        student_logits: student logits ``s``, same shape; a trailing axis of 1 on one side only is added to
            the other (``(batch,)`` against ``(batch, 1)``), any other difference is an error.
        temperature: ``T > 0``. Defaults to 1.
        confidence_weighting: multiply by ``w = |2 σ(t) − 1|``. Defaults to ``False``.
        form: ``"bce"`` or ``"kl"``.

    Returns:
        The loss per example, shape of the (rank-aligned) inputs.

    References:
    - [G. Hinton et al., 2015](https://arxiv.org/abs/1503.02531), Distilling the knowledge in a neural network.
    - [arXiv:2002.03532](https://arxiv.org/abs/2002.03532), distillation for CTR prediction.
    - [arXiv:2211.10193](https://arxiv.org/abs/2211.10193), temperature scaling.
    """
    t_value = check.as_real(temperature)
    if t_value is None or t_value <= 0:
        raise ValueError(f"distillation_loss: temperature must be > 0, got {temperature!r}")
    temperature = t_value
    if form not in ("bce", "kl"):
        raise ValueError(f"distillation_loss: form must be 'bce' or 'kl', got {form!r}")
    t = ops.convert_to_tensor(teacher_logits, "float32")
    s = ops.convert_to_tensor(student_logits, "float32")
    t, s = _same_rank(t, s)
    if len(t.shape) != len(s.shape) or any(a != b for a, b in zip(t.shape, s.shape) if None not in (a, b)):
        raise ValueError(f"distillation_loss: teacher logits {tuple(t.shape)} and student logits {tuple(s.shape)} differ in shape")
    p = ops.sigmoid(t / temperature)
    loss = _bce_with_logits(p, s / temperature)
    if form == "kl":
        loss = loss - _bce_with_logits(p, t / temperature)  # minus the teacher's own entropy H(p_T)
    loss = loss * (temperature**2)
    if confidence_weighting:
        loss = loss * teacher_confidence(t)
    return loss


def _same_rank(t: Any, s: Any) -> tuple[Any, Any]:
    """A ``(batch,)`` column of logits next to a ``(batch, 1)`` one gets the trailing axis too, as Keras'
    built-in losses do: broadcasting them instead gives a ``(batch, batch)`` loss (every student logit
    fitted to every teacher logit), which a ``tf.data`` batch of unknown size would not reveal."""
    if len(t.shape) == len(s.shape) + 1 and t.shape[-1] == 1:
        s = ops.expand_dims(s, -1)
    elif len(s.shape) == len(t.shape) + 1 and s.shape[-1] == 1:
        t = ops.expand_dims(t, -1)
    return t, s


@keras.saving.register_keras_serializable(package="ctrkit")
class DistillationLoss(keras.losses.Loss):
    """:func:`distillation_loss` as a Keras loss: ``y_true`` is the teacher logit, ``y_pred`` the student's.

    Args:
        temperature: ``T > 0``. Defaults to 1.
        confidence_weighting: weight examples by ``|2 σ(t) − 1|``. Defaults to ``False``.
        form: ``"bce"`` or ``"kl"`` (see :func:`distillation_loss`).
        reduction, name: as for any Keras loss (default: mean over the batch).

    Example:

    ```python
    # Both heads output logits: the click loss must take logits too ("binary_crossentropy" would read
    # them as probabilities, clipped into (0, 1)).
    model.compile(loss={"logits": keras.losses.BinaryCrossentropy(from_logits=True),
                        "distill_logits": DistillationLoss(temperature=2.0)})
    ```

    References:
    - [arXiv:2002.03532](https://arxiv.org/abs/2002.03532), distillation for CTR prediction.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        confidence_weighting: bool = False,
        form: str = "bce",
        reduction: str = "sum_over_batch_size",
        name: str = "distillation_loss",
        **kwargs: Any,
    ) -> None:
        super().__init__(reduction=reduction, name=name, **kwargs)
        distillation_loss(0.0, 0.0, temperature, confidence_weighting, form)  # validates the arguments
        self.temperature = float(temperature)
        self.confidence_weighting = bool(confidence_weighting)
        self.form = form

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return distillation_loss(y_true, y_pred, self.temperature, self.confidence_weighting, self.form)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "temperature": self.temperature,
            "confidence_weighting": self.confidence_weighting,
            "form": self.form,
        }


@keras.saving.register_keras_serializable(package="ctrkit")
class DistillationHead(keras.layers.Layer):
    """Auxiliary logit head for distillation; shares the body with the main head.

    ```
    s = w_oᵀ a(W_n … a(W_1 h + b_1) …) + b_o        (no hidden layers by default: s = w_oᵀ h + b_o)
    ```

    Train ``s`` with :func:`distillation_loss` against the teacher's logits. The served (main) head is a
    separate layer that never sees teacher labels; the teacher's knowledge reaches it only through the
    shared body, which keeps the served logit calibrated to real clicks.

    Args:
        hidden_units: widths of optional hidden layers in the head. Defaults to ``()``.
        activation: activation of the hidden layers (Keras name or ``"smelu"``). Defaults to ``"relu"``.
        kernel_initializer: initializer of the head's kernels. Defaults to ``"glorot_uniform"``.
        **kwargs: base layer arguments.

    Call arguments:
        hidden: ``(batch, h)`` body output.

    Returns:
        ``(batch, 1)`` distillation logit.

    Example:

    ```python
    h = DCN(...)(x0)
    outputs = {"logits": keras.layers.Dense(1)(h), "distill_logits": DistillationHead()(h)}
    ```

    References:
    - [arXiv:2002.03532](https://arxiv.org/abs/2002.03532), distillation for CTR prediction.
    - [G. Hinton et al., 2015](https://arxiv.org/abs/1503.02531)
    """

    def __init__(
        self,
        hidden_units: Sequence[int] = (),
        activation: activations.Activation = "relu",
        kernel_initializer: Any = "glorot_uniform",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.hidden_units = check.positive_int_sequence("DistillationHead", "hidden_units", hidden_units)
        act = activations.get(activation)
        self.activation = activations.serialize_identifier(activation)
        # An object here, serialized in get_config only: Keras' serializer imports TensorFlow on any backend.
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.hidden = [
            keras.layers.Dense(u, activation=act, kernel_initializer=clone_initializer(self.kernel_initializer),
                               dtype=self.dtype_policy, name=f"hidden_{i}")
            for i, u in enumerate(self.hidden_units)
        ]
        self.out = keras.layers.Dense(1, kernel_initializer=clone_initializer(self.kernel_initializer),
                                      dtype=self.dtype_policy, name="logit")

    def build(self, input_shape: Any) -> None:
        check.last_dim("DistillationHead", input_shape, "hidden")
        shape = tuple(input_shape)
        for layer in self.hidden:
            layer.build(shape)
            shape = shape[:-1] + (layer.units,)
        self.out.build(shape)

    def call(self, hidden: Any) -> Any:
        for layer in self.hidden:
            hidden = layer(hidden)
        return self.out(hidden)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return tuple(input_shape)[:-1] + (1,)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "hidden_units": list(self.hidden_units),
            "activation": self.activation,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }
