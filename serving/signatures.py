"""The serving graph: raw features → tensorflow-transform graph → Keras 3 model → served outputs.

:class:`ServingModule` is a ``tf.Module`` that tracks the Keras 3 model's variables and TFT's
``TransformFeaturesLayer`` (a tf_keras object) side by side, so one ``tf.saved_model.save`` writes both
graphs, their variables and the vocabulary assets. It tracks the model's underlying ``tf.Variable``\ s, not
the Keras model itself, as ``keras.export.ExportArchive`` does: with the Keras 3 model as an attribute the
SavedModel still loads with ``tf.saved_model.load``, but TF Serving's C++ loader (and ``saved_model_cli run``)
restores other variables than the ones the signatures read, and every request fails with "Could not find
variable" (tensorflow/tensorflow#72963, tensorflow/serving#2226). Its signatures are what TF Serving needs:

========================  ================================  =====================================  ==========================
signature                 inputs                            outputs                                method name
========================  ================================  =====================================  ==========================
``serving_default``       ``examples``: string (B,)          ``probabilities``, ``logits`` (B, 1)   tensorflow/serving/predict
``predict_raw``           one tensor per raw feature (B,)    ``probabilities``, ``logits`` (B, 1)   tensorflow/serving/predict
``classify``              ``inputs``: string (B,)            ``scores`` (B, 2), ``classes`` (B, 2)  tensorflow/serving/classify
``regress``               ``inputs``: string (B,)            ``outputs`` (B,) = probability         tensorflow/serving/regress
========================  ================================  =====================================  ==========================

String inputs are serialized ``tf.Example`` protos of *raw* features (what the pipeline read), never
transformed ones. Missing features must score, not fail:

* a raw column the pipeline declared ``VarLenFeature`` arrives as an empty sparse row and the
  ``preprocessing_fn`` fills it, exactly as during training;
* a ``FixedLenFeature`` without a default would make ``tf.io.parse_example`` fail on an Example that
  lacks it, so serving parses it with the dtype's zero (0 / 0.0 / ``b""``) as default;
* unseen categories go wherever the transform graph sends them (OOV or hash buckets).

In ``predict_raw`` a value is "missing" when it is NaN (floats) or the empty string (strings); integer
columns have no missing marker. A ``tf.Example`` has a way to say "missing" (leave the feature out), so
there a NaN or ±inf float value is bad input: the request fails with an InvalidArgument error saying so
(TF Serving answers 400), as the training pipeline rejects such rows, instead of the value flowing into
``log1p`` / z-scores and coming back as a NaN score. ±inf in ``predict_raw`` fails the same way. The check
is one batched assertion over all float columns: +5 µs at batch 1, where dropping the values as missing
(``tf.sparse.retain`` per column) cost +50-60 µs of a ~1.1 ms BARS call (three exports of one model,
called interleaved in one process, 5 repeats of 300 calls).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import tensorflow as tf

SERVING_DEFAULT = "serving_default"
PREDICT_RAW = "predict_raw"
CLASSIFY = "classify"
REGRESS = "regress"
EXAMPLES_KEY = "examples"
CLASSIFY_INPUTS_KEY = "inputs"  # the key TF Serving's Classify/Regress APIs feed serialized Examples to
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
METHOD_NAMES = {
    SERVING_DEFAULT: PREDICT_METHOD,
    PREDICT_RAW: PREDICT_METHOD,
    CLASSIFY: CLASSIFY_METHOD,
    REGRESS: REGRESS_METHOD,
}
OUTPUT_KEYS = ("logits", "probabilities")
CLASS_LABELS = (b"0", b"1")


class ExportError(ValueError):
    """The model, the transform output and the manifest do not fit together into a servable."""


def serving_parse_spec(raw_spec: Mapping[str, Any], exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The ``tf.io.parse_example`` spec serving uses: the raw spec without ``exclude`` (the label, ...),
    with every ``FixedLenFeature`` given a default so an Example that lacks it still parses."""
    excluded = set(exclude)
    spec: dict[str, Any] = {}
    for name, feat in raw_spec.items():
        if name in excluded:
            continue
        if isinstance(feat, tf.io.FixedLenFeature) and feat.default_value is None:
            zero = b"" if feat.dtype == tf.string else 0
            shape = list(feat.shape)
            default = zero if not shape else tf.fill(shape, tf.constant(zero, feat.dtype)).numpy().tolist()
            feat = tf.io.FixedLenFeature(feat.shape, feat.dtype, default_value=default)
        elif not isinstance(feat, (tf.io.FixedLenFeature, tf.io.VarLenFeature)):
            raise ExportError(
                f"raw feature {name!r} has spec {type(feat).__name__}; serving supports FixedLenFeature and "
                "VarLenFeature raw columns"
            )
        spec[name] = feat
    if not spec:
        raise ExportError("no raw features left to serve after excluding " + ", ".join(sorted(excluded)))
    return spec


