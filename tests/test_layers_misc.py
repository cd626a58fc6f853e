"""SmeLU, FeatureEmbedding, DCN, distillation and calibration layers against NumPy."""
from __future__ import annotations

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from ctrkit.layers import (
    DCN,
    BiasCalibration,
    Cross,
    CrossMixture,
    CrossNetwork,
    DistillationHead,
    DistillationLoss,
    FeatureEmbedding,
    PiecewiseLinearCalibration,
    SmeLU,
    TemperatureScaling,
    distillation_loss,
    smelu,
)
from ctrkit.layers import activations


def np_smelu(x, beta=1.0):
    return np.where(x >= beta, x, np.where(x <= -beta, 0.0, (x + beta) ** 2 / (4 * beta)))


def np_sigmoid(z):
    return 1 / (1 + np.exp(-z))


# -- SmeLU ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_smelu_matches_piecewise_formula_and_is_smooth(beta):
    x = np.linspace(-4, 4, 161).astype("float32")
    np.testing.assert_allclose(np.asarray(SmeLU(beta)(x)), np_smelu(x, beta), atol=1e-6)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = smelu(xt, beta)
    grad = tape.gradient(y, xt).numpy()
    np.testing.assert_allclose(grad, np.clip((x + beta) / (2 * beta), 0, 1), atol=1e-6)  # continuous, in [0, 1]


def test_smelu_string_accepted_by_ctrkit_layers():
    assert activations.get("smelu") is smelu
    assert keras.activations.get(keras.activations.serialize(smelu)) is smelu  # registered as ctrkit>smelu
    x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    dcn = DCN(structure="stacked", num_cross_layers=1, dnn_units=(4,), activation="smelu")
    out = np.asarray(dcn(x))
    cross_out = np.asarray(dcn.cross_network(x))
    kernel, bias = dcn.dense_layers[0].get_weights()
    np.testing.assert_allclose(out, np_smelu(cross_out @ kernel + bias), atol=1e-5)
    assert CrossMixture(expert_activation="smelu").expert_activation is smelu
    assert DCN.from_config(dcn.get_config()).get_config()["activation"] == "smelu"
    with pytest.raises(ValueError, match="beta"):
        SmeLU(beta=0)


# -- FeatureEmbedding -----------------------------------------------------------------------------

def make_embedding():
    return FeatureEmbedding({"b_multi": 6, "a_cat": 5}, embedding_dim={"a_cat": 3, "b_multi": 2},
                            numeric_features=["z_num", "y_num"])


def test_feature_embedding_matches_numpy_lookup_with_mixed_dims_and_masked_mean():
    layer = make_embedding()
    inputs = {
        "a_cat": np.array([0, 4, 2], "int64"),
        "b_multi": np.array([[1, 5, -1], [-1, -1, -1], [3, 3, 0]], "int64"),
        "z_num": np.array([0.5, -1.0, 2.0], "float32"),
        "y_num": np.array([[1.0], [2.0], [3.0]], "float32"),
        "label": np.array([1.0, 0.0, 1.0], "float32"),  # extra keys are ignored
    }
    out = np.asarray(layer(inputs))
    assert out.shape == (3, 3 + 2 + 2) == (3, layer.output_dim)
    ta, tb = (layer.embedding_tables[k].numpy() for k in ("a_cat", "b_multi"))
    expected_b = np.stack([(tb[1] + tb[5]) / 2, np.zeros(2), (2 * tb[3] + tb[0]) / 3])
    expected = np.concatenate([ta[[0, 4, 2]], expected_b, inputs["z_num"][:, None], inputs["y_num"]], axis=1)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_feature_embedding_shared_dim_and_tables():
    layer = FeatureEmbedding({"u": 3, "v": 7}, embedding_dim=4)
    out = layer({"u": np.array([2]), "v": np.array([6])})
    assert out.shape == (1, 8)
    assert {k: tuple(v.shape) for k, v in layer.embedding_tables.items()} == {"u": (3, 4), "v": (7, 4)}


