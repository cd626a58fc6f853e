"""Calibration layers under mixed precision, at extreme weights, and frozen one at a time."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from ctrkit.layers import BiasCalibration, PiecewiseLinearCalibration, TemperatureScaling

# Weights whose outer softmax entries are ~1e-9: the top level is 1 − 1e-9, which rounds to 1.0 in float32
# (and 1e-4-scale gaps already round to 1.0 in float16).
EXTREME = np.array([-20.0, 0.0, 0.0, -20.0], "float32")
KEYPOINTS = [-1.0, 0.0, 1.0]


def np_pwl_logit(z, w, kp):
    """log f − log(1 − f) of the piecewise-linear calibrator, in float64."""
    p = np.exp(w - w.max()) / np.exp(w - w.max()).sum()
    frac = np.clip((z[:, None] - kp[:-1]) / np.diff(kp), 0, 1)
    below = p[0] + (frac * p[1:-1]).sum(1)
    above = p[-1] + ((1 - frac) * p[1:-1]).sum(1)
    return np.log(below) - np.log(above)


@pytest.fixture(params=["mixed_float16", "mixed_bfloat16"])
def mixed_policy(request):
    keras.config.set_dtype_policy(request.param)
    try:
        yield request.param
    finally:
        keras.config.set_dtype_policy("float32")


def test_calibration_layers_compute_in_float32_under_mixed_precision(mixed_policy):
    z16 = keras.ops.cast(np.array([[-3.0], [0.25], [2.0]], "float32"), mixed_policy.split("_")[1])
    temp = TemperatureScaling()
    pwl = PiecewiseLinearCalibration(keypoints=KEYPOINTS, output_logit=True)
    bias = BiasCalibration(3)
    for layer, out in ((temp, temp(z16)), (pwl, pwl(z16)), (bias, bias(z16, np.array([0, 1, 2])))):
        assert layer.compute_dtype == "float32" and out.dtype == "float32", type(layer).__name__
        assert all(w.dtype == "float32" for w in layer.weights)
    # An explicit dtype still wins, and the policy survives a config round trip.
    assert TemperatureScaling(dtype="float16").compute_dtype == "float16"
    assert PiecewiseLinearCalibration.from_config(pwl.get_config()).compute_dtype == "float32"


def test_piecewise_logit_stays_finite_and_accurate_under_mixed_precision(mixed_policy):
    # A whole model under the policy: the base model's 16-bit logit feeds the calibrator.
    inputs = keras.Input((1,))
    base_logit = keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros")(inputs)
    assert base_logit.dtype != "float32"
    pwl = PiecewiseLinearCalibration(keypoints=KEYPOINTS, output_logit=True)
    model = keras.Model(inputs, pwl(base_logit))
    pwl.set_weights([EXTREME])
    z = np.array([[-5.0], [-0.5], [0.0], [0.5], [5.0]], "float32")
    out = np.asarray(model(z))[:, 0]
    assert out.dtype == np.float32 and np.all(np.isfinite(out))  # the old float16 path gave ±inf
    np.testing.assert_allclose(out, np_pwl_logit(z[:, 0].astype("float64"), EXTREME.astype("float64"),
                                                 np.array(KEYPOINTS)), rtol=1e-4)
    assert out[-1] > 15.0  # ~ log(1e9 / 2): not clipped to the 16.1 of a 1e-7 probability clip


def test_piecewise_probability_strictly_inside_unit_interval_in_float32():
    z = np.linspace(-6, 6, 25).astype("float32")
    for weights in (EXTREME, np.array([-200.0, 0.0, 0.0, -200.0], "float32")):  # the 2nd underflows to 0
        layer = PiecewiseLinearCalibration(keypoints=KEYPOINTS)
        layer(z)
        layer.set_weights([weights])
        out = np.asarray(layer(z))[:, 0]
        assert out.dtype == np.float32
        assert out.min() > 0.0 and out.max() < 1.0, (weights, out.min(), out.max())
        assert np.all(np.diff(out) >= 0)
        logit_layer = PiecewiseLinearCalibration(keypoints=KEYPOINTS, output_logit=True)
        logit_layer(z)
        logit_layer.set_weights([weights])
        logits = np.asarray(logit_layer(z))[:, 0]
        assert np.all(np.isfinite(logits)) and np.all(np.diff(logits) >= 0)


def test_freezing_one_calibration_layer_keeps_it_while_the_other_trains():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 1)).astype("float32")
    y = (x > 0.3).astype("float32")
    inputs = keras.Input((1,))
    temp = TemperatureScaling()
    pwl = PiecewiseLinearCalibration(num_keypoints=5, output_logit=True)
    model = keras.Model(inputs, pwl(temp(inputs)))
    for frozen, trained in ((temp, pwl), (pwl, temp)):
        frozen.trainable, trained.trainable = False, True
        model.compile(keras.optimizers.Adam(0.1), loss=keras.losses.BinaryCrossentropy(from_logits=True))
        frozen_before = [w.copy() for w in frozen.get_weights()]
        trained_before = [w.copy() for w in trained.get_weights()]
        model.fit(x, y, epochs=3, batch_size=64, verbose=0)
        for before, after in zip(frozen_before, frozen.get_weights()):
            np.testing.assert_array_equal(before, after)
        assert any(not np.array_equal(b, a) for b, a in zip(trained_before, trained.get_weights()))


def np_pwl_logit_interpolation(z, w, kp):
    """g(z) of interpolation="logit", in float64: the levels' logits interpolated, end segments extended."""
    p = np.exp(w - w.max()) / np.exp(w - w.max()).sum()
    y = np.cumsum(p)[:-1]
    levels = np.log(y) - np.log1p(-y)
    rises, widths = np.diff(levels), np.diff(kp)
    frac = np.clip((z[:, None] - kp[:-1]) / widths, 0, 1)
    return (levels[0] + (frac * rises).sum(1) + rises[0] / widths[0] * np.minimum(z - kp[0], 0)
            + rises[-1] / widths[-1] * np.maximum(z - kp[-1], 0))