def read_raw_feature_spec(tft_output: Any) -> dict[str, Any]:
    """The raw feature spec of a transform output.

    ``tft.TFTransformOutput.raw_feature_spec()`` reads ``metadata/``, while ctrkit's manifest layout
    (ctrkit/manifest.py) puts the raw schema in ``raw_metadata/``; accept either, fail naming both.
    """
    import os

    from ctrkit.runtime import import_tft

    import_tft()  # first: a plain TFT import turns tf.keras into Keras 2
    from tensorflow_transform.tf_metadata import metadata_io, schema_utils

    # TFTransformOutput has no public accessor for its directory; transform_fn/ sits inside it.
    root = os.path.dirname(os.path.normpath(tft_output.transform_savedmodel_dir))
    for sub in (tft_output.RAW_METADATA_DIR, "raw_metadata"):
        d = os.path.join(root, sub)
        if os.path.isfile(os.path.join(d, "schema.pbtxt")):
            return dict(schema_utils.schema_as_feature_spec(metadata_io.read_metadata(d).schema).feature_spec)
    raise ExportError(
        f"{root} has no raw schema (looked for {tft_output.RAW_METADATA_DIR}/schema.pbtxt and "
        "raw_metadata/schema.pbtxt): the pipeline must write it with tft_beam.WriteMetadata"
    )


def _raw_input_signature(spec: Mapping[str, Any]) -> dict[str, tf.TensorSpec]:
    sig = {}
    for name, feat in spec.items():
        shape = [None] + (list(feat.shape) if isinstance(feat, tf.io.FixedLenFeature) else [])
        sig[name] = tf.TensorSpec(shape, feat.dtype, name=name)
    return sig


def _assert_finite(tensors: list[tf.Tensor], message: str) -> None:
    """Fail the call (InvalidArgument, a 400 on TF Serving) if any value is NaN or ±inf: one batched check.

    Assert is stateful, so the tf.function runs it without a data dependency from the outputs.
    """
    if tensors:
        values = tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)
        tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(values)), [message])


def _dense_to_raw(name: str, value: tf.Tensor, feat: Any) -> Any:
    """A batch-major dense tensor → the tensor type the transform graph expects for raw column ``name``."""
    if isinstance(feat, tf.io.FixedLenFeature):
        return value
    # VarLen: one value per row, dropped where it is missing, so preprocessing_fn fills it as in training.
    if value.dtype == tf.string:
        present = tf.strings.length(value) > 0
    elif value.dtype.is_floating:
        present = tf.logical_not(tf.math.is_nan(value))
    else:
        present = tf.ones_like(value, dtype=tf.bool)
    rows = tf.where(present)[:, 0]
    indices = tf.stack([rows, tf.zeros_like(rows)], axis=1)
    batch = tf.shape(value, out_type=tf.int64)[0]
    return tf.SparseTensor(indices, tf.gather(value, rows), tf.stack([batch, tf.constant(1, tf.int64)]))


