"""End-to-end runs of ctrkit.pipelines (each configuration runs once per session: a TFT run costs ~30 s).

Runs: the CLI on a small generated TSV with two worker processes; the same input through the textbook TFT
vocabulary analyzers; CSV and Parquet copies; a later span through the saved transform_fn; a file of bad
rows plus the real Criteo sample (short rows rejected); the Criteo sample with short rows padded.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import logging
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet  # noqa: F401 - pa.parquet
import pytest
import yaml

from ctrkit import synthetic
from ctrkit.config import load_config
from ctrkit.errors import InputError
from ctrkit.manifest import Manifest
from ctrkit.schema import ColumnSpec, DataConfig, criteo_columns

pytestmark = pytest.mark.slow
N_ROWS = 3000
# As in conftest.py (the criteo_sample fixture skips without it; second_log stands in a generated log).
CRITEO_SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "shared", "data", "criteo_kaggle_head", "train_head.txt")
WINDOW_ROWS = 1500


def _columns() -> list[ColumnSpec]:
    cols = {c.name: c for c in criteo_columns()}
    cols["I3"].zscore = False
    cols["I5"].buckets = 4
    cols["C1"].top_k = 3
    cols["C2"].frequency_threshold = 40
    cols["C25"].oov_buckets = 3
    cols["C26"].encoding, cols["C26"].hash_buckets = "hash", 50
    return list(cols.values())


def _data_config(**kw) -> DataConfig:
    return DataConfig(columns=_columns(), window_rows=WINDOW_ROWS, **kw)


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="session")
def raw(work):
    table = synthetic.generate(N_ROWS, seed=11, timestamp=True)  # the timestamp goes to Parquet only
    later = synthetic.generate(800, seed=12, timestamp=False, vocab_scale=0.02)  # bigger vocab: unseen ids
    paths = {
        "tsv": synthetic.write_tsv(table, str(work / "span1.tsv")),
        "csv": synthetic.write_csv(table.drop_columns(["timestamp"]), str(work / "span1.csv")),
        "parquet": synthetic.write_parquet(table, str(work / "span1.parquet")),
        "later": synthetic.write_tsv(later, str(work / "span2.tsv.gz"), gzip=True),
        # The same span as the next day's log might come: CSV, columns in another order, one more unused column.
        "later_csv": synthetic.write_csv(later.append_column("note", pa.array(["x"] * later.num_rows)),
                                         str(work / "span2.csv.gz"), gzip=True, columns=_LATER_ORDER),
    }
    config = {"data": {"window_rows": WINDOW_ROWS,
                       "columns": [{k: v for k, v in vars(c).items()} for c in _columns()]}}
    paths["config"] = str(work / "config.yaml")
    with open(paths["config"], "w") as f:
        yaml.safe_dump(config, f)
    return paths


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctrkit.cli", "preprocess", *args], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=600)


@pytest.fixture(scope="session")
def cli_run(raw, work):
    out = str(work / "out_cli")
    proc = _cli("--config", raw["config"], "--input", raw["tsv"], "--output", out,
                "--direct_num_workers=2", "--direct_running_mode=multi_processing")
    return proc, out


@pytest.fixture(scope="session")
def tsv_out(cli_run):
    proc, out = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _run(work, name, inputs, config, **kw) -> str:
    from ctrkit.pipelines import preprocess

    out = str(work / name)
    preprocess(config, inputs, out, **kw)
    return out


@pytest.fixture(scope="session")
def textbook_out(raw, work):
    return _run(work, "out_textbook", [raw["tsv"]], _data_config(), vocabulary="tft")


@pytest.fixture(scope="session")
def parquet_out(raw, work):
    """Parquet with a timestamp column: windows are days instead of row counts."""
    config = DataConfig(format="parquet", columns=_columns() + [ColumnSpec("timestamp", kind="timestamp")],
                        window_seconds=86_400)
    return _run(work, "out_parquet", [raw["parquet"]], config)


_LATER_ORDER = ["note", *synthetic.CATEGORICAL[::-1], "label", *synthetic.NUMERIC]


@pytest.fixture(scope="session")
def apply_out(raw, work, tsv_out):
    """The later span through the first span's transform_fn, from a CSV whose columns are reordered and which
    has an unused one: the transform reads its columns by name, so it still applies."""
    columns = {c.name: c for c in _columns()}
    columns["note"] = ColumnSpec("note", kind="ignore")
    config = DataConfig(format="csv", columns=[columns[n] for n in _LATER_ORDER], window_rows=WINDOW_ROWS)
    return _run(work, "out_apply", [raw["later_csv"]], config, transform_fn_dir=tsv_out)


def decode(out: str) -> tuple[Manifest, dict[str, list]]:
    """All transformed rows of an output, in manifest (time) order."""
    import tensorflow as tf

    m = Manifest.load(out)
    spec = m.transformed_feature_spec()
    rows: dict[str, list] = collections.defaultdict(list)
    for w in m.windows:
        for path in m.shard_paths(w):
            for rec in tf.data.TFRecordDataset(path, compression_type="GZIP").batch(100_000):
                parsed = tf.io.parse_example(rec, spec)
                for k, v in parsed.items():
                    if isinstance(v, tf.SparseTensor):
                        rows[k].extend(tf.RaggedTensor.from_sparse(v).to_list())
                    else:
                        rows[k].extend(v.numpy().tolist())
    return m, dict(rows)


def _vocab(out: str, column: str) -> list[bytes]:
    with open(os.path.join(out, "transform_fn", "assets", f"vocab_{column}"), "rb") as f:
        return f.read().splitlines()


def _raw_table(path: str) -> pa.Table:
    names = ["label", *synthetic.NUMERIC, *synthetic.CATEGORICAL]
    return pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=names),
                          parse_options=pacsv.ParseOptions(delimiter="\t"),
                          convert_options=pacsv.ConvertOptions(
                              column_types={**{n: pa.float64() for n in names[:14]},
                                            **{n: pa.string() for n in names[14:]}}, strings_can_be_null=True))


# -- the contract ---------------------------------------------------------------------------------------
def test_cli_exits_zero_and_writes_the_contract(cli_run, tsv_out, work):
    proc, out = cli_run
    assert f"{N_ROWS} rows in 2 windows, 0 rejected (of {N_ROWS} read), 0 short rows padded" in proc.stdout
    assert "rows read" in proc.stderr  # progress: rows read / rejected per stage
    m = Manifest.load(out)
    for sub in ("transform_fn", "transformed_metadata", "raw_metadata", "rejected"):
        assert os.path.isdir(os.path.join(out, sub)), sub
    assert [w.name for w in m.windows] == ["w00000000", "w00000001"]
    assert [w.rows for w in m.windows] == [WINDOW_ROWS, N_ROWS - WINDOW_ROWS]
    assert m.rows_read == m.rows_written == N_ROWS and m.rows_rejected == 0
    assert all(os.path.exists(p) for w in m.windows for p in m.shard_paths(w))
    # No temporary directories left beside the output.
    assert not [p for p in os.listdir(work) if p.startswith(".out_cli.tmp")]
    assert not os.path.exists(os.path.join(out, "_shards")) and not os.path.exists(os.path.join(out, "_tft_tmp"))
    names = {f.name: f for f in m.features}
    assert names["C26"].vocab_size == 50 and names["I5_bucket"].vocab_size == 4
    assert names["C1"].vocab_size == 3 + 1 and names["C25"].vocab_size == len(_vocab(out, "C25")) + 3


def test_serving_transform_graph_reproduces_the_written_rows(raw, tsv_out):
    """transform_fn/ loads in TF2 (as the exporter uses it) and maps raw rows to exactly what was written."""
    import tensorflow as tf
    import tensorflow_transform as tft

    tf_out = tft.TFTransformOutput(tsv_out)
    assert set(tf_out.raw_feature_spec()) == {"label", *synthetic.NUMERIC, *synthetic.CATEGORICAL}
    assert set(tf_out.transformed_feature_spec()) == set(Manifest.load(tsv_out).transformed_feature_spec())
    t = _raw_table(raw["tsv"]).slice(0, 64)
    feats = {}
    for name in t.column_names:
        col = t[name]
        if name == "label":
            feats[name] = tf.constant(col.to_numpy(), tf.float32)
            continue
        dtype = tf.string if name.startswith("C") else tf.float32
        values = [[] if v is None else [v] for v in col.to_pylist()]
        feats[name] = tf.ragged.constant(values, dtype=dtype, row_splits_dtype=tf.int64).to_sparse()
    served = tf_out.transform_features_layer()(feats)
    _, rows = decode(tsv_out)
    for name, value in served.items():
        got = value.numpy().reshape(-1).tolist()
        if name in ("I2", "I7"):
            np.testing.assert_allclose(got, rows[name][:64], rtol=1e-6)
        else:
            assert got == rows[name][:64], name


def test_pipeline_options_reach_beam(tsv_out):
    m = Manifest.load(tsv_out)
    opts = m.config["pipeline_options"]
    assert opts["direct_num_workers"] == 2 and opts["direct_running_mode"] == "multi_processing"
    assert m.config["runner"] == "FnApiRunner"
    # multi_processing really happened: the reading DoFn ran in a worker process, not the driver.
    assert m.config["reader_pids"] and m.config["driver_pid"] not in m.config["reader_pids"]


# -- golden: the transforms against NumPy -----------------------------------------------------------------
def _expected_vocab(values: list, top_k=None, threshold=1) -> list[bytes]:
    counts = collections.Counter(v.encode() for v in values if v)
    items = sorted(((c, t) for t, c in counts.items() if c >= threshold), reverse=True)
    return [t for _, t in items][:top_k]


def test_golden_against_numpy(raw, tsv_out):
    t = _raw_table(raw["tsv"])
    m, rows = decode(tsv_out)
    # Vocabularies: exact, with top_k and frequency_threshold applied.
    for col, top_k, threshold in (("C1", 3, 1), ("C2", None, 40), ("C7", None, 1), ("C3", None, 1)):
        expected = _expected_vocab(t[col].to_pylist(), top_k, threshold)
        assert _vocab(tsv_out, col) == expected, col
        index = {tok.decode(): i for i, tok in enumerate(expected)}
        ids = np.array(rows[col])
        known = np.array([v in index for v in t[col].fill_null("").to_pylist()])
        assert [index[v] for v in np.array(t[col].fill_null("").to_pylist())[known]] == ids[known].tolist()
        assert np.all((ids[~known] >= len(expected)) & (ids[~known] < m.vocab_sizes()[col]))
    # Numeric: fill 0, log1p(max(x, 0)), z-score with population statistics.
    for col in ("I2", "I7"):
        x = np.log1p(np.maximum(np.nan_to_num(t[col].to_numpy(zero_copy_only=False), nan=0.0), 0.0))
        np.testing.assert_allclose(rows[col], (x - x.mean()) / x.std(), rtol=1e-4, atol=1e-4)
    x3 = np.log1p(np.maximum(np.nan_to_num(t["I3"].to_numpy(zero_copy_only=False), nan=0.0), 0.0))
    np.testing.assert_allclose(rows["I3"], x3, rtol=1e-6)  # zscore: false
    # Quantile buckets: TFT's quantiles are approximate (rank error up to its epsilon); on this column, whose
    # values are logs of integers with gaps between them, every row lands in NumPy's exact quartile (measured:
    # all 3000). 0.999 leaves room for 3 rows; 0.97 let 90 rows sit in the wrong bucket.
    x5 = np.log1p(np.maximum(np.nan_to_num(t["I5"].to_numpy(zero_copy_only=False), nan=0.0), 0.0))
    edges = np.quantile(x5, [0.25, 0.5, 0.75])
    expected_b = np.searchsorted(edges, x5, side="right")
    got_b = np.array(rows["I5_bucket"])
    assert set(got_b.tolist()) == {0, 1, 2, 3}
    assert np.abs(got_b - expected_b).max() <= 1 and np.mean(got_b == expected_b) >= 0.999
    # Hashing and the label.
    assert 0 <= min(rows["C26"]) and max(rows["C26"]) < 50 and len(set(rows["C26"])) > 5
    assert rows["label"] == t["label"].to_pylist()


def test_same_output_as_textbook_tft_pipeline(tsv_out, textbook_out):
    """The Arrow vocabulary pass writes what tft.compute_and_apply_vocabulary would, bit for bit."""
    for col in ("C1", "C2", "C3", "C25"):
        assert _vocab(tsv_out, col) == _vocab(textbook_out, col), col
    m_fast, fast = decode(tsv_out)
    m_ref, ref = decode(textbook_out)
    assert m_fast.vocab_sizes() == m_ref.vocab_sizes()
    assert fast.keys() == ref.keys()
    for k in fast:
        assert fast[k] == ref[k], k


def test_parquet_input_equals_tsv_and_windows_follow_timestamps(raw, tsv_out, parquet_out):
    _, a = decode(tsv_out)
    m, b = decode(parquet_out)
    # Same rows in the same order; ids exact. Floats equal up to summation order: the statistics were
    # accumulated over per-day batches here and 1500-row batches there.
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k][0], float):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
        else:
            assert a[k] == b[k], k
    ts = pa.parquet.read_table(raw["parquet"], columns=["timestamp"])["timestamp"].to_numpy()
    days, counts = np.unique(ts // 86_400, return_counts=True)
    assert len(days) == 4
    assert [w.name for w in m.windows] == [f"w{d:08d}" for d in days]
    assert [w.rows for w in m.windows] == counts.tolist()
    first = m.windows[0]
    import datetime

    start = datetime.datetime.fromisoformat(first.start).timestamp()
    assert start == days[0] * 86_400 and datetime.datetime.fromisoformat(first.end).timestamp() == start + 86_400
    assert ts.min() >= start


def test_csv_with_header_reads_like_tsv(raw):
    """CSV batches equal the TSV's after reading; everything after reading is shared code, and the
    Parquet run above shows equal read batches give equal transformed output."""
    from ctrkit.pipelines.reading import read_file

    def table(path, config):
        return pa.Table.from_batches([b for b, rej in read_file(path, 0, config) if not rej and b.num_rows])

    tsv = table(raw["tsv"], _data_config())
    csv = table(raw["csv"], _data_config(format="csv"))
    assert csv.num_rows == N_ROWS
    assert csv.drop_columns(["__line"]).equals(tsv.drop_columns(["__line"]))
    assert (np.array(csv["__line"]) == np.array(tsv["__line"]) + 1).all()  # the header is line 1


# -- apply mode -------------------------------------------------------------------------------------------
def test_apply_mode_keeps_ids_and_maps_unseen_to_oov(raw, tsv_out, apply_out):
    m1, m2 = Manifest.load(tsv_out), Manifest.load(apply_out)
    assert m2.vocab_sizes() == m1.vocab_sizes()
    # Numeric features enter the model's x0 in manifest order: the reordered config must not reorder them.
    assert [f.name for f in m2.features] == [f.name for f in m1.features]
    later = _raw_table(raw["later"])
    _, rows = decode(apply_out)
    for col in ("C3", "C4", "C12"):
        vocab = {tok.decode(): i for i, tok in enumerate(_vocab(tsv_out, col))}
        assert _vocab(apply_out, col) == _vocab(tsv_out, col)
        tokens = later[col].fill_null("").to_pylist()
        ids = rows[col]
        seen = [(i, vocab[v]) for v, i in zip(tokens, ids) if v in vocab]
        unseen = [i for v, i in zip(tokens, ids) if v not in vocab]
        assert seen and unseen, col  # the later span has both
        assert all(i == expected for i, expected in seen)
        assert all(len(vocab) <= i < m1.vocab_sizes()[col] for i in unseen)
    # Numeric statistics are the analyzed span's, not the later span's.
    first = _raw_table(raw["tsv"])
    x1 = np.log1p(np.maximum(np.nan_to_num(first["I2"].to_numpy(zero_copy_only=False), nan=0.0), 0.0))
    x2 = np.log1p(np.maximum(np.nan_to_num(later["I2"].to_numpy(zero_copy_only=False), nan=0.0), 0.0))
    np.testing.assert_allclose(rows["I2"], (x2 - x1.mean()) / x1.std(), rtol=1e-4, atol=1e-4)


def test_a_remote_transform_fn_dir_is_checked_where_it_is(tsv_out):
    """--transform-fn gs://... was made absolute as a local path (CWD/gs:/...) and always refused. Here TF's
    in-memory ram:// file system stands in for a bucket."""
    import tensorflow as tf

    from ctrkit.pipelines.runner import _check_transform_fn_dir

    remote = "ram://ctrkit-test-bucket/prep"
    for root, _, names in os.walk(tsv_out):
        rel = os.path.relpath(root, tsv_out)
        target = remote if rel == "." else f"{remote}/{rel}"
        tf.io.gfile.makedirs(target)
        for name in names:
            tf.io.gfile.copy(os.path.join(root, name), f"{target}/{name}", overwrite=True)
    assert _check_transform_fn_dir(remote, _data_config()) == remote
    assert _check_transform_fn_dir(remote + "/transform_fn/", _data_config()) == remote
    with pytest.raises(InputError, match=r"^--transform-fn ram://ctrkit-test-bucket/nothing: no transform_fn/ there"):
        _check_transform_fn_dir("ram://ctrkit-test-bucket/nothing", _data_config())
    with pytest.raises(Exception, match="other data.columns"):
        _check_transform_fn_dir(remote, DataConfig(columns=_columns()[:-1], window_rows=WINDOW_ROWS))