def test_piecewise_logit_interpolation_starts_as_the_identity_and_follows_its_formula():
    """ctrkit's models serve through an unfitted calibrator until `ctrkit calibrate`: with probability
    interpolation, 8 keypoints bent a logit of -1.5 to -1.31 and 2.0 to 1.76."""
    z = np.linspace(-15, 15, 61).astype("float32")
    layer = PiecewiseLinearCalibration(num_keypoints=8, output_logit=True, interpolation="logit")
    np.testing.assert_allclose(np.asarray(layer(z))[:, 0], z, atol=2e-5)
    prob = PiecewiseLinearCalibration(num_keypoints=8, interpolation="logit")
    np.testing.assert_allclose(np.asarray(prob(z))[:, 0], 1 / (1 + np.exp(-z.astype("float64"))), atol=1e-6)
    rng = np.random.default_rng(3)
    for weights in (rng.normal(size=9).astype("float32"), np.array([-20.0] + [0.0] * 7 + [-20.0], "float32")):
        layer.set_weights([weights])
        out = np.asarray(layer(z))[:, 0]
        assert np.all(np.isfinite(out)) and np.all(np.diff(out) > 0)  # increasing, beyond the keypoints too
        np.testing.assert_allclose(out, np_pwl_logit_interpolation(z.astype("float64"), weights.astype("float64"),
                                                                   np.array(layer.keypoints)), rtol=1e-4, atol=1e-4)


def test_piecewise_interpolation_round_trips_and_older_configs_keep_probability_interpolation():
    layer = PiecewiseLinearCalibration(num_keypoints=4, output_logit=True, interpolation="logit")
    assert PiecewiseLinearCalibration.from_config(layer.get_config()).interpolation == "logit"
    older = {k: v for k, v in layer.get_config().items() if k != "interpolation"}  # saved before the option
    assert PiecewiseLinearCalibration.from_config(older).interpolation == "probability"
    with pytest.raises(ValueError, match="`interpolation` must be 'probability' or 'logit'"):
        PiecewiseLinearCalibration(interpolation="spline")


def test_piecewise_logit_interpolation_has_finite_gradients_at_extreme_weights_and_far_keypoints():
    """log y_j from a softmax entry that underflows had an infinite gradient ([nan, -inf, ...] at these
    weights); and the initial steps were floored at 1e-12, so keypoints beyond ±27 broke the identity."""
    import tensorflow as tf

    layer = PiecewiseLinearCalibration(num_keypoints=10, output_logit=True, interpolation="logit")
    z = tf.constant([[-30.0], [0.0], [30.0]])
    layer(z)
    layer.set_weights([np.array([-84.0] + [0.0] * 10, "float32")])
    with tf.GradientTape() as tape:
        out = tf.reduce_sum(layer(z))
    assert np.all(np.isfinite(tape.gradient(out, layer.trainable_variables)[0].numpy()))
    far = np.array([[-50.0], [-1.0], [1.0], [50.0]], "float32")
    wide = PiecewiseLinearCalibration(keypoints=[-40.0, 0.0, 40.0], output_logit=True, interpolation="logit")
    np.testing.assert_allclose(np.asarray(wide(far)), far, rtol=1e-5, atol=1e-4)
    levels = PiecewiseLinearCalibration(keypoints=[-30.0, -10.0, 0.0, 10.0, 30.0])
    levels(far)
    np.testing.assert_allclose(np.asarray(levels.levels()), 1 / (1 + np.exp(-np.array([-30.0, -10, 0, 10, 30]))),
                               rtol=1e-4, atol=1e-12)