@pytest.mark.parametrize("bad", [5, -1])
def test_feature_embedding_rejects_out_of_range_ids_eagerly(bad):
    layer = make_embedding()
    inputs = {"a_cat": np.array([0, bad]), "b_multi": np.array([[1], [2]]), "z_num": np.zeros(2), "y_num": np.zeros(2)}
    with pytest.raises(ValueError, match=r"feature 'a_cat' has id .* row 1"):
        layer(inputs)
    inputs["a_cat"] = np.array([0, 1])
    inputs["b_multi"] = np.array([[1, 6], [2, -1]])
    with pytest.raises(ValueError, match=r"feature 'b_multi' has id 6 in row 0"):
        layer(inputs)
    inputs["b_multi"] = np.array([[1, -2], [2, -1]])  # only -1 pads
    with pytest.raises(ValueError, match=r"'b_multi' has id -2"):
        layer(inputs)


def test_feature_embedding_rejects_out_of_range_ids_in_tf_function():
    layer = make_embedding()
    fn = tf.function(lambda d: layer(d))
    good = {"a_cat": tf.constant([0, 1], tf.int64), "b_multi": tf.constant([[1], [2]], tf.int64),
            "z_num": tf.zeros(2), "y_num": tf.zeros(2)}
    assert fn(good).shape == (2, 7)
    with pytest.raises(tf.errors.InvalidArgumentError, match="a_cat"):
        fn({**good, "a_cat": tf.constant([0, -3], tf.int64)})


def test_feature_embedding_graph_check_names_only_the_bad_univalent_features():
    from ctrkit.layers import FeatureEmbedding

    names = [f"C{i}" for i in range(1, 6)]
    layer = FeatureEmbedding({n: 4 for n in names}, embedding_dim=2)
    fn = tf.function(lambda d: layer(d))
    good = {n: tf.constant([0, 3], tf.int32 if n == "C2" else tf.int64) for n in names}
    assert fn(good).shape == (2, 10)
    np.testing.assert_allclose(fn(good).numpy(), layer({n: v.numpy() for n, v in good.items()}).numpy())
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"offending feature\(s\) among \[C1 \(vocab 4\), C2") as err:
        fn({**good, "C2": tf.constant([0, 4], tf.int32), "C4": tf.constant([-1, 0], tf.int64)})
    assert "[0 1 0 1 0]" in str(err.value)  # flags in the listed order: C2 and C4
    xla = tf.function(lambda d: layer(d), jit_compile=True)  # the check must not block XLA compilation
    np.testing.assert_allclose(xla(good).numpy(), fn(good).numpy(), rtol=1e-6)


def test_feature_embedding_gradient_is_sparse_indexed_slices():
    layer = make_embedding()
    inputs = {"a_cat": np.array([1, 1, 3]), "b_multi": np.array([[0, -1], [2, 4], [-1, -1]]),
              "z_num": np.ones(3, "float32"), "y_num": np.ones(3, "float32")}
    layer(inputs)
    tables = list(layer.embedding_tables.values())
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(inputs) ** 2)
    grads = tape.gradient(loss, tables)
    for g in grads:
        assert isinstance(g, tf.IndexedSlices)
    dense_a = tf.convert_to_tensor(grads[0]).numpy()
    assert set(np.nonzero(np.abs(dense_a).sum(1))[0]) == {1, 3}  # only looked-up rows get gradient


