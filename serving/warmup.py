"""Raw rows → ``tf.Example`` → TF Serving warmup requests (``assets.extra/tf_serving_warmup_requests``).

TF Serving replays the ``PredictionLog`` records in this file when it loads a version, before it routes
traffic to it, so the first real requests do not pay for graph initialisation and table loading.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from ctrkit.serving.signatures import EXAMPLES_KEY, SERVING_DEFAULT

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
            except ValueError as e:
                raise ValueError(f"row {i}: {e}") from e
        else:
            raise TypeError(f"row {i}: expected a dict of raw features or serialized tf.Example bytes, got {type(row)}")
    return out


def warmup_records(serialized: Sequence[bytes], model_name: str, batch_sizes: Sequence[int] = (1, 8, 64)) -> list[bytes]:
    """Serialized ``PredictionLog`` records: for each batch size, one ``serving_default`` request built
    from consecutive examples (cycling when there are fewer examples than the batch size)."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    if not serialized:
        raise ValueError("no examples to build warmup requests from")
    records = []
    for offset, batch in enumerate(batch_sizes):
        rows = [serialized[(offset + i) % len(serialized)] for i in range(batch)]
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=SERVING_DEFAULT)
        )
        request.inputs[EXAMPLES_KEY].CopyFrom(tf.make_tensor_proto(rows, dtype=tf.string, shape=[len(rows)]))
        log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
        records.append(log.SerializeToString())
    return records[:MAX_WARMUP_RECORDS]


def write_warmup(export_dir: str, serialized: Sequence[bytes], model_name: str) -> str:
    """Write the warmup file into a SavedModel directory; returns its path."""
    os.makedirs(os.path.join(export_dir, WARMUP_DIR), exist_ok=True)
    path = os.path.join(export_dir, WARMUP_DIR, WARMUP_FILE)
    with tf.io.TFRecordWriter(path) as w:
        for record in warmup_records(serialized, model_name):
            w.write(record)
    return path


def read_warmup(export_dir: str) -> list[Any]:
    """The ``PredictionLog`` protos of a SavedModel's warmup file."""
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(export_dir, WARMUP_DIR, WARMUP_FILE)
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
