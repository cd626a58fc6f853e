"""Cross: NumPy formula, gradients, and weight interchange with keras-rs FeatureCross and TFRS Cross."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import keras_rs
import numpy as np
import pytest
from gradcheck import assert_weight_grads_match
import tensorflow as tf

from ctrkit.layers import Cross, smelu


def np_cross(x0, x, weights, projection_dim, use_bias=True, diag_scale=0.0, pre_activation=None):
    """x_{l+1} = x0 * (f(x W + b) + diag_scale x) + x, with W = down @ up at low rank."""
    weights = list(weights)
    kernel = weights.pop(0)
    if projection_dim is not None:
        kernel = kernel @ weights.pop(0)
    h = x @ kernel
    if use_bias:
        h = h + weights.pop(0)
    if pre_activation is not None:
        h = pre_activation(h)
    return x0 * (h + diag_scale * x) + x


def randomize(layer, rng):
    layer.set_weights([rng.normal(size=w.shape).astype("float32") * 0.3 for w in layer.get_weights()])


@pytest.mark.parametrize("projection_dim", [None, 3])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("diag_scale", [0.0, 0.7])
def test_cross_matches_numpy_formula(projection_dim, use_bias, diag_scale):
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(5, 8)).astype("float32")
    x = rng.normal(size=(5, 8)).astype("float32")
    layer = Cross(projection_dim=projection_dim, use_bias=use_bias, diag_scale=diag_scale)
    layer(x0, x)
    randomize(layer, rng)
    expected = np_cross(x0, x, layer.get_weights(), projection_dim, use_bias, diag_scale)
    np.testing.assert_allclose(np.asarray(layer(x0, x)), expected, rtol=1e-5, atol=1e-5)
    # x=None means x = x0
    expected_self = np_cross(x0, x0, layer.get_weights(), projection_dim, use_bias, diag_scale)
    np.testing.assert_allclose(np.asarray(layer(x0)), expected_self, rtol=1e-5, atol=1e-5)


def test_cross_weight_layout():
    full, low = Cross(), Cross(projection_dim=4, use_bias=False)
    full(np.zeros((2, 10), "float32"))
    low(np.zeros((2, 10), "float32"))
    assert [tuple(w.shape) for w in full.weights] == [(10, 10), (10,)]
    assert [tuple(w.shape) for w in low.weights] == [(10, 4), (4, 10)]


def test_cross_pre_activation_smelu_string():
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=(4, 6)).astype("float32")
    layer = Cross(pre_activation="smelu")
    layer(x0)
    randomize(layer, rng)

    def np_smelu(h):
        return np.where(h >= 1, h, np.where(h <= -1, 0.0, (h + 1) ** 2 / 4))

    expected = np_cross(x0, x0, layer.get_weights(), None, pre_activation=np_smelu)
    np.testing.assert_allclose(np.asarray(layer(x0)), expected, rtol=1e-5, atol=1e-5)
    assert layer.pre_activation is smelu
    assert Cross.from_config(layer.get_config()).pre_activation is smelu


def test_cross_input_validation():
    with pytest.raises(ValueError, match="projection_dim"):
        Cross(projection_dim=0)
    with pytest.raises(ValueError, match="diag_scale"):
        Cross(diag_scale=-1.0)
    with pytest.raises(ValueError, match="same (shape|last dimension)"):
        Cross()(np.zeros((2, 4), "float32"), np.zeros((2, 5), "float32"))
    with pytest.raises(ValueError, match="batch"):
        Cross()(np.zeros((4,), "float32"))
    with pytest.raises(ValueError, match="unknown activation"):
        Cross(pre_activation="no-such-activation")


def test_numpy_scalar_arguments_are_accepted_and_stored_as_python_numbers():
    from ctrkit.layers import DCN, CrossMixture, CrossNetwork, FeatureEmbedding

    cross = Cross(projection_dim=np.int64(4), diag_scale=np.float32(0.5))
    assert cross.projection_dim == 4 and type(cross.projection_dim) is int
    assert cross.diag_scale == 0.5 and type(cross.diag_scale) is float
    emb = FeatureEmbedding({"a": np.int64(5), "b": np.int32(3)}, embedding_dim=np.int64(2))
    assert emb.vocab_sizes == {"a": 5, "b": 3} and emb.get_config()["embedding_dim"] == 2
    mix = CrossMixture(num_experts=np.int16(2), low_rank=np.uint8(3), diag_scale=np.float64(0.1))
    dcn = DCN(num_cross_layers=np.int64(2), dnn_units=np.array([4, 3]), dropout=np.float32(0.25),
              diag_scale=np.float32(0.5))
    for layer in (cross, emb, mix, CrossNetwork(num_layers=np.int64(2)), dcn):
        json.dumps(layer.get_config())  # plain Python numbers only
    assert dcn.get_config()["dnn_units"] == [4, 3] and dcn.get_config()["num_cross_layers"] == 2
    for bad in (True, np.bool_(True), 2.0, np.float32(2.0)):
        with pytest.raises(ValueError, match="projection_dim"):
            Cross(projection_dim=bad)
    for bad in (True, np.bool_(False), float("nan"), "0.5"):
        with pytest.raises(ValueError, match="diag_scale"):
            Cross(diag_scale=bad)


@pytest.mark.parametrize("projection_dim", [None, 2])
def test_cross_gradient_matches_finite_differences(projection_dim):
    rng = np.random.default_rng(2)
    x0 = tf.constant(rng.normal(size=(3, 5)), tf.float64)
    x = tf.constant(rng.normal(size=(3, 5)), tf.float64)
    layer = Cross(projection_dim=projection_dim, diag_scale=0.3, pre_activation="tanh", dtype="float64")
    layer(x0, x)
    layer.set_weights([rng.normal(size=w.shape) * 0.5 for w in layer.get_weights()])

    def loss():
        return tf.reduce_sum(tf.sin(layer(x0, x)))

    with tf.GradientTape() as tape:
        tape.watch([x0, x])
        value = loss()
    grads = tape.gradient(value, [x0, x] + layer.trainable_variables)
    eps = 1e-6
    # inputs
    for tensor, grad in ((x0, grads[0]), (x, grads[1])):
        base = tensor.numpy()
        for idx in [(0, 0), (1, 3), (2, 4)]:
            plus, minus = base.copy(), base.copy()
            plus[idx] += eps
            minus[idx] -= eps
            f = lambda v: float(tf.reduce_sum(tf.sin(layer(tf.constant(v) if tensor is x0 else x0,
                                                               tf.constant(v) if tensor is x else x))))
            numeric = (f(plus) - f(minus)) / (2 * eps)
            assert abs(numeric - grad.numpy()[idx]) < 1e-6 * max(1.0, abs(numeric))
    # weights
    assert_weight_grads_match(loss, layer.trainable_variables, grads[2:], eps=eps)



@pytest.mark.parametrize("projection_dim", [None, 2])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("diag_scale", [0.0, 0.3])
def test_cross_on_itself_gradient_matches_finite_differences(projection_dim, use_bias, diag_scale):
    """``Cross()(x0)`` computes x0 ⊙ (h + 1) rather than x0 ⊙ h + x0; x0's gradient must still be exact."""
    rng = np.random.default_rng(3)
    x0 = tf.Variable(rng.normal(size=(3, 5)), dtype=tf.float64)
    layer = Cross(projection_dim=projection_dim, use_bias=use_bias, diag_scale=diag_scale, dtype="float64")
    layer(x0)
    layer.set_weights([rng.normal(size=w.shape) * 0.5 for w in layer.get_weights()])
    expected = np_cross(x0.numpy(), x0.numpy(), layer.get_weights(), projection_dim, use_bias, diag_scale)
    np.testing.assert_allclose(np.asarray(layer(x0)), expected, rtol=1e-12)

    def loss():
        return tf.reduce_sum(tf.sin(layer(x0)))

    with tf.GradientTape() as tape:
        value = loss()
    variables = [x0] + layer.trainable_variables
    assert_weight_grads_match(loss, variables, tape.gradient(value, variables))