def _shard_records(out: str) -> dict[str, list[dict]]:
    """Every shard's tf.Examples as {feature: values}, by shard name (a feature map's byte order varies)."""
    import tensorflow as tf

    records = {}
    for path in sorted(glob.glob(os.path.join(out, "data", "*", "*.tfrecord.gz"))):
        examples = [tf.train.Example.FromString(r.numpy())
                    for r in tf.data.TFRecordDataset(path, compression_type="GZIP")]
        records[os.path.relpath(path, out)] = [
            {k: list(getattr(f, f.WhichOneof("kind")).value) for k, f in e.features.feature.items()} for e in examples]
    return records


def test_the_docstring_job_writes_what_preprocess_writes(bad_run, second_log, tmp_path):
    """The complete job in WriteWindowShards' docstring, run as written on two files with bad rows and
    analyze_windows: 1, writes the shards, vocabularies and rejected rows `preprocess` writes. Before, it
    analyzed every window (analyze_windows had no effect outside build_pipeline), dropped the rejected rows,
    and its beam.Pipeline() first tried to download the Prism runner."""
    import textwrap

    from ctrkit.pipelines import WriteWindowShards

    out, bad_path, config = bad_run
    example = WriteWindowShards.__doc__.split("Example (a complete analyze-and-transform job)::")[1]
    example = textwrap.dedent(example.split("\n\n    ``")[0])
    composed = str(tmp_path / "composed")
    code = (example.replace('load_config("small").data', "config").replace('"/abs/prep"', repr(composed))
            .replace('["/abs/day1.tsv", "/abs/day2.tsv"]', repr([bad_path, second_log[0]])))
    assert "/abs/" not in code and "FnApiRunner()" in code
    exec(compile(code, "WriteWindowShards.__doc__", "exec"), {"config": config})

    assert _shard_records(composed) == _shard_records(out) and _shard_records(out)
    assets = sorted(os.listdir(os.path.join(out, "transform_fn", "assets")))
    assert assets == sorted(os.listdir(os.path.join(composed, "transform_fn", "assets")))
    for name in assets:  # analyze_windows: 1 narrowed the vocabularies to the first window in both
        assert _vocab(out, name[len("vocab_"):]) == _vocab(composed, name[len("vocab_"):]), name

    def rejected(where):
        return sorted(json.loads(line)["line"] for f in glob.glob(os.path.join(where, "rejected", "*.jsonl"))
                      for line in open(f, encoding="utf-8"))

    assert rejected(composed) == rejected(out) and len(rejected(out)) == Manifest.load(out).rows_rejected > 0