class ServingModule(tf.Module):
    """Raw features → TFT transform → Keras model, with TF Serving's four signatures (see module doc).

    Args:
        model: a Keras 3 model mapping a dict of transformed features to a dict with ``"logits"`` and
            ``"probabilities"`` of shape (B, 1) (docs/CONTRACTS.md).
        tft_output: the pipeline's ``tft.TFTransformOutput``.
        manifest: the pipeline's :class:`ctrkit.manifest.Manifest`.
        exclude_raw_features: raw columns clients never send (the label, the teacher logit are always
            excluded when present in the raw spec).
    """

    def __init__(self, model: Any, tft_output: Any, manifest: Any, exclude_raw_features: Iterable[str] = ()):
        super().__init__(name="ctrkit_serving")
        # Called through a closure, which tf.Module does not track; what the SavedModel saves and TF
        # Serving restores are these variables, the very ones the traced graph reads (see module doc).
        self._model = lambda: model
        self.model_variables = [v.value for v in model.variables]
        if not all(isinstance(v, tf.Variable) for v in self.model_variables):  # e.g. inside an autocast scope
            raise ExportError("export the model outside any Keras autocast or stateless scope: its variables "
                              "must read as tf.Variable objects to be saved")
        # A tf_keras object next to a Keras 3 one: assigning it here is what makes tf.saved_model.save
        # write its graph, tables and vocabulary assets.
        self.tft_layer = tft_output.transform_features_layer()
        raw_spec = read_raw_feature_spec(tft_output)
        exclude = set(exclude_raw_features) | {manifest.label}
        if manifest.teacher_logit_feature:
            exclude.add(manifest.teacher_logit_feature)
        self._parse_spec = serving_parse_spec(raw_spec, exclude & set(raw_spec))
        self._features = [(f.name, f.kind, f.multivalent) for f in manifest.features]

        # autograph=False: the graph has no data-dependent Python control flow, and a contract violation
        # should surface as our ExportError, not wrapped in an autograph StagingError.
        self.serve_examples = tf.function(
            self._serve_examples, input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_KEY)], autograph=False
        )
        self.predict_raw = tf.function(
            self._predict_raw, input_signature=[_raw_input_signature(self._parse_spec)], autograph=False
        )
        self.classify = tf.function(
            self._classify, input_signature=[tf.TensorSpec([None], tf.string, name=CLASSIFY_INPUTS_KEY)], autograph=False
        )
        self.regress = tf.function(
            self._regress, input_signature=[tf.TensorSpec([None], tf.string, name=CLASSIFY_INPUTS_KEY)], autograph=False
        )

    @property
    def parse_spec(self) -> dict[str, Any]:
        return dict(self._parse_spec)

    def signatures(self) -> dict[str, Any]:
        """Concrete functions by signature name, for ``tf.saved_model.save(..., signatures=...)``."""
        return {
            SERVING_DEFAULT: self.serve_examples.get_concrete_function(),
            PREDICT_RAW: self.predict_raw.get_concrete_function(),
            CLASSIFY: self.classify.get_concrete_function(),
            REGRESS: self.regress.get_concrete_function(),
        }

    # -- graph pieces --------------------------------------------------------------------------------
    def _model_inputs(self, transformed: Mapping[str, Any]) -> dict[str, tf.Tensor]:
        missing = [name for name, _, _ in self._features if name not in transformed]
        if missing:
            raise ExportError(
                f"the transform graph does not produce model feature(s) {missing} from the served raw columns "
                f"{sorted(self._parse_spec)}: do they depend on an excluded column such as the label?"
            )
        inputs = {}
        for name, kind, multivalent in self._features:
            t = transformed[name]
            dtype = tf.int64 if kind == "categorical" else tf.float32
            if isinstance(t, tf.SparseTensor):
                if not multivalent:
                    raise ExportError(f"transformed feature {name!r} is sparse but the manifest says univalent")
                t = tf.sparse.to_dense(tf.cast(t, dtype) if t.dtype != dtype else t, default_value=-1)
            elif isinstance(t, tf.RaggedTensor):
                t = tf.cast(t, dtype).to_tensor(default_value=-1)
            else:
                t = tf.cast(t, dtype)
                if multivalent:
                    t = tf.reshape(t, [tf.shape(t)[0], -1])
                elif t.shape.rank != 1:
                    # (B, 1) from the transform graph → (B,). A (B,) output is used as is: every op in
                    # this graph runs on each request, ~1 µs apiece at batch 1.
                    t = tf.reshape(t, [-1])
            inputs[name] = t
        return inputs

    def _predict(self, raw: Mapping[str, Any]) -> dict[str, tf.Tensor]:
        transformed = self.tft_layer(dict(raw))
        out = self._model()(self._model_inputs(transformed), training=False)
        for key in OUTPUT_KEYS:
            if key not in out:
                raise ExportError(f"the model's output dict has no {key!r} (it has {sorted(out)})")
        return {k: tf.reshape(tf.cast(out[k], tf.float32), [-1, 1]) for k in OUTPUT_KEYS}

    def _parse(self, serialized: tf.Tensor) -> dict[str, Any]:
        parsed = tf.io.parse_example(serialized, self._parse_spec)
        _assert_finite(
            [t.values if isinstance(t, tf.SparseTensor) else t for t in parsed.values() if t.dtype.is_floating],
            "a float feature of a tf.Example is NaN or ±inf; leave a missing feature out of the example "
            "instead (training rejects such rows, so the model has no meaning for them)",
        )
        return parsed

    def _serve_examples(self, examples: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._predict(self._parse(examples))

    def _predict_raw(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        floats = [features[n] for n, feat in self._parse_spec.items() if feat.dtype.is_floating]
        _assert_finite([tf.where(tf.math.is_nan(v), tf.zeros_like(v), v) for v in floats],
                       "a float column of predict_raw is ±inf; NaN marks a missing value, ±inf has no meaning")
        raw = {name: _dense_to_raw(name, features[name], feat) for name, feat in self._parse_spec.items()}
        return self._predict(raw)

    def _classify(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        p = self._predict(self._parse(inputs))["probabilities"]
        scores = tf.concat([1.0 - p, p], axis=1)
        classes = tf.tile(tf.constant([list(CLASS_LABELS)]), [tf.shape(p)[0], 1])
        return {"scores": scores, "classes": classes}

    def _regress(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"outputs": tf.reshape(self._predict(self._parse(inputs))["probabilities"], [-1])}
