"""CrossMixture and CrossNetwork: NumPy formula, reduction to low-rank Cross, gradients."""
from __future__ import annotations

import numpy as np
import pytest
from gradcheck import assert_weight_grads_match
import tensorflow as tf

from ctrkit.layers import Cross, CrossMixture, CrossNetwork


def np_mixture(x0, x, layer, gating="softmax", g=np.tanh, diag_scale=0.0):
    """Σ_i G_i x0 ⊙ (U_i g(C_i g(V_iᵀ x)) + b + diag x) + x, looping over experts the slow, obvious way."""
    w = dict(zip([v.path.split("/")[-1] for v in layer.weights], layer.get_weights()))
    if "gate_kernel" not in w:
        return x0 * (g(g(x @ w["down_kernels"][0]) @ w["inner_kernels"][0]) @ w["up_kernels"][0]
                     + w.get("bias", 0.0) + diag_scale * x) + x
    logits = x @ w["gate_kernel"] + w["gate_bias"]
    if gating == "softmax":
        gates = np.exp(logits - logits.max(-1, keepdims=True))
        gates /= gates.sum(-1, keepdims=True)
    else:
        gates = 1 / (1 + np.exp(-logits))
    out = np.zeros_like(x)
    for i in range(layer.num_experts):
        inner = g(g(x @ w["down_kernels"][i]) @ w["inner_kernels"][i]) @ w["up_kernels"][i]
        expert = x0 * (inner + w.get("bias", 0.0) + diag_scale * x)
        out += gates[:, i : i + 1] * expert
    return out + x


def randomize(layer, rng, scale=0.4):
    layer.set_weights([rng.normal(size=w.shape).astype(w.dtype) * scale for w in layer.get_weights()])


@pytest.mark.parametrize("gating", ["softmax", "sigmoid"])
@pytest.mark.parametrize("diag_scale", [0.0, 0.3])
def test_mixture_matches_numpy_formula(gating, diag_scale):
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(6, 10)).astype("float32")
    x = rng.normal(size=(6, 10)).astype("float32")
    layer = CrossMixture(num_experts=3, low_rank=4, gating=gating, diag_scale=diag_scale)
    layer(x0, x)
    randomize(layer, rng)
    expected = np_mixture(x0, x, layer, gating, np.tanh, diag_scale)
    np.testing.assert_allclose(np.asarray(layer(x0, x)), expected, rtol=1e-4, atol=1e-5)


def test_mixture_weight_shapes():
    layer = CrossMixture(num_experts=3, low_rank=4)
    layer(np.zeros((2, 10), "float32"))
    shapes = {v.path.split("/")[-1]: tuple(v.shape) for v in layer.weights}
    assert shapes == {"down_kernels": (3, 10, 4), "inner_kernels": (3, 4, 4), "up_kernels": (3, 4, 10),
                      "bias": (10,), "gate_kernel": (10, 3), "gate_bias": (3,)}


@pytest.mark.parametrize("diag_scale", [0.0, 0.5])
def test_mixture_with_one_linear_expert_and_identity_c_is_low_rank_cross(diag_scale):
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=(5, 12)).astype("float32")
    x = rng.normal(size=(5, 12)).astype("float32")
    cross = Cross(projection_dim=3, diag_scale=diag_scale)
    cross(x0, x)
    randomize(cross, rng)
    down, up, bias = cross.get_weights()
    mix = CrossMixture(num_experts=1, low_rank=3, expert_activation=None, diag_scale=diag_scale)
    mix(x0, x)
    assert len(mix.weights) == 4  # softmax over one expert is 1: no gate weights
    mix.set_weights([down[None], np.eye(3, dtype="float32")[None], up[None], bias])
    np.testing.assert_allclose(np.asarray(mix(x0, x)), np.asarray(cross(x0, x)), rtol=1e-5, atol=1e-5)


def test_mixture_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    x0 = tf.constant(rng.normal(size=(4, 6)), tf.float64)
    x = tf.constant(rng.normal(size=(4, 6)), tf.float64)
    layer = CrossMixture(num_experts=2, low_rank=3, diag_scale=0.2, dtype="float64")
    layer(x0, x)
    randomize(layer, rng, 0.6)

    def loss():
        return tf.reduce_sum(tf.sin(layer(x0, x)))

    with tf.GradientTape() as tape:
        value = loss()
    grads = tape.gradient(value, layer.trainable_variables)
    assert_weight_grads_match(loss, layer.trainable_variables, grads)


def test_mixture_input_validation():
    with pytest.raises(ValueError, match="gating"):
        CrossMixture(gating="relu")
    with pytest.raises(ValueError, match="num_experts"):
        CrossMixture(num_experts=0)
    with pytest.raises(ValueError, match="low_rank"):
        CrossMixture(low_rank=2.5)
    with pytest.raises(ValueError, match="batch, features"):
        CrossMixture()(np.zeros((2, 3, 4), "float32"))


@pytest.mark.parametrize("kind", ["full", "low_rank", "mixture"])
def test_cross_network_is_the_stack_of_its_layers(kind):
    rng = np.random.default_rng(3)
    x0 = rng.normal(size=(4, 8)).astype("float32")
    net = CrossNetwork(num_layers=3, kind=kind, num_experts=2, low_rank=3)
    net(x0)
    randomize(net, rng, 0.3)
    assert len(net.cross_layers) == 3
    x = x0
    for layer in net.cross_layers:
        if kind == "mixture":
            x = np_mixture(x0, x, layer).astype("float32")
        else:
            w = layer.get_weights()
            kernel = w[0] if kind == "full" else w[0] @ w[1]
            x = x0 * (x @ kernel + w[-1]) + x
    np.testing.assert_allclose(np.asarray(net(x0)), x, rtol=1e-4, atol=1e-4)


def test_cross_network_low_rank_default_rank_is_quarter_width():
    net = CrossNetwork(num_layers=2, kind="low_rank")
    net(np.zeros((2, 40), "float32"))
    assert [layer.projection_dim for layer in net.cross_layers] == [10, 10]
    with pytest.raises(ValueError, match="low_rank"):
        CrossNetwork(kind="full", projection_dim=4)
    with pytest.raises(ValueError, match="kind"):
        CrossNetwork(kind="diagonal")