def test_read_raw_logs_refuses_a_file_index_given_twice(tmp_path):
    """Two sources flattened into ReadRawLogs, each with file index 0: their shards shared names and
    overwrote each other (600 of 1,000 rows lost) while the counters said every row was written."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from ctrkit.pipelines import ReadRawLogs
    from ctrkit.pipelines.beam_pipeline import checked_file_list

    a = synthetic.write_tsv(synthetic.generate(20, seed=1, timestamp=False), str(tmp_path / "a.tsv"))
    b = synthetic.write_tsv(synthetic.generate(20, seed=2, timestamp=False), str(tmp_path / "b.tsv"))
    read = []
    with pytest.raises(Exception, match=r"file index 0 is given to both .*a\.tsv.* and .*b\.tsv"):
        with beam.Pipeline(runner=FnApiRunner()) as p:
            files = (p | "A" >> beam.Create([(0, a, 0)]), p | "B" >> beam.Create([(0, b, 0)])) | beam.Flatten()
            _ = (files | ReadRawLogs(DataConfig(window_rows=10))).clean | beam.Map(read.append)
    assert read == []  # the check runs before any file is read

    assert checked_file_list([(1, b, 20), (0, a, 0)]) == [(0, a, 0), (1, b, 20)]
    from ctrkit.pipelines import file_tuples

    assert file_tuples(DataConfig(window_rows=10), [a, tmp_path / "b.tsv"]) == [(0, a, 0), (1, b, 20)]
    assert file_tuples(DataConfig(window_rows=10), a) == [(0, a, 0)]  # one path, not its characters
    for bad in ["a.tsv", (0, a), (0.0, a, 0), (True, a, 0), (0, 5, 0)]:
        with pytest.raises(ValueError, match=r"\(file_index, path, line_offset\) tuples.*file_tuples"):
            checked_file_list([bad])


def test_write_window_shards_explains_tfts_default_output(tmp_path):
    from ctrkit.pipelines.beam_pipeline import _WriteShards

    without = pa.RecordBatch.from_arrays([pa.array([[1]], pa.large_list(pa.int64()))], names=["C1"])
    with pytest.raises(ValueError, match=r"lack the columns \['__window', '__file', '__line'\].*passthrough_keys"):
        next(_WriteShards(str(tmp_path / "x")).process((without, None)))
    # TFT without output_record_batches=True emits a dict per row (this was "too many values to unpack").
    with pytest.raises(ValueError, match=r"takes TFT's \(record_batch, passthrough\) pairs, got a dict.*"
                                         r"output_record_batches=True"):
        next(_WriteShards(str(tmp_path / "x")).process({"C1": np.array([1]), "C2": np.array([2]), "C3": 1}))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL", "SIGTERM-multi-processing"])
def test_killing_preprocess_stops_its_worker(raw, work, sig):
    """Killing `ctrkit preprocess` left its Beam worker running on to the end, writing a hidden output
    directory nobody collected. SIGTERM: the command stops the worker and cleans up; SIGKILL (no cleanup
    possible): the worker gets SIGTERM from the kernel as its parent dies. With Beam's multi-processing
    workers, SIGTERM left those running for minutes."""
    import signal
    import time

    multi = sig.endswith("multi-processing")
    out = work / f"out_{sig}"
    inputs = ["--input", raw["tsv"], "--input", raw["later"]]
    beam_args = []
    if multi:  # Beam starts its workers ~10 s in: a log long enough to be killed while they run
        big = work / "kill_multi.tsv"
        synthetic.write_tsv(synthetic.generate(30_000, timestamp=False), str(big))
        inputs = ["--input", str(big)]
        beam_args = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    proc = subprocess.Popen([sys.executable, "-m", "ctrkit.cli", "preprocess", "--config", raw["config"], *inputs,
                             "--output", str(out), *beam_args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})

    def children_of(pid) -> list[str]:  # of every thread: Beam starts its workers from another one
        found = []
        for path in glob.glob(f"/proc/{pid}/task/*/children"):
            try:
                found += open(path).read().split()
            except FileNotFoundError:
                pass
        return found

    deadline, children = time.time() + 120, []
    while time.time() < deadline and proc.poll() is None and not children:
        time.sleep(0.1)
        children = children_of(proc.pid)
        if multi and children:  # wait for Beam's workers: python under /bin/sh under the job's process
            below = [g for c in children for g in children_of(c)]
            below += [g for c in below for g in children_of(c)]
            children = children + below if len(below) >= 4 else []
    assert children and proc.poll() is None, "the worker process never started"
    time.sleep(3)  # let the worker get into the job
    proc.send_signal(getattr(signal, sig.split("-")[0]))
    _, err = proc.communicate(timeout=120)
    if sig.startswith("SIGTERM"):
        assert proc.returncode == 143 and "ctrkit preprocess: terminated (SIGTERM)" in err, err[-2000:]

    def alive(pid: str) -> bool:
        try:
            return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 30
    while time.time() < deadline and any(alive(c) for c in children):
        time.sleep(0.2)
    assert not any(alive(c) for c in children)
    if sig.startswith("SIGTERM"):
        assert not [p for p in os.listdir(work) if p.startswith((out.name, f".{out.name}"))]


# -- bad input --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def second_log(work) -> tuple[str, bool]:
    """The real Criteo sample (1,000 rows, 498 of them short) after the bad file, or without ../shared a
    generated 1,000-row log, so the bad-row checks run either way; ``(path, is_the_real_sample)``."""
    if os.path.exists(CRITEO_SAMPLE):
        return CRITEO_SAMPLE, True
    return synthetic.write_tsv(synthetic.generate(1000, seed=6, timestamp=False), str(work / "second.tsv")), False


@pytest.fixture(scope="session")
def bad_run(work, second_log):
    good = synthetic.generate(200, seed=5, timestamp=False)
    path = synthetic.write_tsv(good, str(work / "good.tsv"))
    lines = open(path, "rb").read().split(b"\n")[:-1]
    fields = lines[10].split(b"\t")
    bad_lines = {
        50: lines[0] + b"\textra",                                # too many fields
        60: b"\t".join([fields[0], b"12x"] + fields[2:]),          # non-numeric integer
        70: b"\t".join([b"3"] + fields[1:]),                       # label outside {0, 1}
        80: b"\t".join(fields[:14] + [b"\xff\xfe"] + fields[15:]),  # undecodable bytes
        90: b"\t".join(fields[:30]),                               # short row (rejected by config)
    }
    for ln in sorted(bad_lines):
        lines.insert(ln - 1, bad_lines[ln])
    bad_path = str(work / "bad.tsv.gz")
    with gzip.open(bad_path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    # The real sample's 498 short rows are half of it: data.max_rejected_fraction must let them through.
    config = DataConfig(short_rows="reject", window_rows=600, analyze_windows=1, max_rejected_fraction=0.5)
    out = _run(work, "out_bad", [bad_path, second_log[0]], config)
    return out, bad_path, config


def test_bad_rows_rejected_counted_and_explained(bad_run, second_log):
    out, bad_path, _ = bad_run
    second, real_sample = second_log
    m = Manifest.load(out)
    assert m.rows_read == 205 + 1000
    rejected = [json.loads(line) for p in sorted(glob.glob(os.path.join(out, "rejected", "*"))) for line in open(p)]
    assert len(rejected) == m.rows_rejected == 5 + (498 if real_sample else 0)
    assert m.rows_padded == 0  # short_rows: reject
    assert m.rows_written == m.rows_read - m.rows_rejected
    ours = {r["line"]: r for r in rejected if r["file"] == bad_path}
    assert ours[50]["reason"] == "wrong number of fields: 41, expected 40"
    assert ours[60]["reason"] == "field I1: '12x' is not a valid number"
    assert ours[70]["reason"] == "field label: label '3' is not 0 or 1"
    assert ours[80]["reason"] == "undecodable bytes (not UTF-8) in field C1"
    assert ours[90]["reason"] == "wrong number of fields: 30, expected 40"
    assert ours[50]["raw"].endswith("\textra") and "12x" in ours[60]["raw"]
    criteo = collections.Counter(r["reason"] for r in rejected if r["file"] == second)
    if real_sample:  # its README: 469 rows with 38 fields and 29 with 37 (stripped trailing empties)
        assert criteo == {"wrong number of fields: 38, expected 40": 469, "wrong number of fields: 37, expected 40": 29}
    else:
        assert criteo == {}


def test_padded_short_rows_are_counted_in_the_manifest(work, criteo_sample):
    # The sample's README: 469 rows with 38 fields and 29 with 37 (stripped trailing empties).
    out = _run(work, "out_padded", [criteo_sample], DataConfig(short_rows="pad", window_rows=600))
    m = Manifest.load(out)
    assert (m.rows_read, m.rows_written, m.rows_rejected, m.rows_padded) == (1000, 1000, 0, 469 + 29)
    assert m.config["counters"].get("rows_padded", 498) == 498  # runners that report counters agree


def test_analyze_windows_limits_the_analyzed_span(bad_run, second_log):
    """analyze_windows: 1 → vocabularies come from the first 600 input rows (both files, in order) only."""
    from ctrkit.pipelines.reading import read_file

    out, bad_path, config = bad_run
    m = Manifest.load(out)
    assert [w.name for w in m.windows] == ["w00000000", "w00000001", "w00000002"]
    first_file_rows = 205
    tokens, later_tokens = set(), set()
    for index, path in enumerate([bad_path, second_log[0]]):
        for batch, _ in read_file(path, index, config):
            position = batch["__line"].to_numpy() - 1 + (first_file_rows if index else 0)
            values = np.array(batch["C3"].to_pylist(), dtype=object)
            tokens |= {v for v in values[position < 600] if v}
            later_tokens |= {v for v in values[position >= 600] if v}
    assert set(_vocab(out, "C3")) == tokens
    assert later_tokens - tokens  # the later windows had tokens the vocabulary rightly lacks


def test_failure_inside_the_job_leaves_no_output(work):
    """A corrupt gzip file fails while Beam reads it: one-line InputError, nothing left behind."""
    from ctrkit.pipelines import preprocess

    path = work / "corrupt.tsv.gz"
    path.write_bytes(gzip.compress(b"0\t1\n" * 100)[:-30] + b"garbage" * 10)
    out = work / "out_corrupt"
    with pytest.raises(InputError, match="corrupt.tsv.gz"):
        preprocess(DataConfig(), [str(path)], str(out))
    assert not out.exists()
    assert not [p for p in os.listdir(work) if p.startswith(".out_corrupt.tmp")]


# -- one-line errors from the CLI (fail before any Beam work) ---------------------------------------------
@pytest.mark.parametrize("case", ["missing", "empty", "unwritable", "header", "not_empty", "typo", "unknown", "value",
                                  "runner", "inside", "truncated", "foreign", "blank", "symlink", "symlink_slash", "cwd", "glob"])
def test_cli_one_line_errors(raw, work, case):
    empty = work / "empty.tsv"
    empty.write_bytes(b"")
    holder = work / "holder"  # --overwrite would delete the input it holds
    holder.mkdir(exist_ok=True)
    (holder / "in.tsv").write_bytes(open(raw["tsv"], "rb").read()[:5000])
    truncated = work / "truncated"  # two files, row windows: the driver counts lines before the job
    truncated.mkdir(exist_ok=True)
    (truncated / "a.tsv").write_bytes(open(raw["tsv"], "rb").read()[:5000])
    whole = gzip.compress(open(raw["tsv"], "rb").read())
    (truncated / "b.tsv.gz").write_bytes(whole[:len(whole) // 2])
    bad_header = work / "bad_header.csv"
    bad_header.write_text("label,I1\n1,2\n")
    csv_config = work / "csv.yaml"
    csv_config.write_text("data:\n  format: csv\n")
    blocker = work / "a_file"
    blocker.write_text("x")
    occupied = work / "occupied"
    occupied.mkdir(exist_ok=True)
    (occupied / "keep.txt").write_text("x")
    link = work / "link_to_occupied"
    if not link.is_symlink():
        link.symlink_to(occupied)
    args, message = {
        # --overwrite replaced any directory: an unset $OUT ("") or "." deleted the current directory.
        "foreign": (["--input", raw["tsv"], "--output", str(occupied), "--overwrite"],
                    f"--overwrite replaces only an earlier ctrkit preprocess output, and {occupied} also holds "
                    "keep.txt"),
        "blank": (["--input", raw["tsv"], "--output", "", "--overwrite"], "the output directory is an empty string"),
        "symlink": (["--input", raw["tsv"], "--output", str(link), "--overwrite"], "is a symbolic link"),
        "symlink_slash": (["--input", raw["tsv"], "--output", f"{link}/", "--overwrite"], "is a symbolic link"),
        "cwd": (["--input", raw["tsv"], "--output", os.getcwd()], "is the current directory or holds it"),
        "glob": (["--input", raw["tsv"], "--output", str(work / "o9[1]")], "holds * ? or [, which Beam reads"),
        "missing": (["--input", str(work / "nope*.tsv"), "--output", str(work / "o1")], "matches no files"),
        "empty": (["--input", str(empty), "--output", str(work / "o2")], "input is empty"),
        "unwritable": (["--input", raw["tsv"], "--output", str(blocker / "out")], "cannot write output directory"),
        "header": (["--config", str(csv_config), "--input", str(bad_header), "--output", str(work / "o3")],
                   "header does not match data.columns"),
        "not_empty": (["--input", raw["tsv"], "--output", str(occupied)], "exists and is not empty"),
        # Beam would only log "Discarding unparseable args" and run: a mistyped --transform-fn re-analyzed.
        "typo": (["--input", raw["tsv"], "--output", str(work / "o4"), "--transform_fn=prep"],
                 "unrecognized pipeline options --transform_fn=prep: neither a ctrkit option nor an Apache Beam "
                 "pipeline option (--transform_fn: did you mean --transform-fn?)"),
        "unknown": (["--input", raw["tsv"], "--output", str(work / "o5"), "--direct_num_worker=2"],
                    "(--direct_num_worker: did you mean --direct_num_workers?)"),
        # argparse's own exit printed Beam's 125-line usage under the name ctrkit.
        "value": (["--input", raw["tsv"], "--output", str(work / "o8"), "--direct_running_mode=multi_procesing"],
                  "Beam option: argument --direct_running_mode: invalid choice: 'multi_procesing'"),
        "runner": (["--input", raw["tsv"], "--output", str(work / "o6"), "--runner=NoSuchRunner"],
                   "unknown Beam runner 'NoSuchRunner'"),
        "inside": (["--input", str(holder / "in.tsv"), "--output", str(holder), "--overwrite"],
                   f"input {holder / 'in.tsv'} is inside the output directory"),
        "truncated": (["--input", str(truncated / "*"), "--output", str(work / "o7")],
                      f"{truncated / 'b.tsv.gz'}: cannot read it to count its rows"),
    }[case]
    if "--config" not in args:
        args = ["--config", raw["config"], *args]
    proc = _cli(*args)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], proc.stderr
    assert err[0].startswith("ctrkit preprocess: error:")
    assert (occupied / "keep.txt").exists() and (holder / "in.tsv").exists()
    assert not any((work / o).exists() for o in ("o4", "o5", "o6", "o7", "o8", "o9[1]"))


def test_overwrite_replaces_an_earlier_output_with_the_umask_mode(raw, work, tsv_out):
    """--overwrite replaces an earlier output (its manifest says so); the output directory gets the mode
    mkdir would give, not mkdtemp's 0700, which locked teammates out of a shared output."""
    from ctrkit.pipelines import preprocess

    out = work / "out_overwritten"
    shutil.copytree(tsv_out, out)
    small = work / "overwrite_in.tsv"
    small.write_text("".join(open(raw["tsv"]).readlines()[:300]))
    old_umask = os.umask(0o027)
    root = logging.getLogger()
    handlers, root.handlers = root.handlers, []  # a fresh notebook's root logger (pytest's own set aside)
    try:
        m = preprocess(_data_config(), [str(small)], str(out), overwrite=True)
        # Beam's PipelineOptions, built to find the runner, called logging.basicConfig(): a notebook's own
        # basicConfig(level=INFO) afterwards did nothing.
        assert root.handlers == []
    finally:
        os.umask(old_umask)
        root.handlers = handlers
    assert m.rows_read == 300 and Manifest.load(out).rows_read == 300
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o750
    assert not [p for p in os.listdir(work) if p.startswith(".out_overwritten.tmp")]


