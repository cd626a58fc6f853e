"""Small, real artefacts for the serving tests: a TFT pipeline output and a contract-abiding Keras 3 model.

Not used at serving time. The pipeline here is deliberately tiny (a handful of columns, a few hundred
generated rows) but real: it runs ``tft_beam.AnalyzeAndTransformDataset`` and writes ``transform_fn/``,
``transformed_metadata/``, ``raw_metadata/``, gzip TFRecord shards and ``manifest.json`` exactly as
:mod:`ctrkit.manifest` documents, so the exporter sees what the production pipeline writes.

The pipeline runs in a child process (``python -m ctrkit.serving.testing OUT``): a process that ran a TFT
pipeline can crash at interpreter exit, which must not take the pytest process down with it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

LABEL = "label"
NUMERIC = ("I1", "I2", "I3")
VOCAB_CATEGORICAL = ("C1", "C2")
HASHED = "C3"
HASH_BUCKETS = 16
MULTIVALENT = "tags"  # "a|b|c" in the raw data, split in preprocessing_fn
RAW_ROWS_FILE = "raw_rows.jsonl"


def generate_raw_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Raw rows as a log would hold them; ``None`` marks a missing value (about 10% of cells)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        row: dict[str, Any] = {LABEL: float(rng.random() < 0.25)}
        for name in NUMERIC:
            row[name] = None if rng.random() < 0.1 else float(rng.integers(-2, 200))
        for name in VOCAB_CATEGORICAL + (HASHED,):
            row[name] = None if rng.random() < 0.1 else f"{name.lower()}_{int(rng.zipf(1.6)) % 40}"
        k = int(rng.integers(0, 4))
        row[MULTIVALENT] = "|".join(f"t{int(rng.integers(0, 12))}" for _ in range(k)) if k else None
        rows.append(row)
    return rows


def raw_feature_spec() -> dict[str, Any]:
    import tensorflow as tf

    spec: dict[str, Any] = {LABEL: tf.io.FixedLenFeature([], tf.float32)}
    for name in NUMERIC:
        spec[name] = tf.io.VarLenFeature(tf.float32)  # nullable: filled in preprocessing_fn
    for name in VOCAB_CATEGORICAL + (HASHED, MULTIVALENT):
        spec[name] = tf.io.VarLenFeature(tf.string)
    return spec


def _fill(sparse: Any, default: Any) -> Any:
    import tensorflow as tf
    import tensorflow_transform as tft

    return tf.squeeze(tft.sparse_tensor_to_dense_with_shape(sparse, [None, 1], default_value=default), axis=1)


def preprocessing_fn(inputs: dict[str, Any]) -> dict[str, Any]:
    import tensorflow as tf
    import tensorflow_transform as tft

    out: dict[str, Any] = {LABEL: inputs[LABEL]}
    for name in NUMERIC:
        out[name] = tft.scale_to_z_score(tf.math.log1p(tf.maximum(_fill(inputs[name], 0.0), 0.0)))
    for name in VOCAB_CATEGORICAL:
        out[name] = tft.compute_and_apply_vocabulary(_fill(inputs[name], ""), num_oov_buckets=1, vocab_filename=name)
    out[HASHED] = tf.strings.to_hash_bucket_fast(_fill(inputs[HASHED], ""), HASH_BUCKETS)
    tags = tf.strings.split(_fill(inputs[MULTIVALENT], ""), sep="|")
    tags = tf.ragged.boolean_mask(tags, tf.strings.length(tags) > 0)
    out[MULTIVALENT] = tft.compute_and_apply_vocabulary(
        tags.to_sparse(), num_oov_buckets=1, vocab_filename=MULTIVALENT
    )
    return out


def _beam_instance(row: dict[str, Any]) -> dict[str, Any]:
    inst: dict[str, Any] = {LABEL: row[LABEL]}
    for name in NUMERIC:
        inst[name] = [] if row[name] is None else [row[name]]
    for name in VOCAB_CATEGORICAL + (HASHED, MULTIVALENT):
        inst[name] = [] if row[name] is None else [row[name].encode()]
    return inst


def _run_pipeline(out_dir: str, n_rows: int, seed: int) -> None:
    """Run the real TFT pipeline in this process (call through :func:`build_pipeline_output`)."""
    import apache_beam as beam
    import tensorflow_transform as tft
    import tensorflow_transform.beam as tft_beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from tensorflow_transform.tf_metadata import dataset_metadata

    from ctrkit.manifest import Manifest, TransformedFeature, Window

    rows = generate_raw_rows(n_rows, seed)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, RAW_ROWS_FILE), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    raw_metadata = dataset_metadata.DatasetMetadata.from_feature_spec(raw_feature_spec())
    shard_prefix = os.path.join(out_dir, "data", "w0", "part")
    tmp_dir = tempfile.mkdtemp(prefix="ctrkit-tft-")
    with beam.Pipeline(runner=FnApiRunner()) as p:
        with tft_beam.Context(temp_dir=tmp_dir):
            raw = p | "Rows" >> beam.Create([_beam_instance(r) for r in rows])
            (data, meta), transform_fn = (raw, raw_metadata) | tft_beam.AnalyzeAndTransformDataset(preprocessing_fn)
            coder = tft.coders.ExampleProtoCoder(meta.schema)
            _ = (
                data
                | "Encode" >> beam.Map(coder.encode)
                | "Write" >> beam.io.WriteToTFRecord(
                    shard_prefix, file_name_suffix=".tfrecord.gz", num_shards=1, shard_name_template="-SSSSS"
                )
            )
            _ = transform_fn | tft_beam.WriteTransformFn(out_dir)
            _ = raw_metadata | "RawMeta" >> tft_beam.WriteMetadata(os.path.join(out_dir, "raw_metadata"), p)

    shutil.rmtree(tmp_dir, ignore_errors=True)
    tft_out = tft.TFTransformOutput(out_dir)
    features = [TransformedFeature(n, "numeric", source=n) for n in NUMERIC]
    features += [
        TransformedFeature(n, "categorical", vocab_size=tft_out.vocabulary_size_by_name(n) + 1, source=n)
        for n in VOCAB_CATEGORICAL
    ]
    features.append(TransformedFeature(HASHED, "categorical", vocab_size=HASH_BUCKETS, source=HASHED))
    features.append(
        TransformedFeature(
            MULTIVALENT,
            "categorical",
            vocab_size=tft_out.vocabulary_size_by_name(MULTIVALENT) + 1,
            multivalent=True,
            source=MULTIVALENT,
        )
    )
    shard = os.path.relpath(shard_prefix + "-00000.tfrecord.gz", out_dir)
    Manifest(
        features=tuple(features),
        label=LABEL,
        windows=(Window("w0", (shard,), len(rows)),),
        rows_read=len(rows),
        rows_written=len(rows),
        rows_rejected=0,
        raw_schema={"columns": [LABEL, *NUMERIC, *VOCAB_CATEGORICAL, HASHED, MULTIVALENT]},
    ).save(out_dir)


def build_pipeline_output(out_dir: str, n_rows: int = 300, seed: int = 0, timeout: float = 600) -> str:
    """Run the tiny TFT pipeline in a child process; returns ``out_dir`` (which then holds manifest.json)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-m", "ctrkit.serving.testing", out_dir, str(n_rows), str(seed)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if not os.path.exists(os.path.join(out_dir, "manifest.json")):
        raise RuntimeError(
            f"test pipeline failed (exit {proc.returncode}); stderr tail:\n{proc.stderr[-4000:]}"
        )
    return out_dir


