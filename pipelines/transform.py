"""The tensorflow-transform side: raw feature spec, Arrow → TFT input batches, and ``preprocessing_fn``.

Raw features as TFT (and the served model) sees them:
  * label, teacher_logit: ``FixedLenFeature([], float32)``
  * numeric: ``VarLenFeature(float32)`` (0 or 1 value; missing is filled *inside* the graph, because TFT
    rejects ``FixedLenFeature`` defaults and serving requests omit fields too)
  * categorical: ``VarLenFeature(string)``; multi-valued columns carry the joined string and are split
    in the graph.
The timestamp column only decides windows; it is not a model input.

Transformed features (names = manifest ``features[].name``):
  * numeric ``x``: ``x`` float32 = zscore(log1p(max(fill(x), 0)))  (each step as configured);
    with ``buckets: n`` also ``x_bucket`` int64 in [0, n) from ``tft.bucketize`` on the pre-zscore value
  * categorical ``c``: int64 ids; vocabulary ids in [0, |V|) then ``oov_buckets`` hashed OOV ids, or
    ``hash_buckets`` hashed ids; multi-valued columns give a VarLen list of ids (empty tokens dropped)
  * label: float32 0/1
"""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from ctrkit.manifest import TransformedFeature
from ctrkit.schema import ColumnSpec, DataConfig

WINDOW_COLUMN = "__window"
PASSTHROUGH = ("__window", "__file", "__line")
VOCAB_PREFIX = "vocab_"


def vocab_filename(column: str) -> str:
    """Asset file name of a column's vocabulary (also the ``vocab_filename`` given to TFT)."""
    return VOCAB_PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "_", column)


def model_columns(config: DataConfig) -> list[ColumnSpec]:
    return [c for c in config.columns if c.kind in ("label", "numeric", "categorical", "teacher_logit")]


def vocabulary_columns(config: DataConfig) -> list[ColumnSpec]:
    return [c for c in config.columns if c.kind == "categorical" and c.encoding == "vocabulary"]


def raw_feature_spec(config: DataConfig) -> dict:
    import tensorflow as tf

    spec = {}
    for c in model_columns(config):
        if c.kind in ("label", "teacher_logit"):
            spec[c.name] = tf.io.FixedLenFeature([], tf.float32)
        elif c.kind == "numeric":
            spec[c.name] = tf.io.VarLenFeature(tf.float32)
        else:
            spec[c.name] = tf.io.VarLenFeature(tf.string)
    return spec


def tensor_adapter_config(config: DataConfig, passthrough: bool = True):
    """TFT's description of the Arrow batches :func:`to_tft_batch` builds."""
    from ctrkit.runtime import import_tft

    tft = import_tft()
    from tfx_bsl.tfxio import tensor_adapter, tensor_representation_util

    schema = tft.DatasetMetadata.from_feature_spec(raw_feature_spec(config)).schema
    reps = tensor_representation_util.InferTensorRepresentationsFromSchema(schema)
    return tensor_adapter.TensorAdapterConfig(tft_arrow_schema(config, passthrough), reps)


def tft_arrow_schema(config: DataConfig, passthrough: bool = True) -> pa.Schema:
    fields = []
    for c in model_columns(config):
        value_type = pa.binary() if c.kind == "categorical" else pa.float32()
        fields.append(pa.field(c.name, pa.large_list(value_type)))
    if passthrough:
        fields += [pa.field(p, pa.large_list(pa.int64())) for p in PASSTHROUGH]
    return pa.schema(fields)


def _as_list(col: pa.Array, value_type: pa.DataType) -> pa.Array:
    """Flat nullable array → large_list with 0 (null) or 1 value per row, without per-row Python."""
    valid = ~col.is_null().to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(col) + 1, dtype=np.int64)
    np.cumsum(valid, out=offsets[1:])
    values = col.drop_null() if col.null_count else col
    return pa.LargeListArray.from_arrays(pa.array(offsets), values.cast(value_type))


def to_tft_batch(clean: pa.RecordBatch, config: DataConfig, window: np.ndarray | None = None) -> pa.RecordBatch:
    """A clean batch (see ``reading``) → the Arrow layout of :func:`tensor_adapter_config`."""
    arrays = []
    for c in model_columns(config):
        value_type = pa.binary() if c.kind == "categorical" else pa.float32()
        arrays.append(_as_list(clean.column(c.name), value_type))
    if window is not None:
        arrays.append(_as_list(pa.array(window, pa.int64()), pa.int64()))
        arrays.append(_as_list(clean.column("__file"), pa.int64()))
        arrays.append(_as_list(clean.column("__line"), pa.int64()))
    return pa.RecordBatch.from_arrays(arrays, schema=tft_arrow_schema(config, window is not None))


def vocabulary_count_columns(config: DataConfig) -> list[tuple[str, str | None]]:
    """``(column, separator)`` of every vocabulary column, in the order the analyzer outputs them."""
    return [(c.name, c.separator) for c in vocabulary_columns(config)]