def test_a_job_does_not_replace_an_output_another_job_published_meanwhile(raw, work, tsv_out, monkeypatch):
    """Two jobs on one --output both found it empty at their start; the later one deleted the earlier one's
    output and both exited 0."""
    from ctrkit.pipelines import preprocess, runner

    out = work / "out_raced"
    small = work / "raced_in.tsv"
    small.write_text("".join(open(raw["tsv"]).readlines()[:200]))
    finish = runner._finish

    def other_job_publishes_first(*args, **kwargs):
        finish(*args, **kwargs)
        shutil.copytree(tsv_out, out)  # the other job renames its output into place just before this one

    monkeypatch.setattr(runner, "_finish", other_job_publishes_first)
    with pytest.raises(InputError, match="was filled by another job while this one ran"):
        preprocess(_data_config(), [str(small)], str(out))
    assert Manifest.load(out).rows_read == Manifest.load(tsv_out).rows_read  # the other job's output, whole
    assert not [p for p in os.listdir(work) if p.startswith(".out_raced.")]


def test_the_readers_warnings_reach_the_driver(work, caplog):
    """The job runs in a child process (and its readers in Beam workers): a warning such as an unterminated
    quote swallowing 29 lines into one rejected row went to a log nobody saw, and the CLI said only
    "1 rejected"."""
    from ctrkit.pipelines import preprocess
    from ctrkit.schema import ColumnSpec

    good = [f"{i % 2},{i},c{i}" for i in range(40)]
    path = work / "unterminated.csv"
    path.write_text("\n".join(good[:12] + ['1,5,"unterminated'] + good[12:]) + "\n")
    # A headerless log that lost a column: every row is short (had it lost x, c's values would be read as x).
    lost = work / "lost_a_column.csv"
    lost.write_text("".join(f"{i % 2},{i}\n" for i in range(30)) + "1,2,c\n")  # not every row: no warning
    lost_all = work / "lost_a_column_everywhere.csv"
    lost_all.write_text("".join(f"{i % 2},{i}\n" for i in range(30)))
    config = DataConfig(format="csv", header=False, window_rows=100, max_rejected_fraction=0.05,
                        columns=[ColumnSpec("label", kind="label"), ColumnSpec("x", kind="numeric"), ColumnSpec("c")])
    with caplog.at_level("WARNING", logger="ctrkit.pipelines"):
        m = preprocess(config, [str(path), str(lost), str(lost_all)], str(work / "out_unterminated"))
    assert (m.rows_rejected, m.rows_padded) == (1, 60)
    warned = [r.getMessage() for r in caplog.records if r.name == "ctrkit.pipelines"]
    assert any("line 13 runs over 29 lines" in w and "unterminated quote" in w for w in warned), warned
    padded = [w for w in warned if "padded with missing values" in w]
    assert len(padded) == 1 and padded[0].startswith(f"{lost_all}: every row (30) had fewer fields than "
                                                      "data.columns (3)"), warned


