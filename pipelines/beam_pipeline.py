"""The Beam graph: read → validate → window → analyze (TFT) → transform (TFT) → write shards.

Composable pieces for users building their own pipelines:

* :class:`ReadRawLogs` — files → clean Arrow batches (main output) + rejected rows (``"rejected"``) +
  per-file statistics (``"stats"``); Beam counters ``ctrkit/rows_read``, ``ctrkit/rows_rejected``.
* :class:`ToWindowedTFTBatches` — clean batches → TFT-layout batches, one window per batch.
* :class:`WriteWindowShards` — TFT output record batches → ``data/<window>/part-*.tfrecord.gz``; emits one
  JSON record per shard (window, path, rows).
* :func:`build_pipeline` wires them with TFT's ``AnalyzeDataset``/``TransformDataset`` and is what
  :func:`ctrkit.pipelines.preprocess` runs.
"""
from __future__ import annotations

import json
import logging
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa

from ctrkit.pipelines import arrow_coder
from ctrkit.schema import DataConfig

log = logging.getLogger("ctrkit.pipelines")
NAMESPACE = "ctrkit"
SHARDS_DIR = "_shards"
STATS_DIR = "_stats"


def window_name(index: int) -> str:
    return f"w{index:08d}"


def window_ids(clean: pa.RecordBatch, config: DataConfig, line_offset: int) -> np.ndarray:
    """Window index of every row: epoch-aligned timestamp windows, else input position // window_rows."""
    ts = config.timestamp
    if ts is not None:
        return clean.column(ts).to_numpy() // config.window_seconds
    # Position in the input (all files, header excluded), counting rejected rows too, so windows hold
    # the same span of the log whatever gets rejected.
    first = 2 if (config.format == "csv" and config.header) else 1
    pos = clean.column("__line").to_numpy() - first + line_offset
    return pos // config.window_rows


def report_progress(progress_dir: str, name: str, rows: int) -> None:
    """Record ``rows`` done under ``name`` for the driver's progress bar (a local run's workers share its disk)."""
    path = os.path.join(progress_dir, name)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(str(rows))
    os.replace(path + ".tmp", path)


class _ReadFile(beam.DoFn):
    def __init__(self, config: DataConfig, count: bool = True, progress_dir: str | None = None):
        self._config = config
        self._count = count
        self._progress_dir = progress_dir
        self._read = beam.metrics.Metrics.counter(NAMESPACE, "rows_read")
        self._rejected = beam.metrics.Metrics.counter(NAMESPACE, "rows_rejected")
        self._valid = beam.metrics.Metrics.counter(NAMESPACE, "rows_valid")
        self._padded = beam.metrics.Metrics.counter(NAMESPACE, "rows_padded")

    def process(self, element):
        index, path, line_offset = element
        counts = {"rows_padded": 0}
        # The reader's warnings (an unterminated quote swallowing lines) go to the worker's log, which the
        # driver never shows (a child process, a remote worker): they travel with the file's stats.
        warnings = _WarningsKept()
        reading_log = logging.getLogger("ctrkit.pipelines.reading")
        reading_log.addHandler(warnings)
        try:
            yield from self._read_file(index, path, line_offset, counts, warnings)
        finally:
            reading_log.removeHandler(warnings)

    def _read_file(self, index, path, line_offset, counts, warnings):
        from ctrkit.pipelines.reading import read_file

        n_valid = n_rejected = 0
        for clean, rejected in read_file(path, index, self._config, counts):
            n_valid += clean.num_rows
            n_rejected += len(rejected)
            if self._count:
                self._read.inc(clean.num_rows + len(rejected))
                self._valid.inc(clean.num_rows)
                self._rejected.inc(len(rejected))
            if self._progress_dir:
                report_progress(self._progress_dir, f"{'read' if self._count else 'analyze'}-{index}",
                                n_valid + n_rejected)
            if clean.num_rows:
                yield clean, line_offset
            for r in rejected:
                yield beam.pvalue.TaggedOutput("rejected", r.to_dict())
        n_padded = counts["rows_padded"]
        if self._count:
            self._padded.inc(n_padded)
        if n_padded and n_padded == n_valid:
            # A headerless log that lost a column reads every row short, and each field after the lost one
            # lands in the column before it: padding alone would say nothing but a count in the summary.
            warnings.messages.append(
                f"{path}: every row ({n_padded}) had fewer fields than data.columns ({len(self._config.columns)}) "
                "and was padded with missing values. If the log lost a column, the fields after it were read "
                "into the wrong columns: check its layout against data.columns (data.short_rows: reject refuses "
                "short rows instead)")
        log.info("ctrkit preprocess: read %s: %d rows, %d valid (%d of them short rows padded), %d rejected",
                 path, n_valid + n_rejected, n_valid, n_padded, n_rejected)
        yield beam.pvalue.TaggedOutput("stats", {"file": path, "rows_read": n_valid + n_rejected,
                                                 "rows_valid": n_valid, "rows_rejected": n_rejected,
                                                 "rows_padded": n_padded, "pid": os.getpid(),
                                                 "warnings": warnings.messages})


