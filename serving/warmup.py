"""Raw rows → ``tf.Example`` → TF Serving warmup requests (``assets.extra/tf_serving_warmup_requests``).

TF Serving replays the ``PredictionLog`` records in this file when it loads a version, before it routes
traffic to it, so the first real requests do not pay for graph initialisation and table loading.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from ctrkit.serving.signatures import (
    CLASSIFY,
    CLASSIFY_INPUTS_KEY,
    EXAMPLES_KEY,
    PREDICT_RAW,
    REGRESS,
    SERVING_DEFAULT,
)

WARMUP_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000  # TF Serving reads at most this many records


def _feature(name: str, value: Any, dtype: tf.DType) -> tf.train.Feature:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        if dtype == tf.string:
            return tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[v if isinstance(v, bytes) else str(v).encode() for v in values])
            )
        if dtype.is_floating:
            return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
        if dtype.is_integer:
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"feature {name!r}: value {value!r} is not a valid {dtype.name}: {e}") from e
    raise ValueError(f"feature {name!r}: unsupported dtype {dtype.name}")


def row_to_example(row: Mapping[str, Any], spec: Mapping[str, Any]) -> tf.train.Example:
    """One raw row (column → value, ``None`` or absent = missing) as a ``tf.Example`` of the columns in
    ``spec``; columns of the row that ``spec`` does not list (the label, ...) are left out."""
    features = {}
    for name, feat in spec.items():
        value = row.get(name)
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue  # missing: the serving graph fills it
        features[name] = _feature(name, value, feat.dtype)
    return tf.train.Example(features=tf.train.Features(feature=features))


def serialize_rows(rows: Sequence[Mapping[str, Any] | bytes], spec: Mapping[str, Any]) -> list[bytes]:
    """Raw rows (dicts) or already serialized ``tf.Example`` strings → serialized strings."""
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, bytes):
            out.append(row)
        elif isinstance(row, Mapping):
            try:
                out.append(row_to_example(row, spec).SerializeToString())
            except (ValueError, TypeError) as e:
                raise ValueError(f"warmup_examples[{i}]: {e}") from e
        else:
            raise TypeError(f"warmup_examples[{i}]: expected a dict of raw features or serialized tf.Example bytes, "
                            f"got {type(row).__name__}")
    return out


def _predict_raw_inputs(serialized: Sequence[bytes], spec: Mapping[str, Any]) -> dict[str, Any]:
    """Serialized raw Examples → the dense (B, ...) tensors ``predict_raw`` takes, with its missing markers
    (NaN / ``b""``; integer columns have none, so 0) where a VarLen column has no value."""
    import numpy as np

    parsed = tf.io.parse_example(tf.constant(list(serialized)), dict(spec))
    inputs = {}
    for name, feat in spec.items():
        t = parsed[name]
        if isinstance(t, tf.SparseTensor):
            missing = b"" if feat.dtype == tf.string else (float("nan") if feat.dtype.is_floating else 0)
            np_dtype = object if feat.dtype == tf.string else feat.dtype.as_numpy_dtype
            dense = np.full(len(serialized), missing, dtype=np_dtype)
            for (row, col), value in zip(t.indices.numpy(), t.values.numpy()):
                if col == 0:  # one value per row in ctrkit's raw columns (pipelines/transform.py)
                    dense[row] = value
            t = dense
        else:
            t = t.numpy()
        inputs[name] = tf.make_tensor_proto(t, dtype=feat.dtype)
    return inputs


def warmup_records(serialized: Sequence[bytes], model_name: str, batch_sizes: Sequence[int] = (1, 8, 64),
                   spec: Mapping[str, Any] | None = None) -> list[bytes]:
    """Serialized ``PredictionLog`` records: for each batch size, one request per served signature built
    from consecutive examples (cycling when there are fewer examples than the batch size).

    TF Serving runs every signature as its own subgraph, so each needs its own warmup: ``serving_default``
    (PredictLog), ``classify`` (ClassifyLog), ``regress`` (RegressLog), and ``predict_raw`` (PredictLog with
    one tensor per raw column) when ``spec``, the raw ``tf.Example`` parse spec, is given.
    """
    from tensorflow_serving.apis import (
        classification_pb2,
        input_pb2,
        model_pb2,
        predict_pb2,
        prediction_log_pb2,
        regression_pb2,
    )

    if not serialized:
        raise ValueError("no examples to build warmup requests from")

    def spec_for(signature: str) -> Any:
        return model_pb2.ModelSpec(name=model_name, signature_name=signature)

    logs = []
    for offset, batch in enumerate(batch_sizes):
        rows = [serialized[(offset + i) % len(serialized)] for i in range(batch)]
        request = predict_pb2.PredictRequest(model_spec=spec_for(SERVING_DEFAULT))
        request.inputs[EXAMPLES_KEY].CopyFrom(tf.make_tensor_proto(rows, dtype=tf.string, shape=[len(rows)]))
        logs.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))

        examples = input_pb2.Input(
            example_list=input_pb2.ExampleList(examples=[tf.train.Example.FromString(r) for r in rows])
        )
        logs.append(prediction_log_pb2.PredictionLog(classify_log=prediction_log_pb2.ClassifyLog(
            request=classification_pb2.ClassificationRequest(model_spec=spec_for(CLASSIFY), input=examples))))
        logs.append(prediction_log_pb2.PredictionLog(regress_log=prediction_log_pb2.RegressLog(
            request=regression_pb2.RegressionRequest(model_spec=spec_for(REGRESS), input=examples))))

        if spec is not None:
            raw = predict_pb2.PredictRequest(model_spec=spec_for(PREDICT_RAW))
            for name, proto in _predict_raw_inputs(rows, spec).items():
                raw.inputs[name].CopyFrom(proto)
            logs.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=raw)))
    return [log.SerializeToString() for log in logs][:MAX_WARMUP_RECORDS]


def request_inputs(record: Any) -> tuple[str, dict[str, Any]]:
    """A ``PredictionLog`` → (signature name, keyword arguments for that signature of the SavedModel),
    the way TF Serving feeds it: Predict inputs as tensors, Classify/Regress Examples as serialized
    strings under ``inputs`` (context features merged into every example)."""
    import numpy as np

    kind = record.WhichOneof("log_type")
    if kind == "predict_log":
        req = record.predict_log.request
        return req.model_spec.signature_name or SERVING_DEFAULT, {
            k: tf.make_ndarray(v) for k, v in req.inputs.items()
        }
    if kind in ("classify_log", "regress_log"):
        req = getattr(record, kind).request
        which = req.input.WhichOneof("kind")
        if which == "example_list":
            examples = list(req.input.example_list.examples)
        elif which == "example_list_with_context":
            ctx = req.input.example_list_with_context.context
            examples = []
            for ex in req.input.example_list_with_context.examples:
                merged = tf.train.Example()
                merged.CopyFrom(ex)
                for k, v in ctx.features.feature.items():
                    merged.features.feature[k].CopyFrom(v)
                examples.append(merged)
        else:
            raise ValueError(f"{kind} request has no examples")
        default = CLASSIFY if kind == "classify_log" else REGRESS
        serialized = np.array([e.SerializeToString() for e in examples], dtype=object)
        return req.model_spec.signature_name or default, {CLASSIFY_INPUTS_KEY: serialized}
    raise ValueError(f"unsupported warmup record type {kind!r} (TF Serving warms predict, classify, regress)")


def write_warmup(export_dir: str, serialized: Sequence[bytes], model_name: str,
                 spec: Mapping[str, Any] | None = None) -> str:
    """Write the warmup file into a SavedModel directory; returns its path. ``spec``: the raw parse
    spec, to warm ``predict_raw`` as well."""
    os.makedirs(os.path.join(export_dir, WARMUP_DIR), exist_ok=True)
    path = os.path.join(export_dir, WARMUP_DIR, WARMUP_FILE)
    with tf.io.TFRecordWriter(path) as w:
        for record in warmup_records(serialized, model_name, spec=spec):
            w.write(record)
    return path


def read_warmup(export_dir: str) -> list[Any]:
    """The ``PredictionLog`` protos of a SavedModel's warmup file."""
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(export_dir, WARMUP_DIR, WARMUP_FILE)
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