@pytest.mark.parametrize("projection_dim", [None, 4])
@pytest.mark.parametrize("diag_scale", [0.0, 0.5])
def test_weights_interchange_with_keras_rs_feature_cross(projection_dim, diag_scale):
    rng = np.random.default_rng(3)
    x0 = rng.normal(size=(6, 16)).astype("float32")
    x = rng.normal(size=(6, 16)).astype("float32")
    ours = Cross(projection_dim=projection_dim, diag_scale=diag_scale, pre_activation="relu")
    theirs = keras_rs.layers.FeatureCross(projection_dim=projection_dim, diag_scale=diag_scale, pre_activation="relu")
    ours(x0, x)
    theirs(x0, x)
    assert [w.shape for w in ours.get_weights()] == [w.shape for w in theirs.get_weights()]
    randomize(theirs, rng)
    ours.set_weights(theirs.get_weights())  # keras-rs -> ctrkit
    np.testing.assert_allclose(np.asarray(ours(x0, x)), np.asarray(theirs(x0, x)), atol=1e-5)
    randomize(ours, rng)
    theirs.set_weights(ours.get_weights())  # ctrkit -> keras-rs
    np.testing.assert_allclose(np.asarray(ours(x0, x)), np.asarray(theirs(x0, x)), atol=1e-5)