class _WarningsKept(logging.Handler):
    """Keeps the messages of WARNING and above (the first 20 of them)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.messages) < 20:
            self.messages.append(record.getMessage())


def checked_file_list(files: list) -> list[tuple[int, str, int]]:
    """The input tuples of :class:`ReadRawLogs`, checked: each a ``(file_index, path, line_offset)`` and
    each file index used once, in index order.

    Shards are named by file index and first line, so two files under one index would write over each
    other's shards while the row counters still counted every row.
    """
    checked: dict[int, tuple[int, str, int]] = {}
    for element in files:
        if not (isinstance(element, (tuple, list)) and len(element) == 3 and isinstance(element[1], str)
                and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in element[::2])):
            raise ValueError(f"ReadRawLogs takes (file_index, path, line_offset) tuples, one per input file; got "
                             f"{element!r}. Build them with ctrkit.pipelines.file_tuples(config, paths)")
        index, path, line_offset = int(element[0]), element[1], int(element[2])
        if index in checked:
            both = sorted([checked[index][1], path])  # the list arrives in no fixed order
            raise ValueError(f"ReadRawLogs: file index {index} is given to both {both[0]!r} and {both[1]!r}; "
                             "each input file needs an index of its own, because shards are named by it (two files "
                             "under one index overwrite each other's shards). Build the tuples with "
                             "ctrkit.pipelines.file_tuples(config, paths)")
        checked[index] = (index, path, line_offset)
    return [checked[i] for i in sorted(checked)]


class ReadRawLogs(beam.PTransform):
    """``(file_index, path, line_offset)`` tuples → tagged outputs ``clean``, ``rejected``, ``stats``.

    Build the tuples with :func:`~ctrkit.pipelines.runner.file_tuples`; each file needs its own index, which
    the transform checks before it reads anything (see :func:`checked_file_list`). ``clean`` elements are
    ``(record_batch, line_offset)``; a file is read by one worker, files in parallel. ``rejected`` holds one
    JSON-able dict per rejected row (file, line, the raw row, and a reason that names the field) and
    ``stats`` one per file: write both somewhere a user finds them, as :func:`build_pipeline` does under
    ``rejected/`` and ``_stats/``. ``count=False`` leaves the Beam row counters alone, for a second read of
    the same files.
    ``progress_dir`` (local runs only): where each file's rows read so far are recorded for a progress bar.
    """

    def __init__(self, config: DataConfig, count: bool = True, progress_dir: str | None = None):
        super().__init__()
        self._config = config
        self._count = count
        self._progress_dir = progress_dir

    def expand(self, files):
        return (
            files
            # One global list first, so a clash fails the job before any file is read (no side input: the
            # FnApiRunner fails to schedule those next to TFT's).
            | "CheckFiles" >> beam.combiners.ToList()
            | "OneFileEach" >> beam.FlatMap(checked_file_list)
            | "SpreadFiles" >> beam.Reshuffle()
            | "ReadAndValidate" >> beam.ParDo(_ReadFile(self._config, self._count, self._progress_dir))
            .with_output_types(tuple[pa.RecordBatch, int])
            .with_outputs("rejected", "stats", main="clean")
        )


class ToWindowedTFTBatches(beam.PTransform):
    """``(clean_batch, line_offset)`` → TFT-layout record batches, each holding rows of one window.

    TFT reads them with :func:`~ctrkit.pipelines.transform.tensor_adapter_config`; their window, file and line
    columns (:data:`~ctrkit.pipelines.transform.PASSTHROUGH`) must pass through it for
    :class:`WriteWindowShards` (see there).
    """

    def __init__(self, config: DataConfig):
        super().__init__()
        self._config = config

    def expand(self, pcoll):
        config = self._config

        def split(element):
            from ctrkit.pipelines.transform import to_tft_batch

            clean, line_offset = element
            windows = window_ids(clean, config, line_offset)
            uniq = np.unique(windows)
            if len(uniq) == 1:
                yield to_tft_batch(clean, config, windows)
                return
            for w in uniq:
                idx = np.flatnonzero(windows == w)
                yield to_tft_batch(clean.take(pa.array(idx)), config, windows[idx])

        return pcoll | "SplitByWindow" >> beam.FlatMap(split).with_output_types(pa.RecordBatch)


class KeepAnalysisWindows(beam.PTransform):
    """TFT-layout batches (from :class:`ToWindowedTFTBatches`) → only those of the windows TFT analyzes.

    ``data.analyze_windows = N`` fits vocabularies and statistics on the first N windows only, so later
    windows are transformed with what was known before them. The preprocessing function cannot see windows,
    so a pipeline of your own applies this to what it analyzes (not to what it transforms); with
    ``analyze_windows`` unset every batch passes.

    Args:
        config: the ``data:`` section.
        window_ids: the windows to keep. Row-count windows default to the first N; timestamp windows need
            them from :func:`~ctrkit.pipelines.runner.analysis_windows` (read on the driver).
    """

    def __init__(self, config: DataConfig, window_ids: list[int] | None = None):
        super().__init__()
        if config.analyze_windows is not None and window_ids is None:
            if config.timestamp is not None:
                raise ValueError("analyze_windows with a timestamp column needs window_ids: pass "
                                 "ctrkit.pipelines.analysis_windows(config, paths)")
            window_ids = list(range(config.analyze_windows))
        self._keep = None if config.analyze_windows is None else frozenset(int(w) for w in window_ids)

    def expand(self, pcoll):
        if self._keep is None:
            return pcoll
        keep = self._keep
        return pcoll | "InAnalysisSpan" >> beam.Filter(lambda b: set(_batch_windows(b)) <= keep)


def _batch_windows(batch: pa.RecordBatch) -> list[int]:
    return np.unique(batch.column("__window").flatten().to_numpy()).tolist()


def _encode_and_write(encoder, batch: pa.RecordBatch, path: str) -> int:
    from ctrkit.pipelines.tfrecord import write_gzip_tfrecords

    records = encoder.encode(batch)
    write_gzip_tfrecords(path, records)
    return len(records)


_HOW_TO_RUN_TFT = ("Run TFT inside tft_beam.Context(passthrough_keys=set(ctrkit.pipelines.PASSTHROUGH)) and feed it "
                   "(batches, ctrkit.pipelines.tensor_adapter_config(config)) with output_record_batches=True")


class _WriteShards(beam.DoFn):
    """Encodes each window's rows as tf.Examples and writes them as one gzip TFRecord shard.

    Encoding (tfx_bsl, C++) and zlib both release the GIL, so shards are encoded and written on a
    background thread while this bundle's thread goes on transforming the next batch: on the default
    single-process runner that puts the otherwise idle second core to work (1M Criteo rows: ~18 of
    ~65 CPU seconds move off the pipeline thread). At most ``_MAX_PENDING`` shards wait in memory, and
    ``finish_bundle`` waits for every write (and re-raises its error), so a bundle only commits once
    its files are on disk.
    """

    _MAX_PENDING = 4

    def __init__(self, output_dir: str):
        self._out = output_dir
        self._written = beam.metrics.Metrics.counter(NAMESPACE, "rows_written")

    def setup(self):
        from concurrent.futures import ThreadPoolExecutor

        from tfx_bsl.coders import example_coder

        self._encoder = example_coder.RecordBatchToExamplesEncoder()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ctrkit-shard-writer")
        self._pending = []

    def _collect(self, keep: int) -> None:
        # Counters are bundle-scoped and thread-local to the bundle's thread, so they are bumped here.
        while len(self._pending) > keep:
            self._written.inc(self._pending.pop(0).result())

    def process(self, element):
        import tensorflow as tf

        from ctrkit.pipelines.transform import PASSTHROUGH

        if not (isinstance(element, tuple) and len(element) == 2 and isinstance(element[0], pa.RecordBatch)):
            # TFT's default output is one dict of arrays per row.
            raise ValueError(f"WriteWindowShards takes TFT's (record_batch, passthrough) pairs, got a "
                             f"{type(element).__name__}. {_HOW_TO_RUN_TFT}")
        batch, _unary = element
        missing = [name for name in PASSTHROUGH if name not in batch.schema.names]
        if missing:
            raise ValueError(
                f"WriteWindowShards: the transformed batches lack the columns {missing}, which say where each row "
                f"goes. {_HOW_TO_RUN_TFT}")
        windows = batch.column("__window").flatten().to_numpy()
        files = batch.column("__file").flatten().to_numpy()
        lines = batch.column("__line").flatten().to_numpy()
        keep = [i for i, f in enumerate(batch.schema.names) if f not in PASSTHROUGH]
        features = pa.RecordBatch.from_arrays([batch.column(i) for i in keep],
                                              names=[batch.schema.names[i] for i in keep])
        for w in np.unique(windows):
            idx = np.flatnonzero(windows == w)
            sub = features if len(idx) == features.num_rows else features.take(pa.array(idx))
            # Input order (file, first line) names the shard, so sorting names replays the log in order.
            rel = os.path.join("data", window_name(int(w)),
                               f"part-{int(files[idx[0]]):05d}-{int(lines[idx[0]]):012d}.tfrecord.gz")
            path = os.path.join(self._out, rel)
            tf.io.gfile.makedirs(os.path.dirname(path))
            self._collect(self._MAX_PENDING - 1)
            self._pending.append(self._pool.submit(_encode_and_write, self._encoder, sub, path))
            yield json.dumps({"window": int(w), "shard": rel, "rows": sub.num_rows,
                              "file": int(files[idx[0]]), "line": int(lines[idx[0]])})

    def finish_bundle(self):
        self._collect(0)

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class WriteWindowShards(beam.PTransform):
    """TFT output ``(record_batch, unary_passthrough)`` → gzip TFRecord shards; emits shard JSON lines.

    ``output_dir`` is the root of a pipeline output: shards go to ``output_dir/data/<window>/part-*.tfrecord.gz``
    and the shard lines name them relative to it.

    The record batches must still carry the columns :data:`~ctrkit.pipelines.transform.PASSTHROUGH`
    (``__window``, ``__file``, ``__line``) that :class:`ToWindowedTFTBatches` adds: they say which window and
    shard a row goes to. TFT drops them unless it runs in ``tft_beam.Context(passthrough_keys=...)`` and reads
    the batches through :func:`~ctrkit.pipelines.transform.tensor_adapter_config`, with
    ``output_record_batches=True``. The shards are what a pipeline output holds under ``data/``; the
    ``manifest.json`` that ``ctrkit train`` reads is written by :func:`ctrkit.pipelines.preprocess` after the
    job, from these shard lines and the row counts, so a pipeline of your own that should feed the trainer
    runs through ``preprocess``. Example (a complete analyze-and-transform job)::

        import json
        import os
        import tempfile

        import apache_beam as beam
        import tensorflow_transform.beam as tft_beam
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        from ctrkit.config import load_config
        from ctrkit.pipelines import (PASSTHROUGH, KeepAnalysisWindows, ReadRawLogs, ToWindowedTFTBatches,
                                      WriteWindowShards, file_tuples, make_preprocessing_fn, tensor_adapter_config)

        data = load_config("small").data
        tmp, out_dir = tempfile.mkdtemp(), "/abs/prep"  # TFT's scratch space; the output root (shards: data/<window>/)
        files = file_tuples(data, ["/abs/day1.tsv", "/abs/day2.tsv"])  # (file index, path, line offset), time order
        # FnApiRunner: Beam's default DirectRunner first tries to download the Prism runner.
        with beam.Pipeline(runner=FnApiRunner()) as p, \
                tft_beam.Context(temp_dir=tmp, passthrough_keys=set(PASSTHROUGH), force_tf_compat_v1=True):
            file_list = p | beam.Create(files)
            read = file_list | "Read" >> ReadRawLogs(data)
            batches = read.clean | "Window" >> ToWindowedTFTBatches(data)
            # Analyze a second read, narrowed to data.analyze_windows (if set); sharing `batches` works too.
            to_analyze = (file_list | "ReadForAnalysis" >> ReadRawLogs(data, count=False)).clean \
                | "WindowForAnalysis" >> ToWindowedTFTBatches(data) | KeepAnalysisWindows(data)
            adapter = tensor_adapter_config(data)
            transform_fn = (to_analyze, adapter) | tft_beam.AnalyzeDataset(make_preprocessing_fn(data))
            transformed, _ = ((batches, adapter), transform_fn) | tft_beam.TransformDataset(output_record_batches=True)
            shard_lines = transformed | WriteWindowShards(out_dir)
            _ = transform_fn | tft_beam.WriteTransformFn(out_dir)
            _ = (read.rejected | "RejectedJson" >> beam.Map(json.dumps)  # every rejected row, with its reason
                 | beam.io.WriteToText(os.path.join(out_dir, "rejected", "part"), file_name_suffix=".jsonl"))

    ``force_tf_compat_v1=True`` traces as ``ctrkit preprocess`` does, so ``ctrkit preprocess --transform-fn``
    can re-apply the saved ``transform_fn``; to re-apply a saved one in your own ``TransformDataset``, run it
    in ``tft_beam.Context(force_tf_compat_v1=ctrkit.pipelines.saved_with_tf1_tags(that_output_dir))``.
    """

    def __init__(self, output_dir: str):
        super().__init__()
        self._out = output_dir

    def expand(self, pcoll):
        return pcoll | "EncodeAndWrite" >> beam.ParDo(_WriteShards(self._out))


def build_pipeline(pipeline: beam.Pipeline, config: DataConfig, files: list[tuple[int, str, int]],
                   output_dir: str, temp_dir: str, transform_fn_dir: str | None = None,
                   vocabulary: str = "arrow", tf_compat_v1: bool = True,
                   analyze_window_ids: list[int] | None = None, progress_dir: str | None = None) -> None:
    """Add the whole preprocessing job to ``pipeline``; outputs land under ``output_dir``.

    ``files`` holds ``(file_index, path, line_offset)`` tuples (see :func:`~ctrkit.pipelines.runner.file_tuples`);
    ``analyze_window_ids`` the windows TFT analyzes when ``config.analyze_windows`` is set (row-count
    windows default to the first N; see ``runner.analysis_windows``).
    """
    from ctrkit.runtime import import_tft

    tft = import_tft()
    import tensorflow_transform.beam as tft_beam

    from ctrkit.pipelines.analyzers import CountVocabularies
    from ctrkit.pipelines.transform import (
        PASSTHROUGH,
        make_preprocessing_fn,
        raw_feature_spec,
        tensor_adapter_config,
        vocabulary_count_columns,
    )

    # TF1-compat tracing: measured here at 36 s vs 62 s for 100k rows, the difference being TF2
    # tf.function tracing and SavedModel writing of the 40-column graph (done twice by TFT). The saved
    # transform_fn still loads in TF2 (TFTransformOutput.transform_features_layer), checked by the tests.
    arrow_coder.register()
    with tft_beam.Context(temp_dir=temp_dir, passthrough_keys=set(PASSTHROUGH), force_tf_compat_v1=tf_compat_v1):
        file_list = pipeline | "Files" >> beam.Create(files)
        read = file_list | "Read" >> ReadRawLogs(config, progress_dir=progress_dir)
        batches = read.clean | "Window" >> ToWindowedTFTBatches(config)
        adapter = tensor_adapter_config(config)

        if transform_fn_dir is None:
            # Analysis reads the files a second time rather than sharing `batches` with the transform:
            # sharing forces the runner to materialize every parsed batch between the two stages
            # (pickle + copies: ~12 s of a 1M-row run), while parsing again costs ~3 s. The transform's
            # read stays the one that counts rows and reports rejects.
            to_analyze = (file_list | "ReadForAnalysis" >> ReadRawLogs(config, count=False,
                                                                     progress_dir=progress_dir)).clean \
                | "WindowForAnalysis" >> ToWindowedTFTBatches(config)
            if config.analyze_windows is not None:
                # Filter the analysis read, not `batches`: a second consumer of the transform's read makes the
                # local runner hold every parsed batch (2.5 GiB per 1M Criteo rows, measured).
                to_analyze = to_analyze | "AnalysisSpan" >> KeepAnalysisWindows(config, analyze_window_ids)
            counts = None
            if vocabulary == "arrow" and vocabulary_count_columns(config):
                counts = to_analyze | "CountVocabularies" >> CountVocabularies(vocabulary_count_columns(config))
            transform_fn = (to_analyze, adapter) | "Analyze" >> tft_beam.AnalyzeDataset(
                make_preprocessing_fn(config, vocabulary, counts))
        else:
            transform_fn = pipeline | "ReadTransformFn" >> tft_beam.ReadTransformFn(transform_fn_dir)

        transformed, _metadata = ((batches, adapter), transform_fn) | "Transform" >> tft_beam.TransformDataset(
            output_record_batches=True)
        shards = transformed | "Write" >> WriteWindowShards(output_dir)
        _ = shards | "ShardIndex" >> beam.io.WriteToText(os.path.join(output_dir, SHARDS_DIR, "part"),
                                                          file_name_suffix=".jsonl")
        _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(output_dir)
        raw_metadata = tft.DatasetMetadata.from_feature_spec(raw_feature_spec(config))
        # raw_metadata/ is the data contract's name; tft.TFTransformOutput.raw_feature_spec() reads
        # metadata/ (its RAW_METADATA_DIR), so the same few-KB schema is written to both.
        for sub in ("raw_metadata", "metadata"):
            _ = raw_metadata | f"Write_{sub}" >> tft_beam.WriteMetadata(os.path.join(output_dir, sub), pipeline)
        _ = (read.rejected | "RejectedJson" >> beam.Map(json.dumps)
             | "WriteRejected" >> beam.io.WriteToText(os.path.join(output_dir, "rejected", "part"),
                                                      file_name_suffix=".jsonl"))
        _ = (read.stats | "StatsJson" >> beam.Map(json.dumps)
             | "WriteStats" >> beam.io.WriteToText(os.path.join(output_dir, STATS_DIR, "part"),
                                                   file_name_suffix=".jsonl"))