def test_every_row_rejected_is_an_error_naming_the_first_reasons(work):
    """Zero rows written used to exit 0 and fail only later, at `ctrkit train` ("no windows")."""
    from ctrkit.pipelines import preprocess

    blank = work / "blank.tsv"
    blank.write_bytes(b"\n\n\n")
    out = work / "out_blank"
    with pytest.raises(InputError, match=r"every row was rejected \(3 of 3\).*blank.tsv line 1: empty line"):
        preprocess(DataConfig(), [str(blank)], str(out))
    assert not out.exists()
    kept = [json.loads(line) for p in glob.glob(f"{out}.rejected/part-*.jsonl") for line in open(p)]
    assert sorted(r["line"] for r in kept) == [1, 2, 3]  # all of them, not just the three the message names


def test_more_rejected_rows_than_the_limit_fail_the_job_and_keep_them(work):
    """A log whose format changed lost its bad rows to rejected/ and the job exited 0, writing what was left;
    now past data.max_rejected_fraction it fails, and the rejected rows outlive the deleted output."""
    from ctrkit.pipelines import preprocess

    lines = open(synthetic.write_tsv(synthetic.generate(100, seed=8, timestamp=False), str(work / "mostly.tsv")),
                 "rb").read().splitlines()
    for at in (10, 20, 30):  # 3 of 103 rows: 2.9%, over the default 1%
        lines.insert(at, lines[at] + b"\textra")
    path = work / "mostly.tsv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = work / "out_mostly"
    kept = work / "out_mostly.rejected"
    kept.mkdir()
    (kept / "part-00000-of-00002.jsonl").write_text('{"an earlier failed job": 1}\n')
    (kept / "part-00001-of-00002.jsonl").write_text('{"an earlier failed job": 2}\n')
    with pytest.raises(InputError) as caught:
        preprocess(DataConfig(window_rows=1000), [str(path)], str(out))
    message = str(caught.value)
    assert "3 of 103 rows (2.91%) were rejected, more than data.max_rejected_fraction (0.01)" in message
    assert f"are in {kept}." in message and "mostly.tsv line 11: wrong number of fields: 41, expected 40" in message
    assert not out.exists() and not [p for p in os.listdir(work) if p.startswith(".out_mostly.tmp")]
    rows = [json.loads(line) for p in sorted(kept.iterdir()) for line in open(p)]
    assert sorted(r["line"] for r in rows) == [11, 21, 31]  # the earlier failure's rows were replaced

    m = preprocess(DataConfig(window_rows=1000, max_rejected_fraction=0.03), [str(path)], str(out))
    assert (m.rows_written, m.rows_rejected) == (100, 3)