def make_preprocessing_fn(config: DataConfig, vocabulary: str = "arrow", token_counts=None):
    """Build ``preprocessing_fn`` for the config.

    Args:
        config: the ``data:`` section.
        vocabulary: ``"arrow"`` (one Arrow counting pass for all vocabularies, the default) or ``"tft"``
            (textbook ``tft.compute_and_apply_vocabulary`` per column; same output, much slower; kept as
            the reference the tests compare against).
        token_counts: optional PCollection from ``CountVocabularies`` over the analysis batches (same
            pipeline): the vocabularies are then built from those Arrow counts and the graph hands no
            string tensors to Python. Without it the analyzer counts the graph's token tensors.
    """
    if vocabulary not in ("arrow", "tft"):
        raise ValueError(f"vocabulary must be 'arrow' or 'tft', got {vocabulary!r}")
    config.check()  # again: a config may have been changed since it was loaded
    columns = model_columns(config)

    def preprocessing_fn(inputs):
        import tensorflow as tf
        import tensorflow_transform as tft

        from ctrkit.pipelines.analyzers import ArrowVocabularies, VocabSpec

        def dense(x, default):
            if isinstance(x, tf.SparseTensor):
                return tf.squeeze(tft.sparse_tensor_to_dense_with_shape(x, [None, 1], default_value=default), 1)
            return x

        outputs = {}
        tokens = {}  # vocabulary column → (ids input: Tensor/SparseTensor, flat tokens for counting)
        for c in columns:
            x = inputs[c.name]
            if c.kind in ("label", "teacher_logit"):
                outputs[c.name] = dense(x, 0.0)
            elif c.kind == "numeric":
                v = dense(x, float(c.fill))
                if c.log1p:
                    v = tf.math.log1p(tf.maximum(v, 0.0))
                if c.buckets:
                    outputs[f"{c.name}_bucket"] = tft.bucketize(v, c.buckets, name=f"bucketize_{c.name}")
                outputs[c.name] = tft.scale_to_z_score(v, name=f"zscore_{c.name}") if c.zscore else v
            else:
                s = dense(x, "")
                if c.separator is not None:
                    parts = tf.strings.split(s, sep=c.separator)
                    parts = tf.ragged.boolean_mask(parts, tf.strings.length(parts) > 0)
                    s, flat = parts.to_sparse(), parts.flat_values
                else:
                    flat = s
                if c.encoding == "hash":
                    if isinstance(s, tf.SparseTensor):
                        outputs[c.name] = tf.SparseTensor(
                            s.indices, tf.strings.to_hash_bucket_fast(s.values, c.hash_buckets), s.dense_shape)
                    else:
                        outputs[c.name] = tf.strings.to_hash_bucket_fast(s, c.hash_buckets)
                elif vocabulary == "tft":
                    outputs[c.name] = tft.compute_and_apply_vocabulary(
                        s, top_k=c.top_k, frequency_threshold=c.frequency_threshold,
                        num_oov_buckets=c.oov_buckets, vocab_filename=vocab_filename(c.name))
                else:
                    tokens[c.name] = (s, flat)
        if tokens:
            names = list(tokens)
            specs = [VocabSpec(vocab_filename(n), next(c.top_k for c in columns if c.name == n),
                               next(c.frequency_threshold for c in columns if c.name == n)) for n in names]
            assert names == [n for n, _ in vocabulary_count_columns(config)]
            # With Arrow-side counts the analyzer input is only a trigger: one tiny tensor per batch.
            analyzer_inputs = ([tokens[n][1] for n in names] if token_counts is None
                               else [tf.shape(inputs[config.label], out_type=tf.int64)])
            paths = tft.experimental.ptransform_analyzer(
                inputs=analyzer_inputs,
                ptransform=ArrowVocabularies(specs, token_counts),
                output_dtypes=[tf.string] * len(names),
                output_shapes=[[]] * len(names),
                output_asset_default_values=[b"__placeholder__"] * len(names),
                name="arrow_vocabularies",
            )
            for n, path in zip(names, paths):
                spec = next(c for c in columns if c.name == n)
                outputs[n] = tft.apply_vocabulary(
                    tokens[n][0], deferred_vocab_filename_tensor=path, num_oov_buckets=spec.oov_buckets)
        return outputs

    return preprocessing_fn


def transformed_features(config: DataConfig, vocab_sizes: dict[str, int]) -> list[TransformedFeature]:
    """The manifest's feature list; ``vocab_sizes`` holds the analyzed vocabulary lengths (no OOV)."""
    feats = []
    for c in model_columns(config):
        if c.kind == "numeric":
            feats.append(TransformedFeature(c.name, "numeric", source=c.name))
            if c.buckets:
                feats.append(TransformedFeature(f"{c.name}_bucket", "categorical", vocab_size=c.buckets, source=c.name))
        elif c.kind == "categorical":
            size = c.hash_buckets if c.encoding == "hash" else vocab_sizes[c.name] + c.oov_buckets
            feats.append(TransformedFeature(c.name, "categorical", vocab_size=size,
                                            multivalent=c.separator is not None, source=c.name))
    return feats
