"""Adagrad and Adam whose embedding-table updates cost O(rows touched), not O(table size).

Keras 3 optimizers on the TensorFlow backend densify the gradient of an embedding table and update every
row of every slot each step: 16k examples/s at 1k rows per table falls to 3.1k at 1M rows on this machine.
Here the gradient of a table stays a ``tf.IndexedSlices``; duplicate ids in a batch are summed first (so a
row gets one update with its total gradient, as a dense optimizer would compute), and only those rows of
the table and its slots are read and written:

  * Adagrad: ``tf.raw_ops.ResourceSparseApplyAdagradV2`` (dense variables: ``ResourceApplyAdagradV2``)
        acc += g², w −= lr · g / (√acc + ε)
  * Adam, lazy on tables (rows not in the batch keep their moments, the TF1 ``LazyAdam`` rule),
    ``ResourceApplyAdam`` on dense variables:
        m = β₁m + (1−β₁)g, v = β₂v + (1−β₂)g², w −= lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v + ε)

In a compiled step, Adam takes a table's current rows from the forward pass's lookup of them instead of
reading the table a second time (:func:`_current_rows`).

Slots are plain ``tf.Variable`` objects listed by :meth:`SparseOptimizer.slot_variables` in a fixed order,
so the trainer can checkpoint and restore them next to the weights.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import tensorflow as tf

__all__ = ["SparseOptimizer"]


class SparseOptimizer:
    """Adagrad / Adam over a fixed list of variables; ``sparse_variables`` get row-wise updates.

    Args:
        kind: ``"adagrad"`` or ``"adam"``.
        variables: every trainable ``tf.Variable`` to update (the underlying variables of Keras weights).
        sparse_variables: the subset updated row-wise (embedding tables); their gradients must be
            ``tf.IndexedSlices`` (a dense gradient for one of them is refused: it would hide a dense update).
        learning_rate: step size of the dense variables.
        sparse_learning_rate: step size of the tables (default: ``learning_rate``).
        beta_1, beta_2, epsilon: Adam constants (epsilon is also Adagrad's).
        initial_accumulator: Adagrad's starting accumulator value.

    Example:

    ```python
    opt = SparseOptimizer("adagrad", [v.value for v in model.trainable_variables],
                          sparse_variables=[t.value for t in emb.embedding_tables.values()],
                          learning_rate=0.01)
    with tf.GradientTape() as tape:
        loss = ...
    opt.apply(tape.gradient(loss, opt.variables))
    ```
    """

    def __init__(
        self,
        kind: Literal["adagrad", "adam"],
        variables: Sequence[tf.Variable],
        sparse_variables: Sequence[tf.Variable] = (),
        learning_rate: float = 0.01,
        sparse_learning_rate: float | None = None,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        initial_accumulator: float = 0.1,
    ) -> None:
        if kind not in ("adagrad", "adam"):
            raise ValueError(f"optimizer must be 'adagrad' or 'adam', got {kind!r}")
        self.kind = kind
        self.variables = list(variables)
        sparse_ids = {id(v) for v in sparse_variables}
        unknown = sparse_ids - {id(v) for v in self.variables}
        if unknown:
            raise ValueError("every sparse variable must also be in `variables`")
        self.is_sparse = [id(v) in sparse_ids for v in self.variables]
        self.lr = float(learning_rate)
        self.sparse_lr = float(sparse_learning_rate if sparse_learning_rate is not None else learning_rate)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
        self._slots: list[list[tf.Variable]] = []
        for v in self.variables:
            base = v.name.split(":")[0].replace("/", "_")
            if kind == "adagrad":
                init = tf.fill(v.shape, tf.cast(initial_accumulator, v.dtype))
                self._slots.append([tf.Variable(init, trainable=False, name=f"{base}_accumulator")])
            else:
                self._slots.append(
                    [
                        tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name=f"{base}_m"),
                        tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name=f"{base}_v"),
                    ]
                )

    def slot_variables(self) -> list[tf.Variable]:
        """Every optimizer state variable, in a fixed order (the iteration counter first)."""
        return [self.iterations] + [s for slots in self._slots for s in slots]

    def apply(self, gradients: Sequence[tf.Tensor | tf.IndexedSlices | None]) -> None:
        """Apply one step; ``gradients[i]`` belongs to ``variables[i]`` (None: no gradient, skipped)."""
        if len(gradients) != len(self.variables):
            raise ValueError(f"{len(gradients)} gradients for {len(self.variables)} variables")
        t = tf.cast(self.iterations + 1, tf.float32)
        self.iterations.assign_add(1)
        for var, grad, slots, sparse in zip(self.variables, gradients, self._slots, self.is_sparse):
            if grad is None:
                continue
            if sparse:
                if not isinstance(grad, tf.IndexedSlices):
                    raise TypeError(
                        f"embedding table {var.name} got a dense gradient; look it up with a gather "
                        "(keras.ops.take) so its gradient stays sparse"
                    )
                self._apply_sparse(var, grad, slots, t)
            else:
                if isinstance(grad, tf.IndexedSlices):
                    grad = tf.convert_to_tensor(grad)
                self._apply_dense(var, grad, slots, t)

    # -- kernels ------------------------------------------------------------------------------------
    def _apply_dense(self, var: tf.Variable, grad: tf.Tensor, slots: list[tf.Variable], t: tf.Tensor) -> None:
        lr = tf.cast(self.lr, var.dtype)
        eps = tf.cast(self.epsilon, var.dtype)
        if self.kind == "adagrad":
            tf.raw_ops.ResourceApplyAdagradV2(
                var=var.handle, accum=slots[0].handle, lr=lr, epsilon=eps, grad=grad, use_locking=False
            )
        else:
            b1, b2 = tf.cast(self.beta_1, var.dtype), tf.cast(self.beta_2, var.dtype)
            tf.raw_ops.ResourceApplyAdam(
                var=var.handle,
                m=slots[0].handle,
                v=slots[1].handle,
                beta1_power=tf.pow(b1, tf.cast(t, var.dtype)),
                beta2_power=tf.pow(b2, tf.cast(t, var.dtype)),
                lr=lr,
                beta1=b1,
                beta2=b2,
                epsilon=eps,
                grad=grad,
                use_locking=False,
            )

    def _apply_sparse(self, var: tf.Variable, grad: tf.IndexedSlices, slots: list[tf.Variable], t: tf.Tensor) -> None:
        unique, positions, values = _sum_duplicates(grad.indices, grad.values)
        lr = tf.cast(self.sparse_lr, var.dtype)
        eps = tf.cast(self.epsilon, var.dtype)
        if self.kind == "adagrad":
            tf.raw_ops.ResourceSparseApplyAdagradV2(
                var=var.handle, accum=slots[0].handle, lr=lr, epsilon=eps, grad=values, indices=unique, use_locking=False
            )
            return
        m, v = slots
        b1, b2 = self.beta_1, self.beta_2
        m_rows = b1 * tf.gather(m, unique) + (1 - b1) * values
        v_rows = b2 * tf.gather(v, unique) + (1 - b2) * tf.square(values)
        m.scatter_update(tf.IndexedSlices(m_rows, unique))
        v.scatter_update(tf.IndexedSlices(v_rows, unique))
        step = lr * tf.sqrt(1 - tf.pow(b2, t)) / (1 - tf.pow(b1, t))
        # Gather, subtract, scatter_update: TF's CPU ResourceScatterSub costs ~5x a gather plus a
        # ResourceScatterUpdate of the same rows (39 tables × ~3.5k rows: 35 vs 12 CPU-ms per step).
        # The ids are unique here, so the two forms compute the same rows.
        var_rows = _current_rows(var, grad.indices, unique, positions) - step * m_rows / (tf.sqrt(v_rows) + eps)
        var.scatter_update(tf.IndexedSlices(var_rows, unique))


def _current_rows(var: tf.Variable, indices: tf.Tensor, unique: tf.Tensor, positions: tf.Tensor) -> tf.Tensor:
    """``var``'s rows at ``unique``, taken from the forward pass's lookup when the step has one.

    Reading them from the table again costs a gather of scattered rows per table (BARS step, 39 × 100k-row
    tables: ~6 ms of ~135, one op at a time, ``benchmarks/profile_trainer_step.py --serial``). The
    forward pass already gathered them: in a compiled step, a table's gradient comes from TF's gather
    gradient, whose indices are the (reshaped) ids of the forward ``ResourceGather`` on the same variable,
    and that gather's output holds every row wanted here, read before any update of this step. Its
    first row of each unique id is taken instead. Where no such gather is found (eager execution, a table
    looked up more than once so its gradients were concatenated, another lookup op), the rows are gathered
    from the variable as before: same values, only slower.
    """
    looked_up = _forward_lookup(var, indices)
    if looked_up is None:
        return tf.gather(var, unique)
    first = tf.math.unsorted_segment_min(tf.range(tf.size(positions)), positions, tf.size(unique))
    return tf.gather(tf.reshape(looked_up, tf.concat([[-1], tf.shape(var)[1:]], 0)), first)


@tf.autograph.experimental.do_not_convert
def _forward_lookup(var: tf.Variable, indices: tf.Tensor) -> tf.Tensor | None:
    """The output of this graph's ``ResourceGather`` of ``var`` at ``indices``' ids, or None if there is none."""
    if tf.executing_eagerly() or not hasattr(indices, "op"):
        return None
    ids = indices.op.inputs[0] if indices.op.type == "Reshape" else indices  # the gather gradient flattens ids
    graph = tf.compat.v1.get_default_graph()
    handle = graph.capture(var.handle) if hasattr(graph, "capture") else var.handle
    for op in ids.consumers():
        if (op.type == "ResourceGather" and op.inputs[0].name == handle.name and op.inputs[1].name == ids.name
                and op.get_attr("batch_dims") == 0):
            return op.outputs[0]
    return None


def _sum_duplicates(indices: tf.Tensor, values: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """``(unique ids, position of each id in them, summed rows)``: a row must get one update with the total
    gradient of its ids.

    The sum is a sparse (ids × unique) one-hot matrix, transposed, times the rows. TF's CPU
    SparseTensorDenseMatMul does this about 3x faster than UnsortedSegmentSum for embedding-sized rows
    (39 tables × 4096 ids × 10 dims: 2.8 vs 8.8 ms per step, /tmp/s9/uss_alt.py).
    """
    unique, pos = tf.unique(indices)
    if values.shape.rank != 2:
        return unique, pos, tf.math.unsorted_segment_sum(values, pos, tf.shape(unique)[0])
    n = tf.shape(indices, out_type=tf.int64)[0]
    one_hot = tf.SparseTensor(
        tf.stack([tf.range(n), tf.cast(pos, tf.int64)], axis=1),
        tf.ones([n], values.dtype),
        tf.stack([n, tf.shape(unique, out_type=tf.int64)[0]]),
    )
    return unique, pos, tf.sparse.sparse_dense_matmul(one_hot, values, adjoint_a=True)
