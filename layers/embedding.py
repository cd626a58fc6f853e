"""Per-field embeddings plus numeric passthrough: builds the DCN input ``x0`` from transformed features."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import keras
import numpy as np
from keras import ops

from ctrkit.layers import _validation as check
from ctrkit.layers.cross import clone_initializer

PAD_ID = -1  # padding of multi-valued categorical columns


def _is_tf_graph(t: Any) -> bool:
    """True inside a ``tf.function`` trace, where values cannot be inspected from Python."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf  # local: only the TF backend takes this path

    return not tf.executing_eagerly()


class MissingFeaturesError(KeyError):
    """The ``KeyError`` for features missing from the input dict, printed as written: a plain ``KeyError``
    prints the repr of its message, and Keras' wrapped message then reads as one line of ``\\n`` escapes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _dense_ids(ids: Any) -> Any:
    """A ``tf.SparseTensor`` / ``tf.RaggedTensor`` of multi-valued ids (``parse_example``'s VarLen, a ragged
    batch) as the dense ``(B, L)`` ids the layer takes, padded with ``PAD_ID``; anything else unchanged."""
    if keras.backend.backend() != "tensorflow":
        return ids
    import tensorflow as tf

    if isinstance(ids, tf.SparseTensor):
        return tf.sparse.to_dense(ids, default_value=tf.cast(PAD_ID, ids.dtype))
    if isinstance(ids, tf.RaggedTensor):
        return ids.to_tensor(default_value=tf.cast(PAD_ID, ids.dtype))
    return ids


def _is_jax_tracer(t: Any) -> bool:
    """True inside a JAX trace (``jax.jit``: Keras' default on JAX), where values reach Python only
    through a host callback."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return isinstance(t, jax.core.Tracer)


def _in_symbolic_call() -> bool:
    """True while Keras infers output shapes. On PyTorch it does so by calling the layer on real tensors of
    ones (``compute_output_spec``), whose values are placeholders, not data."""
    try:
        from keras.src.backend.common.symbolic_scope import in_symbolic_scope
    except ImportError:  # pragma: no cover - a Keras without it calls layers symbolically on KerasTensors only
        return False
    return in_symbolic_scope()


def _concrete(t: Any) -> np.ndarray | None:
    """The value of ``t`` as NumPy when it has one (eager), else ``None`` (symbolic or traced)."""
    if keras.backend.is_keras_tensor(t) or _is_tf_graph(t) or _is_jax_tracer(t) or _in_symbolic_call():
        return None
    return np.asarray(ops.convert_to_numpy(t))


def check_in_jax_trace(check: Any, *values: Any) -> None:
    """Run ``check(*numpy_values)`` on the host when the traced step runs (``jax.debug.callback``), so a bad
    id raises its message under ``jax.jit`` too (surfacing as a ``JaxRuntimeError`` that contains it).

    Opt-in (``check_ids_in_jit=True``): the callback copies the ids to the host and synchronises every step
    (a small model's step took 2-5x as long), and jax2tf cannot export a program holding one.
    """
    import jax

    jax.debug.callback(lambda *arrays: check(*(np.asarray(a) for a in arrays)), *values)


def integer_ids(layer: str, what: str, ids: Any) -> Any:
    """``ids`` as int32/int64, refusing floats that hold values.

    Small integer types (pandas category codes are int8/int16) are widened. Float placeholders in Keras'
    symbolic calls are cast: Keras rebuilds a subclassed model on float32 placeholders when it loads one,
    and refusing them there left the layers after this one unbuilt and their saved weights unrestored.
    Float ids with values (eager, ``fit``, ``predict``) are refused: a cast would truncate 3.7 to 3 and
    merge ids above 2^24 in float32.
    """
    dtype = keras.backend.standardize_dtype(ids.dtype)
    if dtype in ("int32", "int64"):
        return ids
    wide = "int32" if keras.backend.backend() == "jax" else "int64"  # JAX has no int64 unless x64 is enabled
    if "int" in dtype:
        return ops.cast(ids, wide)
    if (keras.backend.is_keras_tensor(ids) or _in_symbolic_call()) and ("float" in dtype or dtype == "bfloat16"):
        return ops.cast(ids, wide)
    raise ValueError(f"{layer}: {what} must hold integer ids, got dtype {dtype}")


def _lookup(table: Any, ids: Any) -> Any:
    """Rows ``ids`` of ``table``.

    On TensorFlow this gathers from the variable itself (``ResourceGather``). ``ops.take`` would first read
    the whole table as a tensor; once a sparse optimizer has scattered into the variable, TF keeps it in
    copy-on-read mode and that read copies the entire table every step: O(table size), not O(batch)
    (measured: 1.4 ms vs 36 ms per step at 1M rows).
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.gather(table.value, ids)
    # Ids are checked before this except under jax.jit (unless check_ids_in_jit): clamp there, as TF's XLA
    # gather does, instead of jnp.take's NaN row past the table (which turns every weight into NaN at the
    # next update) and its wrap-around of negative ids.
    return ops.take(table, ops.clip(ids, 0, table.shape[0] - 1), axis=0)


@keras.saving.register_keras_serializable(package="ctrkit")
class FeatureEmbedding(keras.layers.Layer):
    """Embeds categorical ids per feature and concatenates them with numeric features into ``x0``.

    ```
    e_f = E_f[id_f]                                   univalent id, shape (B,)
    e_f = Σ_j m_j E_f[id_fj] / max(1, Σ_j m_j)        multi-valued ids (B, L), m_j = [id_fj != -1]
    x0  = concat(e_f for f in sorted(vocab_sizes), numeric features in the given order)
    ```

    A feature named in ``multivalued_features`` is always multi-valued: it takes ``(B, L)`` ids padded
    with ``-1`` for any ``L ≥ 1`` (a ``(B,)`` tensor reads as ``(B, 1)``), and a row with no valid id
    embeds to zeros. Any other feature is read from its shape: ``(B,)`` and ``(B, 1)`` are univalent
    (``-1`` is then an error), ``(B, L > 1)`` multi-valued. Declare every multi-valued feature: a padded
    batch in which no row has more than one id is ``(B, 1)``, and undeclared it would be read as
    univalent and its ``-1`` padding rejected. On TensorFlow, multi-valued ids may also come as a
    ``tf.SparseTensor`` (``tf.io.parse_example``'s ``VarLenFeature``) or a ``tf.RaggedTensor``: the layer pads
    them with ``-1``. A Keras model's dense ``Input`` does not: it fills a ``SparseTensor``'s gaps with ``0``,
    a real id, before any layer sees them, so pad before the model (``Manifest.parse_examples`` does).

    Ids are integers (int8/int16 are widened; float ids are refused, except Keras' float placeholders when it
    rebuilds a loaded model). They must lie in ``[0, vocab_size)`` (``-1`` is padding for multi-valued
    columns only): an out-of-range id raises ``ValueError`` naming the feature and row when called eagerly
    and fails a ``tf.debugging`` assertion inside a ``tf.function`` (TF backend), instead of silently
    wrapping around or reading row 0. Compiled code does not check by default: under
    XLA on TensorFlow (``jit_compile=True``, which Keras' ``jit_compile="auto"`` picks when a GPU is
    present) the assertion is dropped, and under ``jax.jit`` (Keras' default on JAX) ids are checked only
    with ``check_ids_in_jit=True`` (a host callback raising the same ``ValueError`` inside a
    ``JaxRuntimeError``; see its cost below). Otherwise a bad id is clamped to the table's first or last
    row, unreported (not the NaN row ``jnp.take`` would read, which turns every weight into NaN at the next
    update). Check ids upstream or run one eager or non-XLA pass over new data.

    The lookup is ``keras.ops.take`` (``tf.gather`` on the variable on TensorFlow), so the gradient of
    each table is a ``tf.IndexedSlices`` touching only the looked-up rows: optimizers that support it
    apply sparse updates. On TensorFlow a multi-valued lookup gathers the valid ids only, so padding adds
    no index to that gradient (a sparse optimizer with per-row state, such as lazy Adam, then leaves
    rows alone that no example used); other backends gather row 0 for padding and mask it out, which
    gives the same output but lists row 0 in the gradient with zero values. The tables are exposed as :attr:`embedding_tables`.

    Args:
        vocab_sizes: feature name → number of ids (OOV / hash buckets included), each ≥ 1.
        embedding_dim: one dimension for every feature (int), or a dict feature name → dimension covering
            exactly the features of ``vocab_sizes`` (mixed dimensions are allowed). Defaults to 10.
        numeric_features: names of float features passed through, in this order. Each is ``(B,)`` or
            ``(B, 1)``.
        multivalued_features: names of categorical features that are multi-valued, whatever the padded
            length ``L`` of a batch (see above). Defaults to ``()`` (every feature read from its shape).
        embeddings_initializer: initializer of the tables. Defaults to ``"uniform"`` (±0.05, as
            ``keras.layers.Embedding``).
        embeddings_regularizer: regularizer of the tables.
        check_ids_in_jit: JAX only: also check ids under ``jax.jit`` (Keras' default on JAX), with a host
            callback that raises the layer's error. It costs a device-to-host copy and a sync per step
            (a small model's step took 2-5x as long) and stops ``model.export`` (jax2tf). Defaults to
            ``False``: an out-of-range id is then clamped to the table's first or last row, unreported.
        **kwargs: base layer arguments.

    Call arguments:
        inputs: dict feature name → tensor. Keys not named in ``vocab_sizes`` or ``numeric_features``
            (the label, a teacher logit) are ignored; a missing feature raises ``KeyError``.

    Returns:
        ``(batch, Σ_f dim_f + len(numeric_features))`` float tensor.

    Example:

    ```python
    layer = FeatureEmbedding({"C1": 1000, "C2": 50}, embedding_dim={"C1": 16, "C2": 4},
                             numeric_features=["I1"], multivalued_features=["C2"])
    x0 = layer({"C1": np.array([3, 7]), "C2": np.array([[1, 2], [4, -1]]), "I1": np.array([0.5, -1.0])})
    # x0.shape == (2, 21); C2 = np.array([[1], [-1]]) is also multi-valued (the 2nd row embeds to 0)
    ```

    References:
    - [R. Wang et al., 2020](https://arxiv.org/abs/2008.13535), DCN V2, Section 3.1 (embedding layer).
    """

    def __init__(
        self,
        vocab_sizes: Mapping[str, int],
        embedding_dim: int | Mapping[str, int] = 10,
        numeric_features: Sequence[str] = (),
        embeddings_initializer: Any = "uniform",
        embeddings_regularizer: Any = None,
        multivalued_features: Sequence[str] = (),
        check_ids_in_jit: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.check_ids_in_jit = bool(check_ids_in_jit)
        if not isinstance(vocab_sizes, Mapping):
            raise ValueError(f"FeatureEmbedding: `vocab_sizes` must be a dict name -> size, got {type(vocab_sizes).__name__}")
        self.vocab_sizes = {
            str(k): check.positive_int("FeatureEmbedding", f"vocab_sizes[{k!r}]", v) for k, v in vocab_sizes.items()
        }
        self.categorical_features = sorted(self.vocab_sizes)
        slashed = [k for k in self.categorical_features if "/" in k]
        if slashed:  # each names a table weight, and Keras weight names cannot hold "/"
            raise ValueError(f"FeatureEmbedding: feature names {slashed} contain '/', which Keras weight names cannot; "
                             "rename the features (e.g. '/' -> '_')")
        if isinstance(embedding_dim, Mapping):
            missing = sorted(set(self.vocab_sizes) - set(embedding_dim))
            unknown = sorted(set(embedding_dim) - set(self.vocab_sizes))
            if missing or unknown:
                raise ValueError(
                    "FeatureEmbedding: a dict `embedding_dim` must name exactly the features of `vocab_sizes`"
                    f" (missing: {missing}, not in vocab_sizes: {unknown}); pass an int to share one dimension"
                )
            self.embedding_dims = {
                k: check.positive_int("FeatureEmbedding", f"embedding_dim[{k!r}]", embedding_dim[k])
                for k in self.categorical_features
            }
            self.embedding_dim = dict(self.embedding_dims)
        else:
            dim = check.positive_int("FeatureEmbedding", "embedding_dim", embedding_dim)
            self.embedding_dims = {k: dim for k in self.categorical_features}
            self.embedding_dim = dim
        if isinstance(numeric_features, str):
            raise ValueError(
                f"FeatureEmbedding: `numeric_features` must be a list of feature names, got the string "
                f"{numeric_features!r}"
            )
        self.numeric_features = [str(n) for n in numeric_features]
        clash = sorted(set(self.numeric_features) & set(self.vocab_sizes))
        if clash:
            raise ValueError(f"FeatureEmbedding: features {clash} are listed as both categorical and numeric")
        if len(set(self.numeric_features)) != len(self.numeric_features):
            raise ValueError(f"FeatureEmbedding: duplicate numeric features in {self.numeric_features}")
        if not self.categorical_features and not self.numeric_features:
            raise ValueError("FeatureEmbedding: needs at least one categorical or numeric feature")
        if isinstance(multivalued_features, str):
            raise ValueError(
                f"FeatureEmbedding: `multivalued_features` must be a list of feature names, got the string "
                f"{multivalued_features!r}"
            )
        self.multivalued_features = [str(n) for n in multivalued_features]
        unknown = [n for n in self.multivalued_features if n not in self.vocab_sizes]
        if unknown:
            raise ValueError(
                f"FeatureEmbedding: `multivalued_features` {unknown} are not categorical features; "
                f"they are {self.categorical_features}"
            )
        if len(set(self.multivalued_features)) != len(self.multivalued_features):
            raise ValueError(f"FeatureEmbedding: duplicate names in `multivalued_features` {self.multivalued_features}")
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
        self._tables: dict[str, Any] = {}

    @property
    def output_dim(self) -> int:
        """Width of ``x0``."""
        return sum(self.embedding_dims.values()) + len(self.numeric_features)

    @property
    def embedding_tables(self) -> dict[str, Any]:
        """Feature name → embedding variable of shape ``(vocab_size, dim)`` (empty before build)."""
        return dict(self._tables)

    def build(self, input_shape: Any = None) -> None:
        for name in self.categorical_features:
            self._tables[name] = self.add_weight(
                name=f"embedding_{name}",
                shape=(self.vocab_sizes[name], self.embedding_dims[name]),
                initializer=clone_initializer(self.embeddings_initializer),
                regularizer=self.embeddings_regularizer,
                # Under a mixed policy an autocast table is read as a 16-bit copy of the whole table on
                # every call (O(table size) per step: 25-39 ms vs 0.5 ms for one 1M x 16 table); only the
                # gathered rows are cast, in call().
                autocast=False,
            )

    def _raise_if_out_of_range(self, name: str, value: np.ndarray, multivalued: bool) -> None:
        vocab = self.vocab_sizes[name]
        bad = (value < (PAD_ID if multivalued else 0)) | (value >= vocab)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise ValueError(
                f"FeatureEmbedding: feature {name!r} has id {int(value[bad][0])} in row {row}, outside "
                f"[0, {vocab}){' (-1 pads multi-valued rows)' if multivalued else ''}; the ids must come "
                "from the same transform (vocabulary) the layer was sized for"
            )

    def _check_ids(self, name: str, ids: Any, multivalued: bool) -> Any:
        vocab = self.vocab_sizes[name]
        low = PAD_ID if multivalued else 0
        value = _concrete(ids)
        if value is not None:
            self._raise_if_out_of_range(name, value, multivalued)
            return ids
        if _is_tf_graph(ids):
            import tensorflow as tf

            # One unguarded Assert op on a constant message: tf.debugging.assert_less/_greater_equal put
            # their data in a tf.cond (an ``If`` function call per check); for the BARS model's 26 features
            # that took the in-process batch-1 serving p50 from ~1.5 to ~3.3 ms (/tmp probe, one run each).
            in_range = tf.reduce_all(tf.logical_and(ids >= tf.cast(low, ids.dtype), ids < tf.cast(vocab, ids.dtype)))
            check = tf.debugging.Assert(
                in_range, [f"FeatureEmbedding: feature {name!r} has an id outside [{low}, {vocab}): the ids must "
                           "come from the same transform (vocabulary) the layer was sized for"])
            with tf.control_dependencies([check]):
                return tf.identity(ids)
        return ids

    def _check_all_ids(self, ids_by_name: dict[str, Any]) -> dict[str, Any]:
        """Range-check every feature's ids; in a TF graph, all univalent features in one assertion.

        A per-feature check is ~6 graph ops; for the 26 Criteo features at batch 1 that was most of the
        embedding layer's serving cost, so univalent ids are stacked and checked together (~10 ops), and
        the assertion names the offending features.
        """
        if any(_is_jax_tracer(ids) for ids in ids_by_name.values()):
            if not self.check_ids_in_jit:
                return ids_by_name  # unchecked: the lookup clamps (see _lookup)
            names = list(ids_by_name)

            def check(*values: np.ndarray) -> None:
                for name, value in zip(names, values):
                    self._raise_if_out_of_range(name, value, multivalued=value.ndim == 2)

            check_in_jax_trace(check, *ids_by_name.values())  # one host callback per step for all features
            return ids_by_name
        univalent = [n for n, ids in ids_by_name.items() if len(ids.shape) == 1]
        if not univalent or not _is_tf_graph(ids_by_name[univalent[0]]):
            return {n: self._check_ids(n, ids, multivalued=len(ids.shape) == 2) for n, ids in ids_by_name.items()}
        import tensorflow as tf

        checked = {n: self._check_ids(n, ids, multivalued=True) for n, ids in ids_by_name.items() if n not in univalent}
        # (F, B) from a concat along axis 0: contiguous copies, where a stack into (B, F) writes strided
        # (3.3 of ~530 single-thread ms per BARS training step went to that Pack and its Unpack).
        rows = tf.reshape(tf.concat([tf.cast(ids_by_name[n], tf.int64) for n in univalent], axis=0), [len(univalent), -1])
        vocab = tf.constant([[self.vocab_sizes[n]] for n in univalent], tf.int64)
        bad = tf.reduce_any(tf.logical_or(rows < 0, rows >= vocab), axis=1)  # (F,)
        # Data stays string constants + an int32 flag vector (no string ops on tensors, no cond): the
        # check compiles under XLA, where the Assert itself is dropped.
        check = tf.debugging.Assert(
            tf.logical_not(tf.reduce_any(bad)),
            ["FeatureEmbedding: ids outside [0, vocab_size); 1 flags the offending feature(s) among ["
             + ", ".join(f"{n} (vocab {self.vocab_sizes[n]})" for n in univalent) + "]:",
             tf.cast(bad, tf.int32),
             "the ids must come from the same transform (vocabulary) the layer was sized for"],
            summarize=len(univalent))
        with tf.control_dependencies([check]):
            for n in univalent:  # the lookups wait for the check; identity forwards the buffer, no copy
                checked[n] = tf.identity(ids_by_name[n])
        return checked

    def _mean_of_valid(self, table: Any, ids: Any) -> Any:
        """Mean of the rows of ``table`` at the ids ``>= 0`` of each row of ``ids`` (B, L); zeros if none."""
        valid = ops.greater_equal(ids, 0)  # (B, L)
        count = ops.maximum(ops.sum(ops.cast(valid, self.compute_dtype), axis=1, keepdims=True), 1.0)
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            # Gather the valid ids only. Gathering a stand-in row for padding (and masking it out) would
            # put that row in the table's IndexedSlices gradient with zero values, and a lazy sparse
            # optimizer with per-row state (ctrkit.sparse's Adam) would then decay its moments and move it
            # on batches that never used it. One flat where/gather/segment-sum, no per-row work: a training
            # step over 39 features x 4096 rows (6 multi-valued, L = 8) took the same time as the masked
            # gather (~32-37 ms either way, 2 runs each on the 2-core dev box).
            batch = tf.shape(ids, out_type=tf.int64)[0]
            length = tf.shape(ids, out_type=tf.int64)[1]
            positions = tf.where(tf.reshape(valid, [-1]))[:, 0]  # (N,) flat (row, slot) positions, row-major
            vectors = _lookup(table, tf.gather(tf.reshape(ids, [-1]), positions))  # (N, dim)
            total = tf.math.unsorted_segment_sum(vectors, positions // length, batch)  # (B, dim)
            return ops.cast(total, self.compute_dtype) / count
        mask = ops.cast(valid, self.compute_dtype)
        safe = ops.where(valid, ids, ops.zeros_like(ids))
        vectors = ops.cast(_lookup(table, safe), self.compute_dtype)  # (B, L, dim)
        total = ops.sum(vectors * ops.expand_dims(mask, -1), axis=1)
        return total / count

    def call(self, inputs: Mapping[str, Any]) -> Any:
        if not isinstance(inputs, Mapping):
            raise ValueError(f"FeatureEmbedding: call it on a dict of features, got {type(inputs).__name__}")
        missing = [n for n in self.categorical_features + self.numeric_features if n not in inputs]
        if missing:
            raise MissingFeaturesError(f"FeatureEmbedding: input dict lacks features {missing}; it has {sorted(inputs)}")
        batch_sizes = {n: inputs[n].shape[0] for n in self.categorical_features + self.numeric_features
                       if len(inputs[n].shape) and inputs[n].shape[0] is not None}
        if len(set(batch_sizes.values())) > 1:  # else a concat error deep in the backend, naming no feature
            raise ValueError(f"FeatureEmbedding: features disagree on the batch size: {batch_sizes}")
        ids_by_name: dict[str, Any] = {}
        declared = set(self.multivalued_features)
        for name in self.categorical_features:
            ids = _dense_ids(inputs[name])
            rank = len(ids.shape)
            if name in declared:
                # Declared multi-valued: keep (B, L) even when L == 1, so -1 stays padding.
                if rank == 1:
                    ids = ops.expand_dims(ids, -1)
                    rank = 2
            elif rank == 2 and ids.shape[-1] == 1:
                ids = ops.squeeze(ids, axis=-1)
                rank = 1
            if rank not in (1, 2):
                raise ValueError(f"FeatureEmbedding: feature {name!r} must be (batch,) or (batch, L) ids, got shape {ids.shape}")
            ids_by_name[name] = integer_ids("FeatureEmbedding", f"feature {name!r}", ids)
        ids_by_name = self._check_all_ids(ids_by_name)
        parts = []
        for name in self.categorical_features:
            ids = ids_by_name[name]
            rank = len(ids.shape)
            table = self._tables[name]
            if rank == 1:
                parts.append(ops.cast(_lookup(table, ids), self.compute_dtype))
            else:
                parts.append(self._mean_of_valid(table, ids))
        for name in self.numeric_features:
            value = ops.cast(inputs[name], self.compute_dtype)
            if len(value.shape) == 1:
                value = ops.expand_dims(value, -1)
            elif len(value.shape) != 2 or value.shape[-1] != 1:
                raise ValueError(f"FeatureEmbedding: numeric feature {name!r} must be (batch,) or (batch, 1), got {value.shape}")
            parts.append(value)
        return ops.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]

    def compute_output_shape(self, input_shape: Any) -> Any:
        batch = None
        if isinstance(input_shape, Mapping) and input_shape:
            batch = next(iter(input_shape.values()))[0]
        return (batch, self.output_dim)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "vocab_sizes": dict(self.vocab_sizes),
            "embedding_dim": self.embedding_dim,
            "numeric_features": list(self.numeric_features),
            "multivalued_features": list(self.multivalued_features),
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
            "embeddings_regularizer": keras.regularizers.serialize(self.embeddings_regularizer),
            "check_ids_in_jit": self.check_ids_in_jit,
        }