def test_feature_embedding_under_a_mixed_policy_casts_the_looked_up_rows_not_the_tables():
    """Autocast tables were read as a bfloat16 copy of each whole table on every call: O(table), not O(batch)."""
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        layer = FeatureEmbedding({"a_cat": 5000, "b_multi": 3000}, embedding_dim=4, multivalued_features=["b_multi"])
        inputs = {"a_cat": tf.constant([1, 1, 4999]), "b_multi": tf.constant([[0, -1], [2, 2999], [-1, -1]])}
        out = layer(inputs)
        tables = list(layer.embedding_tables.values())

        @tf.function
        def step(features):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.cast(layer(features), tf.float32) ** 2)
            return tape.gradient(loss, tables)

        graph = step.get_concrete_function(inputs).graph
        grads = step(inputs)
    finally:
        keras.config.set_dtype_policy("float32")
    assert out.dtype == "bfloat16" and all(t.dtype == "float32" for t in tables)
    table_shapes = {tuple(t.shape) for t in tables}
    full_table_casts = [op.name for op in graph.get_operations() if op.type == "Cast"
                        and tuple(op.inputs[0].shape) in table_shapes]
    assert not full_table_casts, full_table_casts
    assert all(isinstance(g, tf.IndexedSlices) for g in grads)
    a = tables[0].numpy()
    np.testing.assert_array_equal(np.asarray(out[:, :4], "float32"),
                                  np.asarray(tf.cast(tf.cast(a[[1, 1, 4999]], tf.bfloat16), tf.float32)))


def test_feature_embedding_validation():
    with pytest.raises(ValueError, match="missing: \\['b'\\]"):
        FeatureEmbedding({"a": 3, "b": 4}, embedding_dim={"a": 2})
    with pytest.raises(ValueError, match="vocab_sizes\\['a'\\]"):
        FeatureEmbedding({"a": 0})
    with pytest.raises(ValueError, match="both categorical and numeric"):
        FeatureEmbedding({"a": 3}, numeric_features=["a"])
    with pytest.raises(ValueError, match="`numeric_features` must be a list of feature names, got the string 'price'"):
        FeatureEmbedding({"a": 3}, numeric_features="price")  # was split into ['p', 'r', 'i', 'c', 'e']
    with pytest.raises(ValueError, match=r"feature names \['user/id'\] contain '/'"):
        FeatureEmbedding({"user/id": 3})  # failed at the first call, in Keras' weight naming
    layer = FeatureEmbedding({"a": 3}, numeric_features=["n"])
    with pytest.raises(KeyError, match="lacks features \\['n'\\]") as missing:
        layer({"a": np.array([1])})
    # printed as written: a plain KeyError shows the repr, one line of \n escapes inside Keras' wrapper
    assert "\n" in str(missing.value) and "\\n" not in str(missing.value)
    with pytest.raises(ValueError, match="integer ids"):
        layer({"a": np.array([1.0]), "n": np.array([1.0])})
    with pytest.raises(ValueError, match=r"disagree on the batch size: \{'a': 2, 'n': 3\}"):
        layer({"a": np.array([1, 2]), "n": np.ones(3, "float32")})


@pytest.mark.parametrize("graph", [False, True])
def test_declared_multivalued_feature_keeps_padding_at_length_one(graph):
    # A padded batch whose longest row has one id is (B, 1): undeclared, it reads as univalent.
    layer = FeatureEmbedding({"a": 5, "tags": 6}, embedding_dim=3, multivalued_features=["tags"])
    call = tf.function(lambda d: layer(d)) if graph else layer
    batch = {"a": np.array([1, 2, 3]), "tags": np.array([[4], [-1], [0]])}
    out = np.asarray(call({k: tf.constant(v) for k, v in batch.items()}))
    table = layer.embedding_tables["tags"].numpy()
    np.testing.assert_allclose(out[:, 3:], np.stack([table[4], np.zeros(3), table[0]]), atol=1e-7)
    # (B,) reads as (B, 1); L = 0 gives zero vectors.
    np.testing.assert_allclose(np.asarray(call({"a": tf.constant([1, 2, 3]), "tags": tf.constant([4, -1, 0])})), out)
    empty = np.asarray(call({"a": tf.constant([1, 2, 3]), "tags": tf.zeros((3, 0), tf.int64)}))
    np.testing.assert_array_equal(empty[:, 3:], 0.0)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="tags"):
        call({"a": tf.constant([1, 2, 3]), "tags": tf.constant([[4], [-2], [6]])})