def test_config_yaml_round_trip(raw):
    assert load_config(raw["config"]).data == _data_config()


def test_a_saved_transform_fn_is_reapplied_with_the_tracing_it_was_saved_with(tsv_out, tmp_path):
    """TFT loads a transform_fn with the Context's tracing, not the saved model's: a TF2 transform_fn (your
    own pipeline in a default Context) died inside `--transform-fn`'s job with "MetaGraphDef associated with
    tags transform could not be found"; the job now picks the tracing from the saved model's tags."""
    import tensorflow as tf

    from ctrkit.pipelines import saved_with_tf1_tags

    assert saved_with_tf1_tags(tsv_out)  # what ctrkit preprocess saves
    tf2 = tmp_path / "tf2"
    module = tf.Module()
    module.f = tf.function(lambda x: {"y": x + 1}, input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(module, str(tf2 / "transform_fn"))
    assert not saved_with_tf1_tags(str(tf2))
    with pytest.raises(InputError, match=r"--transform-fn .*nothing.*cannot read .*transform_fn/saved_model\.pb"):
        saved_with_tf1_tags(str(tmp_path / "nothing"))

    # The job builds its pipeline with the tracing the saved transform_fn has.
    import ctrkit.pipelines.beam_pipeline as beam_pipeline
    from ctrkit.configio import to_dict
    from ctrkit.pipelines.runner import _Spec, run_job

    class Built(Exception):
        pass

    def record(*args, tf_compat_v1, **kwargs):
        raise Built(tf_compat_v1)

    real = beam_pipeline.build_pipeline
    beam_pipeline.build_pipeline = record
    try:
        for transform_fn, tf1 in ((tsv_out, True), (str(tf2), False), (None, True)):
            spec = _Spec(to_dict(_data_config()), [], str(tmp_path / "work"), str(tmp_path / "control"), None,
                         transform_fn, [], "arrow", None)
            with pytest.raises(Built) as built:
                run_job(spec)
            assert built.value.args == (tf1,), transform_fn
    finally:
        beam_pipeline.build_pipeline = real


def test_the_direct_runner_is_pinned_to_the_fnapi_runner_not_prism():
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from ctrkit.pipelines.runner import pinned_runner

    for args in ([], ["--runner=DirectRunner"], ["--runner", "direct"], ["--runner=SwitchingDirectRunner"]):
        assert isinstance(pinned_runner(PipelineOptions(args)), FnApiRunner), args
    for args in (["--runner=DataflowRunner"], ["--runner=PrismRunner"], ["--runner=BundleBasedDirectRunner"]):
        assert pinned_runner(PipelineOptions(args)) is None, args
