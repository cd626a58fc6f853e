"""A Beam coder for ``pyarrow.RecordBatch`` elements.

Without one, Beam codes record batches with pickle, and (worse) estimates each sampled element's size
for its metrics by pickling it: on a 1M-row Criteo job that was ~3.3 GB pickled just to be measured
(~2.5 s). This coder writes the Arrow IPC stream format (zero-copy to read back) and estimates size
from the batch's buffers without encoding anything.
"""
from __future__ import annotations

import apache_beam as beam
import pyarrow as pa


class RecordBatchCoder(beam.coders.Coder):
    """Arrow IPC stream encoding of one record batch; size estimates from its buffers."""

    def encode(self, value: pa.RecordBatch) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, value.schema) as writer:
            writer.write_batch(value)
        return sink.getvalue().to_pybytes()

    def decode(self, encoded: bytes) -> pa.RecordBatch:
        return pa.ipc.open_stream(encoded).read_next_batch()

    def estimate_size(self, value: pa.RecordBatch) -> int:
        return value.nbytes

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self):
        return pa.RecordBatch

    def __eq__(self, other) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


def register() -> None:
    """Make ``RecordBatchCoder`` the coder of every PCollection typed ``pa.RecordBatch``."""
    beam.coders.registry.register_coder(pa.RecordBatch, RecordBatchCoder)
