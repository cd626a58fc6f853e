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


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("gating", ["softmax", "sigmoid"])
def test_mixture_gradient_wrt_inputs_and_weights_matches_finite_differences(use_bias, gating):
    import keras

    rng = np.random.default_rng(4)
    # The inputs as variables, so the same central differences check d loss / d x0 and d loss / d x.
    x0 = keras.Variable(rng.normal(size=(4, 6)), dtype="float64", name="x0")
    x = keras.Variable(rng.normal(size=(4, 6)), dtype="float64", name="x")
    layer = CrossMixture(num_experts=3, low_rank=2, gating=gating, use_bias=use_bias, diag_scale=0.3,
                         dtype="float64")
    layer(x0, x)
    assert ("bias" in [v.path.split("/")[-1] for v in layer.weights]) == use_bias
    randomize(layer, rng, 0.6)

    def loss():
        return tf.reduce_sum(tf.sin(layer(x0, x)))

    variables = [x0, x, *layer.trainable_variables]
    with tf.GradientTape() as tape:
        value = loss()
    grads = tape.gradient(value, variables)
    assert all(g is not None for g in grads)
    assert_weight_grads_match(loss, variables, grads)


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
    mixture_args = dict(num_experts=2, low_rank=3) if kind == "mixture" else {}  # refused by the other kinds
    net = CrossNetwork(num_layers=3, kind=kind, **mixture_args)
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


def test_cross_network_rejects_arguments_its_kind_ignores():
    from ctrkit.layers import DCN

    for kind in ("full", "low_rank", "mixture"):
        with pytest.raises(ValueError, match="gating.*bogus"):
            CrossNetwork(kind=kind, gating="bogus")  # at construction, not at build
    with pytest.raises(ValueError, match="`pre_activation` applies to kind='full' and 'low_rank' only"):
        CrossNetwork(kind="mixture", pre_activation="relu")
    for kind in ("full", "low_rank"):
        for arg in ({"num_experts": 2}, {"low_rank": 8}, {"gating": "sigmoid"}, {"expert_activation": None},
                    {"expert_activation": "relu"}):
            with pytest.raises(ValueError, match=f"`{next(iter(arg))}` applies to kind='mixture' only"):
                CrossNetwork(kind=kind, **arg)
    # Defaults (as saved in every existing config) still load, for every kind.
    for kind in ("full", "low_rank", "mixture"):
        net = CrossNetwork(kind=kind, num_experts=4, low_rank=32, gating="softmax", expert_activation="tanh")
        assert CrossNetwork.from_config(net.get_config()).get_config() == net.get_config()
    # DCN takes one set of arguments for every kind and forwards the mixture ones only to mixtures.
    x0 = np.zeros((2, 8), "float32")
    for kind in ("full", "low_rank", "mixture"):
        dcn = DCN(cross_kind=kind, num_cross_layers=1, num_experts=2, low_rank=3, gating="sigmoid",
                  expert_activation=None, dnn_units=(4,))
        assert dcn(x0).shape == (2, 4)
        assert DCN.from_config(dcn.get_config()).get_config() == dcn.get_config()
    assert dcn.cross_network.num_experts == 2 and dcn.cross_network.gating == "sigmoid"
    with pytest.raises(ValueError, match="gating"):
        DCN(cross_kind="full", gating="bogus")


def test_cross_network_low_rank_default_rank_is_quarter_width():
    net = CrossNetwork(num_layers=2, kind="low_rank")
    net(np.zeros((2, 40), "float32"))
    assert [layer.projection_dim for layer in net.cross_layers] == [10, 10]
    with pytest.raises(ValueError, match="low_rank"):
        CrossNetwork(kind="full", projection_dim=4)
    with pytest.raises(ValueError, match="kind"):
        CrossNetwork(kind="diagonal")