def test_undeclared_length_one_feature_is_still_univalent():
    layer = FeatureEmbedding({"a": 5}, embedding_dim=2)
    np.testing.assert_allclose(np.asarray(layer({"a": np.array([[3], [1]])})),
                               layer.embedding_tables["a"].numpy()[[3, 1]])
    with pytest.raises(ValueError, match="feature 'a' has id -1 in row 1"):
        layer({"a": np.array([[3], [-1]])})


def test_multivalued_features_argument_validation_and_config():
    layer = FeatureEmbedding({"a": 5, "tags": 6}, numeric_features=["n"], multivalued_features=["tags"])
    config = layer.get_config()
    assert config["multivalued_features"] == ["tags"]
    assert FeatureEmbedding.from_config(config).get_config() == config
    with pytest.raises(ValueError, match=r"multivalued_features.*\['n'\] are not categorical"):
        FeatureEmbedding({"a": 5}, numeric_features=["n"], multivalued_features=["n"])
    with pytest.raises(ValueError, match="multivalued_features.*string"):
        FeatureEmbedding({"tags": 5}, multivalued_features="tags")
    with pytest.raises(ValueError, match="duplicate"):
        FeatureEmbedding({"tags": 5}, multivalued_features=["tags", "tags"])


def test_build_model_declares_the_manifests_multivalent_features():
    from ctrkit.config import Config
    from ctrkit.manifest import Manifest, TransformedFeature, Window
    from ctrkit.model import build_model, embedding_layer

    feats = (TransformedFeature("c0", "categorical", vocab_size=4),
             TransformedFeature("tags", "categorical", vocab_size=5, multivalent=True),
             TransformedFeature("n0", "numeric"))
    manifest = Manifest(features=feats, label="label", windows=(Window("w0", ("x",), 1),), rows_read=1,
                        rows_written=1, rows_rejected=0)
    model = build_model(Config.from_dict({"model": {"embedding_dim": 2, "cross_layers": 1, "dnn_units": [4]}}),
                        manifest)
    assert embedding_layer(model).multivalued_features == ["tags"]
    # Every row has at most one tag and one has none: the (B, 1) batch the online trainer can meet.
    batch = {"c0": np.array([0, 3]), "tags": np.array([[2], [-1]]), "n0": np.array([0.5, -1.0], "float32")}
    assert np.all(np.isfinite(np.asarray(model(batch, training=False)["logits"])))


@pytest.mark.parametrize("jit", [False, True])
def test_multivalued_gradient_lists_only_real_ids(jit):
    layer = FeatureEmbedding({"tags": 6}, embedding_dim=2)  # (B, 3): multi-valued, declared or not
    ids = np.array([[3, -1, -1], [-1, -1, -1], [2, 2, 5], [5, -1, -1]])
    layer({"tags": ids})
    table = layer.embedding_tables["tags"]

    @tf.function(jit_compile=jit)
    def forward_and_grad(t):
        with tf.GradientTape() as tape:
            out = layer({"tags": t})
            loss = tf.reduce_sum(out * tf.constant([[1.0, -2.0]]))
        return out, tape.gradient(loss, table)

    out, grad = forward_and_grad(tf.constant(ids))
    w = table.numpy()
    expected = np.stack([w[3], np.zeros(2), (2 * w[2] + w[5]) / 3, w[5]])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert isinstance(grad, tf.IndexedSlices)
    # Row 0 is reached only as the stand-in for padding: it must not appear in the sparse gradient, or a
    # lazy sparse optimizer would move its moments and weights on this batch.
    assert set(grad.indices.numpy().tolist()) == {2, 3, 5}
    dense = tf.convert_to_tensor(grad).numpy()
    np.testing.assert_allclose(dense[2], 2 / 3 * np.array([1.0, -2.0]), rtol=1e-6)
    np.testing.assert_allclose(dense[5], (1 / 3 + 1) * np.array([1.0, -2.0]), rtol=1e-6)