TFRS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    import tensorflow_recommenders as tfrs

    folder = sys.argv[1]
    cases = json.load(open(os.path.join(folder, "cases.json")))
    x0 = np.load(os.path.join(folder, "x0.npy"))
    x = np.load(os.path.join(folder, "x.npy"))
    for name, case in cases.items():
        layer = tfrs.layers.dcn.Cross(projection_dim=case["projection_dim"], diag_scale=case["diag_scale"],
                                      bias_initializer="random_normal")
        layer(x0, x)
        own = layer.get_weights()  # TFRS's own initialisation (truncated normal kernels)
        np.save(os.path.join(folder, name + "_tfrs_out.npy"), layer(x0, x).numpy())
        for i, w in enumerate(own):
            np.save(os.path.join(folder, f"{name}_tfrs_w{i}.npy"), w)
        ours = [np.load(os.path.join(folder, f"{name}_ours_w{i}.npy")) for i in range(len(own))]
        layer.set_weights(ours)
        np.save(os.path.join(folder, name + "_tfrs_on_ours.npy"), layer(x0, x).numpy())
    print("tfrs-ok", tf.keras.__version__ if hasattr(tf.keras, "__version__") else "")
    """
)


@pytest.mark.slow
def test_weights_interchange_with_tfrs_cross_in_subprocess(tmp_path):
    """TFRS needs Keras 2: it runs in a child process and exchanges weights and outputs as .npy files."""
    rng = np.random.default_rng(4)
    x0 = rng.normal(size=(7, 12)).astype("float32")
    x = rng.normal(size=(7, 12)).astype("float32")
    np.save(tmp_path / "x0.npy", x0)
    np.save(tmp_path / "x.npy", x)
    cases = {"full": {"projection_dim": None, "diag_scale": 0.0}, "low_rank": {"projection_dim": 3, "diag_scale": 0.4}}
    layers = {}
    for name, case in cases.items():
        layer = Cross(**case)
        layer(x0, x)
        randomize(layer, rng)
        layers[name] = layer
        for i, w in enumerate(layer.get_weights()):
            np.save(tmp_path / f"{name}_ours_w{i}.npy", w)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "run_tfrs.py").write_text(TFRS_SCRIPT)
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(tmp_path / "run_tfrs.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tfrs-ok" in proc.stdout
    for name, layer in layers.items():
        # ctrkit weights -> TFRS gives ctrkit's outputs
        np.testing.assert_allclose(np.load(tmp_path / f"{name}_tfrs_on_ours.npy"), np.asarray(layer(x0, x)), atol=1e-5)
        # TFRS weights (its own initialisation) -> ctrkit gives TFRS's outputs: the migration path
        tfrs_weights = [np.load(tmp_path / f"{name}_tfrs_w{i}.npy") for i in range(len(layer.get_weights()))]
        assert [w.shape for w in tfrs_weights] == [w.shape for w in layer.get_weights()]
        layer.set_weights(tfrs_weights)
        np.testing.assert_allclose(np.asarray(layer(x0, x)), np.load(tmp_path / f"{name}_tfrs_out.npy"), atol=1e-5)
