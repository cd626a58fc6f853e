"""The pipeline's write path: TFRecord framing, the Arrow coder, and the background shard writer."""
from __future__ import annotations

import gzip

import numpy as np
import pyarrow as pa
import pytest

from ctrkit.pipelines import tfrecord
from ctrkit.pipelines.arrow_coder import RecordBatchCoder


def _records(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(int(k)) for k in rng.integers(0, 300, n)] + [b""]


def test_frame_is_byte_identical_to_tensorflows_writer(tmp_path):
    import tensorflow as tf

    records = _records(500)
    path = str(tmp_path / "ref.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for r in records:
            writer.write(r)
    with open(path, "rb") as f:
        assert tfrecord.frame(records) == f.read()
    assert tfrecord.frame([]) == b""


def test_gzip_shard_reads_back_with_tf_data_and_gzip(tmp_path):
    import tensorflow as tf

    records = _records(300, seed=1)
    path = str(tmp_path / "part.tfrecord.gz")
    tfrecord.write_gzip_tfrecords(path, records)
    read = [r.numpy() for r in tf.data.TFRecordDataset(path, compression_type="GZIP")]
    assert read == records
    with gzip.open(path, "rb") as f:
        assert f.read() == tfrecord.frame(records)


def _batch() -> pa.RecordBatch:
    offsets = pa.array([0, 1, 1, 3], type=pa.int32())
    return pa.RecordBatch.from_arrays(
        [pa.array([1.5, None, 3.0], type=pa.float32()),
         pa.LargeListArray.from_arrays(pa.array([0, 2, 2, 3], type=pa.int64()), pa.array([b"a", b"b", b"c"])),
         pa.ListArray.from_arrays(offsets, pa.array([7, 8, 9], type=pa.int64()))],
        names=["f", "tokens", "ids"])


def test_record_batch_coder_round_trip():
    coder = RecordBatchCoder()
    batch = _batch()
    back = coder.decode(coder.encode(batch))
    assert back.equals(batch) and back.schema == batch.schema
    sliced = batch.slice(1, 2)
    assert coder.decode(coder.encode(sliced)).equals(sliced)


def test_record_batch_coder_estimates_size_without_encoding(monkeypatch):
    coder = RecordBatchCoder()
    batch = _batch()
    monkeypatch.setattr(RecordBatchCoder, "encode", lambda self, v: pytest.fail("estimate_size encoded"))
    assert coder.estimate_size(batch) == batch.nbytes > 0


def test_record_batch_coder_is_used_for_typed_pcollections():
    import apache_beam as beam

    from ctrkit.pipelines import arrow_coder

    arrow_coder.register()
    assert isinstance(beam.coders.registry.get_coder(pa.RecordBatch), RecordBatchCoder)


def _tft_output_batch(rows: int, first_line: int = 3) -> tuple[pa.RecordBatch, dict]:
    ids = pa.ListArray.from_arrays(pa.array(np.arange(rows + 1), type=pa.int32()),
                                   pa.array(np.arange(rows), type=pa.int64()))
    one = lambda v: pa.ListArray.from_arrays(pa.array(np.arange(rows + 1), type=pa.int32()),  # noqa: E731
                                              pa.array(np.full(rows, v), type=pa.int64()))
    batch = pa.RecordBatch.from_arrays([ids, one(0), one(0), one(first_line)],
                                       names=["C1", "__window", "__file", "__line"])
    return batch, {}


def test_shard_writer_writes_every_row_of_every_batch(tmp_path):
    import tensorflow as tf

    from ctrkit.pipelines.beam_pipeline import _WriteShards

    fn = _WriteShards(str(tmp_path))
    fn.setup()
    out = [json for i in range(3) for json in fn.process(_tft_output_batch(100 + i, first_line=1 + 1000 * i))]
    fn.finish_bundle()
    fn.teardown()
    assert len(out) == 3
    shards = sorted(tf.io.gfile.glob(str(tmp_path / "data" / "*" / "*.tfrecord.gz")))
    assert len(shards) == 3
    rows = [sum(1 for _ in tf.data.TFRecordDataset(s, compression_type="GZIP")) for s in shards]
    assert rows == [100, 101, 102]


def test_shard_writer_failure_fails_the_bundle(tmp_path, monkeypatch):
    from ctrkit.pipelines import beam_pipeline

    def broken(encoder, batch, path):
        raise OSError(f"disk full writing {path}")

    monkeypatch.setattr(beam_pipeline, "_encode_and_write", broken)
    fn = beam_pipeline._WriteShards(str(tmp_path))
    fn.setup()
    list(fn.process(_tft_output_batch(10)))
    with pytest.raises(OSError, match="disk full writing .*part-00000-000000000003"):
        fn.finish_bundle()
    fn.teardown()


@pytest.mark.parametrize("analyze_windows", [None, 1])
def test_the_transform_read_has_one_consumer_so_the_runner_streams_it(tmp_path, analyze_windows):
    """The transform's read and windowing feed the transform only; analysis reads the files again. With
    `analyze_windows` the span filter consumed the transform's read, and the local runner then held every
    parsed batch of the input in memory (5.2 GiB at 1.6M rows against 1.8 without the option)."""
    import apache_beam as beam

    from ctrkit.pipelines.beam_pipeline import build_pipeline
    from ctrkit.schema import DataConfig

    config = DataConfig(window_rows=100, analyze_windows=analyze_windows)
    pipeline = beam.Pipeline()
    build_pipeline(pipeline, config, [(0, str(tmp_path / "in.tsv"), 0)], str(tmp_path / "out"), str(tmp_path / "tmp"))
    consumers: dict = {}
    producers: dict = {}

    class Visitor(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            for pcoll in node.inputs:
                consumers.setdefault(pcoll, []).append(node.full_label)
            for tag, pcoll in node.outputs.items():
                if tag not in ("rejected", "stats"):  # the side outputs (rejected rows, counts) go elsewhere
                    producers[pcoll] = node.full_label

    pipeline.visit(Visitor())
    transform_read = [p for p, label in producers.items() if label.split("/")[0] in ("Read", "Window")]
    assert transform_read
    for pcoll in transform_read:
        outside = {c.split("/")[0] for c in consumers.get(pcoll, [])} - {"Read", "Window", "Transform"}
        assert not outside, f"{producers[pcoll]} is also read by {sorted(outside)}"
    if analyze_windows:
        span = next(label for label in producers.values() if label.startswith("AnalysisSpan"))
        span_inputs = [p for p, labels in consumers.items() if any(l.startswith("AnalysisSpan") for l in labels)]
        assert all(producers[p].startswith("WindowForAnalysis") for p in span_inputs), (span, span_inputs)