# -- DCN ------------------------------------------------------------------------------------------

def np_dnn(z, dense_layers):
    for layer in dense_layers:
        kernel, bias = layer.get_weights()
        z = np.maximum(z @ kernel + bias, 0)
    return z


@pytest.mark.parametrize("structure", ["stacked", "parallel", "cross_only"])
def test_dcn_structures_match_numpy(structure):
    rng = np.random.default_rng(5)
    x0 = rng.normal(size=(4, 9)).astype("float32")
    units = () if structure == "cross_only" else (7, 5)
    dcn = DCN(structure=structure, num_cross_layers=2, cross_kind="low_rank", projection_dim=3, dnn_units=units)
    out = np.asarray(dcn(x0))
    x = x0
    for layer in dcn.cross_network.cross_layers:
        down, up, bias = layer.get_weights()
        x = x0 * (x @ down @ up + bias) + x
    if structure == "stacked":
        expected = np_dnn(x, dcn.dense_layers)
    elif structure == "parallel":
        expected = np.concatenate([x, np_dnn(x0, dcn.dense_layers)], axis=1)
    else:
        expected = x
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert out.shape == dcn.compute_output_shape(x0.shape)


def test_dcn_and_piecewise_argument_errors_name_their_own_arguments():
    for kwargs, message in ((dict(cross_kind="lowrank"), "DCN: `cross_kind` must be one of"),
                            (dict(num_cross_layers=0), "DCN: `num_cross_layers` must be a positive integer"),
                            (dict(projection_dim=64), "DCN: `projection_dim` applies to cross_kind='low_rank' only")):
        with pytest.raises(ValueError, match=re.escape(message)):
            DCN(**kwargs)
    for kwargs in (dict(input_min="-6"), dict(input_max=float("inf")), dict(input_min=2.0, input_max=1.0)):
        with pytest.raises(ValueError, match="`input_min` and `input_max` must be finite numbers"):
            PiecewiseLinearCalibration(**kwargs)


@pytest.mark.parametrize("make", [lambda: Cross(), lambda: CrossMixture(num_experts=2, low_rank=2),
                                  lambda: CrossNetwork(num_layers=2), lambda: DCN(dnn_units=(3,))])
def test_cross_layers_refuse_a_new_width_once_built_and_pass_masks_through(make):
    layer = make()
    layer(np.ones((2, 4), "float32"))
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 4"):
        layer(keras.Input((5,)))  # used to build a graph that failed only at predict, in a MatMul
    masked = keras.layers.Masking()(keras.Input((4,)))  # a per-row mask, e.g. rows that are all padding
    assert make()(masked)._keras_mask is not None  # survives the layer (was dropped with a warning)


def test_dcn_dropout_only_in_training_and_validation():
    x0 = np.ones((64, 6), "float32")
    dcn = DCN(structure="stacked", num_cross_layers=1, dnn_units=(32,), dropout=0.5)
    np.testing.assert_allclose(np.asarray(dcn(x0, training=False)), np.asarray(dcn(x0, training=False)))
    assert not np.allclose(np.asarray(dcn(x0, training=True)), np.asarray(dcn(x0, training=False)))
    with pytest.raises(ValueError, match="structure"):
        DCN(structure="diamond")
    with pytest.raises(ValueError, match="dropout"):
        DCN(dropout=1.0)
    with pytest.raises(ValueError, match="cross_only"):
        DCN(structure="cross_only", dnn_units=(3,))