def load_raw_rows(out_dir: str) -> list[dict[str, Any]]:
    """The raw rows the pipeline at ``out_dir`` was built from, in order."""
    with open(os.path.join(out_dir, RAW_ROWS_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# -- a contract-abiding Keras 3 model ---------------------------------------------------------------
def _pooled_embedding_layer() -> type:
    import keras

    @keras.saving.register_keras_serializable(package="ctrkit_testing")
    class MeanPooledEmbedding(keras.layers.Layer):
        """Mean of the embeddings of the valid ids in a (B, L) id matrix padded with -1."""

        def __init__(self, input_dim: int, output_dim: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.input_dim, self.output_dim = input_dim, output_dim
            self.embedding = keras.layers.Embedding(input_dim, output_dim)

        def build(self, input_shape: Any) -> None:
            self.embedding.build((None,))

        def call(self, ids: Any) -> Any:
            ops = keras.ops
            valid = ops.cast(ids >= 0, "float32")
            emb = self.embedding(ops.maximum(ids, 0)) * ops.expand_dims(valid, -1)
            count = ops.maximum(ops.sum(valid, axis=1, keepdims=True), 1.0)
            return ops.sum(emb, axis=1) / count

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "input_dim": self.input_dim, "output_dim": self.output_dim}

    return MeanPooledEmbedding


def tiny_model(manifest: Any, embedding_dim: int = 4, seed: int = 0) -> Any:
    """A small functional Keras 3 model that obeys the trainer→exporter contract (docs/CONTRACTS.md)."""
    import keras

    keras.utils.set_random_seed(seed)
    pooled = _pooled_embedding_layer()
    inputs: dict[str, Any] = {}
    parts = []
    for f in sorted(manifest.categorical_features, key=lambda f: f.name):
        if f.multivalent:
            inputs[f.name] = keras.Input(shape=(None,), dtype="int64", name=f.name)
            parts.append(pooled(f.vocab_size, embedding_dim, name=f"emb_{f.name}")(inputs[f.name]))
        else:
            inputs[f.name] = keras.Input(shape=(), dtype="int64", name=f.name)
            parts.append(keras.layers.Embedding(f.vocab_size, embedding_dim, name=f"emb_{f.name}")(inputs[f.name]))
    for f in manifest.numeric_features:
        inputs[f.name] = keras.Input(shape=(), dtype="float32", name=f.name)
        parts.append(keras.layers.Reshape((1,))(inputs[f.name]))
    x = keras.layers.Concatenate()(parts)
    x = keras.layers.Dense(8, activation="relu")(x)
    logits = keras.layers.Dense(1, name="logits", bias_initializer=keras.initializers.Constant(-1.0))(x)
    probs = keras.layers.Activation("sigmoid", name="probabilities")(logits)
    return keras.Model(inputs, {"logits": logits, "probabilities": probs})


if __name__ == "__main__":
    _run_pipeline(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 300, int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown, where a process that ran a TFT pipeline may crash


# -- one pipeline output and one export per test process ----------------------------------------------
_SESSION: dict[str, Any] = {}


def session_dir() -> str:
    """A temporary directory for this process, removed at exit."""
    if "dir" not in _SESSION:
        import atexit

        _SESSION["dir"] = tempfile.mkdtemp(prefix="ctrkit-serving-tests-")
        atexit.register(shutil.rmtree, _SESSION["dir"], True)
    return _SESSION["dir"]


def session_pipeline_output() -> str:
    """The tiny pipeline output, built once per process (about 25 s)."""
    if "pipeline" not in _SESSION:
        _SESSION["pipeline"] = build_pipeline_output(os.path.join(session_dir(), "pipeline"))
    return _SESSION["pipeline"]


def session_model(manifest: Any) -> Any:
    """ctrkit's own DCN-V2 (``ctrkit.model.build_model`` with the ``small`` config) for ``manifest``."""
    if "model" not in _SESSION:
        import keras

        from ctrkit.config import load_config
        from ctrkit.model import build_model

        keras.utils.set_random_seed(0)
        _SESSION["model"] = build_model(load_config("small"), manifest)
    return _SESSION["model"]


def session_export() -> dict[str, Any]:
    """One validated export of :func:`session_model`: keys ``pipeline``, ``manifest``, ``model``,
    ``base``, ``name``, ``path`` (the version directory), ``rows`` (raw rows)."""
    if "export" not in _SESSION:
        from ctrkit.manifest import Manifest
        from ctrkit.serving.export import export_model

        pipeline = session_pipeline_output()
        manifest = Manifest.load(pipeline)
        model = session_model(manifest)
        rows = load_raw_rows(pipeline)
        base = os.path.join(session_dir(), "models")
        path = export_model(model, manifest, base, "ctr", warmup_examples=rows[:32])
        _SESSION["export"] = {
            "pipeline": pipeline,
            "manifest": manifest,
            "model": model,
            "base": base,
            "name": "ctr",
            "path": path,
            "rows": rows,
        }
    return _SESSION["export"]