@pytest.mark.parametrize("structure", ["stacked", "parallel"])
def test_dcn_dropout_keeps_the_dcn_dtype(structure):
    """Dropout left to the global policy put a float64 DNN through float32 (2.9e-8 off at inference)."""
    x0 = np.random.default_rng(3).normal(size=(16, 6))
    with_dropout = DCN(structure=structure, num_cross_layers=1, dnn_units=(8,), dropout=0.3, dtype="float64")
    without = DCN(structure=structure, num_cross_layers=1, dnn_units=(8,), dtype="float64")
    with_dropout(x0)
    without(x0)
    without.set_weights(with_dropout.get_weights())
    out = with_dropout(x0, training=False)
    assert out.dtype == "float64" and all(d.dtype_policy.name == "float64" for d in with_dropout.dropout_layers)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(without(x0, training=False)))


def test_dcn_default_dnn_units_depend_on_structure():
    x0 = np.random.default_rng(12).normal(size=(3, 6)).astype("float32")
    cross_only = DCN(structure="cross_only", num_cross_layers=1)  # its own default used to be refused
    assert cross_only.dnn_units == [] and cross_only.dense_layers == []
    np.testing.assert_allclose(np.asarray(cross_only(x0)), np.asarray(cross_only.cross_network(x0)))
    assert DCN.from_config(cross_only.get_config()).get_config() == cross_only.get_config()
    assert DCN().dnn_units == [500, 500, 500] and DCN(structure="parallel").dnn_units == [500, 500, 500]
    assert DCN(structure="stacked", dnn_units=()).dnn_units == []
    with pytest.raises(ValueError, match="cross_only"):
        DCN(structure="cross_only", dnn_units=(3,))


def test_unit_lists_given_as_a_number_get_a_clear_error():
    with pytest.raises(ValueError, match=r"DCN: `dnn_units` must be a sequence of positive integers.*got 64"):
        DCN(dnn_units=64)
    with pytest.raises(ValueError, match=r"DistillationHead: `hidden_units` must be a sequence.*got 4"):
        DistillationHead(hidden_units=4)
    with pytest.raises(ValueError, match=r"dnn_units\[1\]"):
        DCN(dnn_units=(8, 0))
    with pytest.raises(ValueError, match="dnn_units"):
        DCN(dnn_units="64")


def test_smelu_function_in_a_plain_keras_layer_round_trips(tmp_path):
    # Plain Keras layers resolve strings from Keras' own table only (documented in layers/activations.py);
    # the function itself is the supported form and saves as "ctrkit>smelu".
    with pytest.raises(ValueError, match="activation"):
        keras.layers.Dense(3, activation="smelu")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation=smelu)(inputs))
    x = np.random.default_rng(13).normal(size=(5, 4)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.layers[-1].activation is smelu
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-6)


# -- distillation ---------------------------------------------------------------------------------

def np_bce(p, z):
    q = np_sigmoid(z)
    return -(p * np.log(q) + (1 - p) * np.log(1 - q))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("confidence", [False, True])
def test_distillation_loss_matches_numpy(temperature, confidence):
    rng = np.random.default_rng(6)
    t = rng.normal(scale=3, size=(8, 1)).astype("float32")
    s = rng.normal(scale=3, size=(8, 1)).astype("float32")
    p = np_sigmoid(t / temperature)
    weight = np.abs(2 * np_sigmoid(t) - 1) if confidence else 1.0
    bce = temperature**2 * weight * np_bce(p, s / temperature)
    kl = temperature**2 * weight * (np_bce(p, s / temperature) - np_bce(p, t / temperature))
    np.testing.assert_allclose(np.asarray(distillation_loss(t, s, temperature, confidence)), bce, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(distillation_loss(t, s, temperature, confidence, "kl")), kl, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(distillation_loss(t, t, temperature, confidence, "kl")), 0.0, atol=1e-5)
    loss = DistillationLoss(temperature=temperature, confidence_weighting=confidence)
    np.testing.assert_allclose(float(loss(t, s)), bce.mean(), rtol=1e-4)
    assert DistillationLoss.from_config(loss.get_config()).temperature == temperature


def test_distillation_head_matches_numpy():
    rng = np.random.default_rng(11)
    h = rng.normal(size=(5, 6)).astype("float32")
    head = DistillationHead(hidden_units=(4,), activation="smelu")
    out = np.asarray(head(h))
    k1, b1, k2, b2 = head.get_weights()
    assert out.shape == (5, 1)
    np.testing.assert_allclose(out, np_smelu(h @ k1 + b1) @ k2 + b2, rtol=1e-5, atol=1e-5)
    assert DistillationHead.from_config(head.get_config()).get_config() == head.get_config()


def test_distillation_head_learns_teacher_logits():
    rng = np.random.default_rng(7)
    h = rng.normal(size=(256, 5)).astype("float32")
    teacher = (h @ np.array([1.0, -2.0, 0.5, 0.0, 1.5], "float32"))[:, None]
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    model = keras.Model(inputs, DistillationHead()(inputs))
    model.compile(keras.optimizers.Adam(0.05), loss=DistillationLoss(temperature=2.0, form="kl"))
    before = float(model.evaluate(h, teacher, verbose=0))
    model.fit(h, teacher, epochs=30, batch_size=64, verbose=0)
    after = float(model.evaluate(h, teacher, verbose=0))
    assert after < 0.1 * before
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(t := np.zeros(2), t, temperature=0)


def test_distillation_loss_aligns_a_teacher_column_with_the_student_in_a_graph_of_unknown_batch():
    """A (batch,) teacher column against the head's (batch, 1) logits: per example, not (batch, batch), also
    where the batch size is unknown (``model.fit`` on a ``tf.data`` dataset), and the head learns the teacher."""
    import tensorflow as tf

    rng = np.random.default_rng(8)
    t = rng.normal(scale=2, size=(16,)).astype("float32")
    s = rng.normal(scale=2, size=(16, 1)).astype("float32")
    want = 4.0 * np_bce(np_sigmoid(t[:, None] / 2), s / 2)
    graph_loss = tf.function(lambda a, b: distillation_loss(a, b, temperature=2.0),
                             input_signature=[tf.TensorSpec([None]), tf.TensorSpec([None, 1])])
    for got in (distillation_loss(t, s, temperature=2.0), graph_loss(t, s), distillation_loss(s, t[:, None], 2.0)):
        assert tuple(got.shape) == (16, 1)
    np.testing.assert_allclose(np.asarray(graph_loss(t, s)), want, rtol=1e-4, atol=1e-5)
    ragged = tf.function(lambda a, b: distillation_loss(a, b), input_signature=[tf.TensorSpec([None]), tf.TensorSpec([None, 2])])
    with pytest.raises(ValueError, match="differ in shape"):
        ragged.get_concrete_function()

    h = rng.normal(size=(512, 5)).astype("float32")
    teacher = h @ np.array([1.0, -2.0, 0.5, 0.0, 1.5], "float32")  # one logit per row: (512,)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    model = keras.Model(inputs, DistillationHead()(inputs))
    model.compile(keras.optimizers.Adam(0.05), loss=DistillationLoss(temperature=2.0))
    model.fit(tf.data.Dataset.from_tensor_slices((h, teacher)).batch(64), epochs=20, shuffle=False, verbose=0)
    learned = np.asarray(model(h)).reshape(-1)
    # With the (batch, batch) broadcast the head learned the batch mean: correlation 0.27 (measured).
    assert np.corrcoef(learned, teacher)[0, 1] > 0.99


# -- calibration ----------------------------------------------------------------------------------

def test_temperature_scaling_formula_and_freezing():
    layer = TemperatureScaling()
    z = np.array([[-2.0], [0.5], [3.0]], "float32")
    np.testing.assert_allclose(np.asarray(layer(z)), z)  # identity at init
    layer.set_weights([np.array(0.5, "float32"), np.array(-0.25, "float32")])
    np.testing.assert_allclose(np.asarray(layer(z[:, 0])), 0.5 * z - 0.25)
    assert layer.temperature == 2.0
    layer.trainable = False
    assert layer.trainable_weights == [] and len(layer.non_trainable_weights) == 2
    layer.trainable = True
    assert len(layer.trainable_weights) == 2


def test_piecewise_linear_calibration_formula_monotone_in_unit_interval():
    layer = PiecewiseLinearCalibration(num_keypoints=5, input_min=-4, input_max=4)
    z = np.linspace(-8, 8, 401).astype("float32")
    init = np.asarray(layer(z))[:, 0]
    kp = np.linspace(-4, 4, 5)
    np.testing.assert_allclose(np.asarray(layer(kp.astype("float32")))[:, 0], np_sigmoid(kp), atol=1e-5)
    rng = np.random.default_rng(8)
    layer.set_weights([rng.normal(scale=2, size=(6,)).astype("float32")])
    w = layer.get_weights()[0]
    levels = np.cumsum(np.exp(w) / np.exp(w).sum())[:-1]
    expected = np.interp(z, kp, levels)  # linear between keypoints, flat outside
    out = np.asarray(layer(z))[:, 0]
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert np.all(np.diff(out) >= -1e-7) and np.all(np.diff(init) >= -1e-7)
    assert out.min() > 0 and out.max() < 1
    logit_layer = PiecewiseLinearCalibration(keypoints=list(kp), output_logit=True)
    logit_layer(z)
    logit_layer.set_weights(layer.get_weights())
    np.testing.assert_allclose(np.asarray(logit_layer(z))[:, 0], np.log(expected / (1 - expected)), atol=1e-3)
    # levels within float32 rounding of 0 and 1 still give finite logits
    logit_layer.set_weights([np.array([-40, 0, 0, 0, 0, -40], "float32")])
    assert np.all(np.isfinite(np.asarray(logit_layer(z))))
    with pytest.raises(ValueError, match="increasing"):
        PiecewiseLinearCalibration(keypoints=[0.0, 0.0, 1.0])


def test_bias_calibration_formula_range_check_and_freezing():
    layer = BiasCalibration(num_segments=3)
    z = np.array([0.0, 1.0, -1.0, 2.0], "float32")
    seg = np.array([2, 0, 2, 1])
    layer(z, seg)
    layer.set_weights([np.array([0.1, -0.2, 0.3], "float32")])
    np.testing.assert_allclose(np.asarray(layer(z, seg))[:, 0], z + np.array([0.3, 0.1, 0.3, -0.2]), atol=1e-6)
    with pytest.raises(ValueError, match="segment id 3 in row 1"):
        layer(z[:2], np.array([0, 3]))
    with pytest.raises(ValueError, match="4 logits but 3 segment ids"):  # was a backend broadcasting error
        layer(z, seg[:3])
    layer.trainable = False
    assert layer.trainable_weights == []


def test_calibration_trains_while_base_model_is_frozen():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(512, 4)).astype("float32")
    base_in = keras.Input((4,))
    base = keras.Model(base_in, keras.layers.Dense(1)(base_in))
    true_logit = 0.5 * np.asarray(base(x)) + 0.8  # the base model is over-confident and biased
    y = (rng.uniform(size=true_logit.shape) < np_sigmoid(true_logit)).astype("float32")
    base.trainable = False
    calibrated = keras.Model(base_in, TemperatureScaling()(base(base_in)))
    base_before = [w.copy() for w in base.get_weights()]
    calibrated.compile(keras.optimizers.Adam(0.05), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    calibrated.fit(x, y, epochs=40, batch_size=128, verbose=0)
    for before, after in zip(base_before, base.get_weights()):
        np.testing.assert_array_equal(before, after)
    scale, bias = calibrated.layers[-1].get_weights()
    assert 0.2 < float(scale) < 0.8 and 0.4 < float(bias) < 1.2  # recovers a ≈ 0.5, b ≈ 0.8
