"""ctrkit.pipelines.reading and .analyzers: Arrow parsing, validation and vocabulary rules (no Beam run)."""
from __future__ import annotations

import collections
import gzip
import os

import numpy as np
import pyarrow as pa
import pytest

from ctrkit import synthetic
from ctrkit.configio import ConfigError
from ctrkit.errors import InputError
from ctrkit.pipelines.analyzers import EMPTY_VOCABULARY_DUMMY, VocabSpec, _CountAll, order_and_filter
from ctrkit.pipelines.reading import check_schema, read_file, read_timestamps
from ctrkit.schema import ColumnSpec, DataConfig


def _read_all(path, config):
    clean, rejected = [], []
    for batch, rej in read_file(path, 0, config):
        clean.append(batch)
        rejected.extend(rej)
    table = pa.Table.from_batches(clean) if clean else None
    return table, rejected


def _good_lines(n, seed=0):
    table = synthetic.generate(n, seed=seed, timestamp=False)
    path_lines = []
    for row in table.to_pylist():
        fields = [row["label"]] + [row[c] for c in synthetic.NUMERIC] + [row[c] for c in synthetic.CATEGORICAL]
        path_lines.append("\t".join("" if v is None else str(v) for v in fields))
    return path_lines


def _with_field(line: bytes, index: int, value: bytes) -> bytes:
    fields = line.split(b"\t")
    fields[index] = value
    return b"\t".join(fields)


@pytest.fixture(scope="module")
def bad_tsv(tmp_path_factory):
    """20 good rows with one bad row of each kind spliced in at known lines."""
    lines = [ln.encode() for ln in _good_lines(30)]
    bad = {
        3: (lines[0] + b"\textra", "wrong number of fields: 41, expected 40"),
        6: (_with_field(lines[1], 1, b"x7"), "field I1: 'x7' is not a valid number"),
        9: (b"2" + lines[2][1:], "field label: label '2' is not 0 or 1"),
        12: (_with_field(lines[3], 14, b"\xff\xfez"), "undecodable bytes (not UTF-8) in field C1"),
        15: (b"", "empty line"),
        18: (b"\t".join(lines[4].split(b"\t")[:30]), "wrong number of fields: 30, expected 40"),
    }
    out = []
    good_iter = iter(lines[5:])
    for ln in range(1, 27):
        out.append(bad[ln][0] if ln in bad else next(good_iter))
    path = tmp_path_factory.mktemp("bad") / "bad.tsv.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(out) + b"\n")
    return str(path), {ln: reason for ln, (_, reason) in bad.items()}


@pytest.mark.parametrize("short_rows", ["reject", "pad"])
def test_each_bad_row_is_rejected_with_line_and_reason(bad_tsv, short_rows):
    path, expected = bad_tsv
    table, rejected = _read_all(path, DataConfig(short_rows=short_rows))
    if short_rows == "pad":
        expected = {ln: r for ln, r in expected.items() if ln != 18}
    got = {r.line: r.reason for r in rejected}
    # The raw line is kept with the reason (for the undecodable row: bytes shown escaped).
    assert got.keys() == expected.keys()
    for ln, reason in expected.items():
        assert got[ln].startswith(reason.split(":")[0]), (ln, got[ln])
    assert got[3] == expected[3] and got[9] == expected[9] and got[15] == "empty line"
    assert "x7" in got[6] and "I1" in got[6]
    assert all(r.file == path for r in rejected)
    assert [r.raw for r in rejected if r.line == 3][0].endswith("\textra")
    # Nothing lost: every line is either clean or rejected, and clean rows keep their own line numbers.
    assert table.num_rows + len(rejected) == 26
    assert sorted(table["__line"].to_pylist() + list(got)) == list(range(1, 27))


@pytest.mark.parametrize("short_rows, padded", [("pad", 1), ("reject", 0)])
def test_padded_short_rows_are_counted(bad_tsv, short_rows, padded):
    path, _ = bad_tsv
    counts = {}
    table = pa.Table.from_batches([b for b, _ in read_file(path, 0, DataConfig(short_rows=short_rows), counts)])
    assert counts.get("rows_padded", 0) == padded  # line 18, 30 of 40 fields
    assert table.num_rows == 20 + padded


def test_padded_short_row_keeps_its_values(bad_tsv):
    path, _ = bad_tsv
    table, _ = _read_all(path, DataConfig(short_rows="pad"))
    row = table.filter(pa.compute.equal(table["__line"], 18)).to_pylist()[0]
    assert row["C16"] is not None and row["C17"] is None and row["C26"] is None


def test_real_criteo_sample_every_row_accounted(criteo_sample):
    padded, rej_pad = _read_all(criteo_sample, DataConfig(short_rows="pad"))
    strict, rej_strict = _read_all(criteo_sample, DataConfig(short_rows="reject"))
    assert padded.num_rows == 1000 and rej_pad == []
    # The sample's README: 469 rows with 38 fields and 29 with 37 (stripped trailing empties).
    counts = collections.Counter(r.reason for r in rej_strict)
    assert counts == {"wrong number of fields: 38, expected 40": 469, "wrong number of fields: 37, expected 40": 29}
    assert strict.num_rows == 502
    assert sorted(strict["__line"].to_pylist() + [r.line for r in rej_strict]) == list(range(1, 1001))
    assert int(padded["label"].to_numpy().sum()) == 205


def test_csv_header_mismatch_is_a_one_line_input_error(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("label,I1,C9\n1,2,a\n")
    config = DataConfig(format="csv", columns=[ColumnSpec("label", kind="label"), ColumnSpec("I1", kind="numeric"),
                                               ColumnSpec("C1")])
    with pytest.raises(InputError, match=r"missing columns \['C1'\].*unexpected columns \['C9'\]"):
        check_schema(str(path), config)
    path.write_text("I1,label,C1\n2,1,a\n")  # the same columns in another order: say which and what to do
    with pytest.raises(InputError, match=r"another order \(column 1 is 'I1' in the file, 'label' in the config\); "
                                         r"text columns are read by position, so list data.columns in the header's"):
        check_schema(str(path), config)


def test_parquet_schema_mismatch(tmp_path):
    table = synthetic.generate(50, seed=1, timestamp=True)
    path = synthetic.write_parquet(table, str(tmp_path / "x.parquet"))
    with pytest.raises(InputError, match=r"unexpected \['timestamp'\]"):
        check_schema(path, DataConfig(format="parquet"))


def test_parquet_and_tsv_read_identically(tmp_path):
    table = synthetic.generate(300, seed=2, timestamp=False)
    tsv = synthetic.write_tsv(table, str(tmp_path / "x.tsv"))
    parquet = synthetic.write_parquet(table, str(tmp_path / "x.parquet"))
    a, _ = _read_all(tsv, DataConfig())
    b, _ = _read_all(parquet, DataConfig(format="parquet"))
    assert a.equals(b)



def test_numbers_beyond_float32_are_rejected_not_inf(tmp_path):
    """1e39 fits float64 but not float32, 1e400 neither: both would reach the model as inf."""
    path = tmp_path / "big.csv"
    path.write_text("label,x,t\n1,1e39,0.5\n0,1e400,1\n1,2,-1e39\n0,-3.4e38,1e-50\n1,,2\n")
    config = DataConfig(format="csv", columns=[ColumnSpec("label", kind="label"), ColumnSpec("x", kind="numeric"),
                                               ColumnSpec("t", kind="teacher_logit")])
    table, rejected = _read_all(str(path), config)
    assert {r.line: r.reason for r in rejected} == {
        2: "field x: '1e39' is out of float32 range",
        3: "field x: '1e400' is out of float32 range",
        4: "field t: '-1e39' is out of float32 range",
    }
    assert table["__line"].to_pylist() == [5, 6]
    assert table["x"].to_pylist()[0] == pytest.approx(-3.4e38, rel=1e-6) and table["x"][1].as_py() is None
    assert np.isfinite(table["t"].to_numpy()).all()


def _label_timestamp_category_csv() -> DataConfig:
    return DataConfig(format="csv", columns=[ColumnSpec("label", kind="label"), ColumnSpec("ts", kind="timestamp"),
                                             ColumnSpec("c")])


def test_timestamp_beyond_int64_is_rejected_and_window_planning_agrees(tmp_path):
    """An integer too long for int64 is a rejected row (not a failed job), and read_timestamps, which
    plans the analyzed windows, keeps exactly the rows read_file keeps (padded ones too)."""
    path = tmp_path / "ts.csv"
    path.write_text("label,ts,c\n1,100,a\n0,99999999999999999999,b\n1,-9223372036854775809,c\n1,+5,d\n"
                    "7,200,e\n1,300\n0,9223372036854775807,f\n")
    config = _label_timestamp_category_csv()
    table, rejected = _read_all(str(path), config)
    assert {r.line: r.reason for r in rejected} == {
        3: "field ts: '99999999999999999999' is out of int64 range",
        4: "field ts: '-9223372036854775809' is out of int64 range",
        6: "field label: label '7' is not 0 or 1",
        8: "field ts: '9223372036854775807' is not a Unix time in seconds between the years 1900 and 3000 "
           "(timestamps in milliseconds or microseconds must be divided down to seconds)",
    }
    assert table["ts"].to_pylist() == [100, 5, 300]
    assert table["__line"].to_pylist() == [2, 5, 7]
    assert read_timestamps(str(path), config).tolist() == table["ts"].to_pylist()


def test_timestamps_outside_1900_to_3000_are_rejected(tmp_path):
    """A timestamp in milliseconds (or a stray far-future value) used to make its own window and then end
    the job, after all its work, on a date Python cannot represent; the row is rejected instead."""
    path = tmp_path / "ts.csv"
    path.write_text("label,ts,c\n1,1700000000,a\n0,1700000000000,a\n1,-2208988800,a\n0,-2208988801,a\n"
                    "1,32503679999,a\n0,32503680000,a\n")
    config = _label_timestamp_category_csv()
    table, rejected = _read_all(str(path), config)
    assert sorted(r.line for r in rejected) == [3, 5, 7]
    assert all("not a Unix time in seconds" in r.reason for r in rejected)
    assert table["ts"].to_pylist() == [1700000000, -2208988800, 32503679999]


def test_whole_decimal_timestamps_read_as_seconds_as_in_parquet(tmp_path):
    """pandas writes a float column as `1700001000.0`: read as a Parquet float column is, not refused."""
    path = tmp_path / "ts.csv"
    path.write_text("label,ts,c\n1,1700001000.0,a\n0, 1700001001.000 ,b\n1,1700001002.5,c\n0,1.7e9,d\n1,1700001003,e\n")
    config = _label_timestamp_category_csv()
    table, rejected = _read_all(str(path), config)
    assert table["ts"].to_pylist() == [1700001000, 1700001001, 1700001003]
    assert {r.line: r.reason for r in rejected} == {
        4: "field ts: '1700001002.5' is not a valid timestamp (whole Unix seconds)",
        5: "field ts: '1.7e9' is not a valid timestamp (whole Unix seconds)",
    }
    assert read_timestamps(str(path), config).tolist() == table["ts"].to_pylist()


def test_utf8_bom_is_not_part_of_the_first_column(tmp_path):
    """Excel writes a BOM before the header; a header-less file may start with one too."""
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefflabel,x,c\n1,2,a\n".encode())
    config = DataConfig(format="csv", columns=[ColumnSpec("label", kind="label"), ColumnSpec("x", kind="numeric"),
                                               ColumnSpec("c")])
    check_schema(str(path), config)
    table, rejected = _read_all(str(path), config)
    assert rejected == [] and table.to_pylist() == [{"label": 1.0, "x": 2.0, "c": b"a", "__file": 0, "__line": 2}]
    tsv = tmp_path / "bom.tsv"
    tsv.write_bytes(b"\xef\xbb\xbf" + "\n".join(_good_lines(3)).encode() + b"\n")
    table, rejected = _read_all(str(tsv), DataConfig())
    plain, _ = _read_all(_write(tmp_path / "plain.tsv", "\n".join(_good_lines(3)).encode() + b"\n"), DataConfig())
    assert rejected == [] and table.equals(plain)


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_parquet_ignored_columns_are_neither_read_nor_type_checked(tmp_path):
    import pyarrow.parquet as pq

    table = pa.table({"label": [1.0, 0.0], "x": [1.5, None], "c": ["a", None],
                      "meta": pa.array([[1, 2], []], pa.list_(pa.int64())),
                      "nested": pa.array([{"k": 1}, {"k": 2}])})
    path = str(tmp_path / "ignored.parquet")
    pq.write_table(table, path)
    config = DataConfig(format="parquet", columns=[
        ColumnSpec("label", kind="label"), ColumnSpec("meta", kind="ignore"), ColumnSpec("x", kind="numeric"),
        ColumnSpec("c"), ColumnSpec("nested", kind="ignore")])
    check_schema(path, config)
    got, rejected = _read_all(path, config)
    assert rejected == []
    assert got.column_names == ["label", "x", "c", "__file", "__line"]
    assert got.to_pylist() == [{"label": 1.0, "x": 1.5, "c": b"a", "__file": 0, "__line": 1},
                               {"label": 0.0, "x": None, "c": None, "__file": 0, "__line": 2}]
    # A file written before the ignored columns existed reads too (a backfill across the schema change) ...
    older = str(tmp_path / "older.parquet")
    pq.write_table(table.drop_columns(["meta", "nested"]), older)
    check_schema(older, config)
    assert _read_all(older, config)[0].equals(got)
    # ... but not one that lacks a column the pipeline reads.
    pq.write_table(table.drop_columns(["x"]), older)
    with pytest.raises(InputError, match=r"missing \['x'\], unexpected \[\]"):
        check_schema(older, config)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # pyarrow's own, logged
@pytest.mark.parametrize("short_rows", ["pad", "reject"])
def test_refused_row_with_invalid_utf8_is_rejected_and_the_file_read_on(tmp_path, short_rows):
    """pyarrow decodes a refused row's text before calling the handler and stops the file on bad bytes;
    ctrkit reads the file again with such rows masked, so only that row is lost, to rejected/."""
    good = _good_lines(4)
    short = "\t".join(good[1].split("\t")[:20]).encode() + b"\t\xff"
    long = good[2].encode() + b"\t\xfe\xff"
    path = _write(tmp_path / "u8.tsv", b"\n".join([good[0].encode(), short, long, good[3].encode()]) + b"\n")
    counts = {}
    clean, rejected = [], []
    for batch, rej in read_file(path, 0, DataConfig(short_rows=short_rows), counts):
        clean += batch["__line"].to_pylist()
        rejected += rej
    assert clean == [1, 4] and counts.get("rows_padded", 0) == 0
    assert [(r.line, r.reason) for r in rejected] == [
        (2, "wrong number of fields: 21, expected 40, and undecodable bytes (not UTF-8)"),
        (3, "wrong number of fields: 41, expected 40, and undecodable bytes (not UTF-8)")]
    assert rejected[0].raw.endswith("\t\\xff") and rejected[1].raw.startswith(good[2])


# -- vocabulary rules (the Arrow analyzer must match tft.vocabulary) ----------------------------------
def _reference_vocab(tokens, top_k=None, threshold=1):
    """Plain-Python statement of TFT's rules: drop empty/newline tokens, threshold, order, top_k."""
    counts = collections.Counter(t for t in tokens if t and b"\n" not in t and b"\r" not in t)
    items = [(c, t) for t, c in counts.items() if c >= threshold]
    items.sort(reverse=True)  # count desc, then token bytes desc
    vocab = [t for _, t in items][:top_k]
    return vocab or [EMPTY_VOCABULARY_DUMMY]


@pytest.mark.parametrize("top_k,threshold", [(None, 1), (5, 1), (None, 3), (4, 2), (3, 1000)])
def test_arrow_vocabulary_matches_tft_rules(top_k, threshold):
    rng = np.random.default_rng(top_k or 0)
    pool = [b"", b"a\nb", b"x\r"] + [f"t{i:03d}".encode() for i in range(60)]
    batches = [np.array([pool[j] for j in rng.zipf(1.3, size=400) % len(pool)], dtype=object) for _ in range(5)]
    fn = _CountAll(1)
    accs = []
    for part in (batches[:2], batches[2:]):  # two workers' partial counts, merged
        acc = fn.create_accumulator()
        for b in part:
            acc = fn.add_input(acc, [b])
        accs.append(acc)
    counts = fn.extract_output(fn.merge_accumulators(accs))[0]
    got = order_and_filter(counts, VocabSpec("v", top_k, threshold))
    assert got == _reference_vocab(np.concatenate(batches).tolist(), top_k, threshold)


def test_vocabulary_count_state_encodes_at_its_own_size():
    """Beam pickles the combiner's accumulator; group_by's chunks sliced shared buffers, and pickle wrote the
    whole parent buffers for every chunk: the state grew with the square of the vocabulary (68 MiB for 346k
    tokens holding 6 MiB)."""
    import apache_beam as beam

    fn = _CountAll(1)
    acc = fn.create_accumulator()
    for part in range(4):  # 4 batches of 60k distinct tokens, half shared with the previous batch
        tokens = np.array([f"token{i:07d}".encode() for i in range(part * 30000, part * 30000 + 60000)], dtype=object)
        acc = fn.add_input(acc, [tokens])
    acc = fn.compact(fn.merge_accumulators([acc, fn.create_accumulator()]))
    table = acc[0][0]
    assert table.num_rows == 150000
    encoded = beam.coders.registry.get_coder(object).encode(acc)  # what Beam does with an untyped accumulator
    assert len(encoded) < 2 * table.nbytes, (len(encoded), table.nbytes)


def test_rejected_csv_rows_keep_their_quoting(tmp_path):
    """A row rejected by validation is rebuilt from its fields; quoted fields must come back quoted, so the
    raw line in rejected/ parses to the same fields (it used to lose the quotes and gain a column)."""
    lines = ['label,x,c', '1,2.5,plain', '7,1.0,"with, comma"', '0,x9,"say ""hi"""', '1,3.0,"a\tb"']
    path = _write(tmp_path / "q.csv", ("\n".join(lines) + "\n").encode())
    config = DataConfig(format="csv", columns=[ColumnSpec("label", kind="label"), ColumnSpec("x", kind="numeric"),
                                               ColumnSpec("c")])
    table, rejected = _read_all(path, config)
    assert table["__line"].to_pylist() == [2, 5]
    assert [(r.line, r.raw) for r in rejected] == [(3, lines[2]), (4, lines[3])]


def _recorded_prep_dir(tmp_path, columns: list[dict]):
    from ctrkit.manifest import Manifest, TransformedFeature, Window

    for sub in ("transform_fn", "transformed_metadata"):
        (tmp_path / sub).mkdir()
    Manifest(features=(TransformedFeature("a", "categorical", vocab_size=9),), label="y",
             windows=(Window("w0", ("x",), 1),), rows_read=1, rows_written=1, rows_rejected=0,
             config={"data": {"format": "csv", "columns": columns}}).save(str(tmp_path))
    return str(tmp_path)


def test_transform_fn_reuse_compares_the_settings_that_decide_ids(tmp_path):
    """--transform-fn: an ignored setting recorded by an older ctrkit (hash column with a frequency
    threshold) is no difference; a setting that changes ids is, and the error names the column."""
    from ctrkit.configio import ConfigError
    from ctrkit.pipelines.runner import _check_transform_fn_dir

    prep = _recorded_prep_dir(tmp_path, [{"name": "y", "kind": "label"},
                                         {"name": "a", "encoding": "hash", "hash_buckets": 9, "frequency_threshold": 2}])
    ours = DataConfig(format="csv", columns=[ColumnSpec("y", kind="label"), ColumnSpec("a", encoding="hash", hash_buckets=9)])
    assert _check_transform_fn_dir(prep, ours) == prep
    other = DataConfig(format="csv", columns=[ColumnSpec("y", kind="label"), ColumnSpec("a", encoding="hash", hash_buckets=8)])
    with pytest.raises(ConfigError, match=r"was analyzed with other data\.columns \(different: a; "):
        _check_transform_fn_dir(prep, other)


def test_transform_fn_reuse_compares_columns_by_name_and_skips_ignored_ones(tmp_path):
    """Columns were compared by position, `ignore` columns included: a log that gained an unused column, or a
    CSV whose header was reordered, could not keep yesterday's transform, and re-analyzing it then made
    --warm-start refuse the new vocabularies. The transform reads the columns it uses by name."""
    from ctrkit.configio import ConfigError
    from ctrkit.pipelines.runner import _check_transform_fn_dir

    prep = _recorded_prep_dir(tmp_path, [{"name": "y", "kind": "label"}, {"name": "a"}, {"name": "n", "kind": "numeric"},
                                         {"name": "note", "kind": "ignore"}])
    y, a, n = ColumnSpec("y", kind="label"), ColumnSpec("a"), ColumnSpec("n", kind="numeric")
    for columns in ([n, ColumnSpec("new", kind="ignore"), y, a],  # reordered, an ignored column swapped
                    [y, a, n]):  # the ignored column dropped
        assert _check_transform_fn_dir(prep, DataConfig(format="csv", columns=columns)) == prep
    with pytest.raises(ConfigError, match=r"other data\.columns \(different: b \(only here\), n \(only there\);"):
        _check_transform_fn_dir(prep, DataConfig(format="csv", columns=[y, a, ColumnSpec("b", kind="numeric")]))
    with pytest.raises(ConfigError, match=r"\(different: a \(only there\);"):  # no longer read
        _check_transform_fn_dir(prep, DataConfig(format="csv", columns=[y, ColumnSpec("a", kind="ignore"), n]))


def test_padded_rows_that_validation_rejects_are_not_counted_as_padded(tmp_path):
    """A short row that lacks a required trailing field (here the timestamp) is padded, then rejected; the
    manifest counts padded rows among those written, so it must not count this one."""
    path = _write(tmp_path / "ts.tsv", b"1\ta\t100\n0\tb\n1\tc\n0\td\t200\n1\te\n")
    config = DataConfig(columns=[ColumnSpec("y", kind="label"), ColumnSpec("c"), ColumnSpec("ts", kind="timestamp")])
    counts = {}
    clean, rejected = [], []
    for batch, rej in read_file(path, 0, config, counts):
        clean += batch["__line"].to_pylist()
        rejected += rej
    assert clean == [1, 4] and [r.line for r in rejected] == [2, 3, 5]
    assert counts["rows_padded"] == 0
    path2 = _write(tmp_path / "c.tsv", b"1\ta\t100\n0\t\t150\n1\n0\td\t200\n")  # line 3: c and ts missing
    config2 = DataConfig(columns=[ColumnSpec("y", kind="label"), ColumnSpec("c"), ColumnSpec("n", kind="numeric")])
    counts2 = {}
    assert sum(b.num_rows for b, _ in read_file(path2, 0, config2, counts2)) == 4 and counts2["rows_padded"] == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # pyarrow's own, logged
@pytest.mark.parametrize("newline", [b"\r", b"\r\n"])
def test_undecodable_refused_row_with_cr_line_ends(tmp_path, newline):
    """pyarrow ends rows at a lone \\r too; the second pass must mask that one row, not the whole file."""
    config = DataConfig(columns=[ColumnSpec("y", kind="label"), ColumnSpec("c"), ColumnSpec("n", kind="numeric")])
    rows = [b"1\ta\t1", b"0\tb\xff", b"1\tc\t2", b"0\td\t3"]
    path = _write(tmp_path / "cr.tsv", newline.join(rows) + newline)
    table, rejected = _read_all(path, config)
    assert table["__line"].to_pylist() == [1, 3, 4] and table["c"].to_pylist() == [b"a", b"c", b"d"]
    assert [(r.line, r.reason, r.raw) for r in rejected] == [
        (2, "wrong number of fields: 2, expected 3, and undecodable bytes (not UTF-8)", "0\tb\\xff")]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # pyarrow's own, logged
def test_csv_with_an_undecodable_refused_row_still_fails_naming_the_line(tmp_path):
    """With CSV quoting a line is not a row (a quoted field can span lines), so no masking: a clear error."""
    config = DataConfig(format="csv", columns=[ColumnSpec("y", kind="label"), ColumnSpec("c"),
                                               ColumnSpec("n", kind="numeric")])
    path = _write(tmp_path / "q.csv", b'y,c,n\n1,a,1\n0,"x\ny\xff"\n1,c,2\n')
    with pytest.raises(InputError, match=r"q\.csv: line 3 has 2 fields instead of 3 and contains bytes that are "
                                         r"not UTF-8"):
        _read_all(path, config)


def test_label_minus_zero_is_a_zero_label(tmp_path):
    """"-0" is 0 (it was refused: a set lookup compares bit patterns); -1 and 2 stay refused."""
    path = _write(tmp_path / "labels.csv", b"label,x\n-0,1\n+1,1\n1.0,1\n0.0,1\n-1,1\n2,1\n-0.0,1\n")
    config = DataConfig(format="csv", columns=[ColumnSpec("label", kind="label"), ColumnSpec("x", kind="numeric")])
    table, rejected = _read_all(path, config)
    assert {r.line: r.reason for r in rejected} == {6: "field label: label '-1' is not 0 or 1",
                                                    7: "field label: label '2' is not 0 or 1"}
    labels = table["label"].to_numpy()
    assert labels.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert not np.signbit(labels).any()  # written as +0, like any other 0 label


@pytest.mark.parametrize("short_rows", ["reject", "pad"])
def test_csv_unterminated_quote_is_rejected_not_padded(tmp_path, short_rows, caplog):
    """A field that opens a quote and never closes it swallows the rest of the file into one short row,
    which short_rows: pad used to keep (and train on) without a word; it is rejected, lines and all."""
    good = [f"{i % 2},{i},c{i}" for i in range(40)]
    lines = ["label,x,c"] + good[:12] + ['1,5,"unterminated'] + good[12:]
    path = _write(tmp_path / "q.csv", ("\n".join(lines) + "\n").encode())
    config = DataConfig(format="csv", short_rows=short_rows,
                        columns=[ColumnSpec("label", kind="label"), ColumnSpec("x", kind="numeric"), ColumnSpec("c")])
    with caplog.at_level("WARNING", logger="ctrkit.pipelines.reading"):
        table, rejected = _read_all(path, config)
    assert table["__line"].to_pylist() == list(range(2, 14))
    [row] = rejected
    assert row.line == 14 and row.reason == ("field c: a quoted field runs over 29 lines, and the later ones look "
                                             "like rows of the file (an unterminated quote?)")
    assert all(line in row.raw for line in good[12:])  # the swallowed lines are in rejected/, not lost
    assert "unterminated" in caplog.text and "line 14" in caplog.text
    # A quoted newline inside a complete row is data, not a mistake.
    ok = _write(tmp_path / "ok.csv", b'label,x,c\n1,2,"two\nlines"\n0,3,d\n')
    table, rejected = _read_all(ok, config)
    assert rejected == [] and table["c"].to_pylist() == [b"two\nlines", b"d"]


def test_csv_row_refused_for_its_field_count_is_not_padded_when_a_quote_ran_over_lines(tmp_path):
    """When a stray quote later closes the run-on field, the row comes out with the wrong field count; a
    short one must not be padded and kept."""
    lines = ["label,x,c,d", "1,1,a,b", '0,"open', "1,2,b,c", "0,3,c,d", 'q",e']
    path = _write(tmp_path / "q.csv", ("\n".join(lines) + "\n").encode())
    config = DataConfig(format="csv", short_rows="pad", columns=[
        ColumnSpec("label", kind="label"), ColumnSpec("x", kind="numeric"), ColumnSpec("c"), ColumnSpec("d")])
    table, rejected = _read_all(path, config)
    assert table["__line"].to_pylist() == [2]
    [row] = rejected
    assert row.reason == "wrong number of fields: 3, expected 4; a quoted field runs over 4 lines (an unterminated quote?)"


@pytest.mark.parametrize("ending", [b"", b"\n", b"\r\n"])
def test_csv_of_only_a_header_has_no_rows(tmp_path, ending):
    """Without a line end after the header pyarrow could not skip it, and the file failed the whole job."""
    path = _write(tmp_path / "h.csv", b'"label","x","c"' + ending)
    config = DataConfig(format="csv", columns=[ColumnSpec("label", kind="label"), ColumnSpec("x", kind="numeric"),
                                               ColumnSpec("c")])
    check_schema(path, config)
    assert _read_all(path, config) == (None, [])


def test_duplicated_header_column_is_named(tmp_path):
    path = _write(tmp_path / "d.csv", b"label,x,x\n1,2,3\n")
    config = DataConfig(format="csv", columns=[ColumnSpec("label", kind="label"), ColumnSpec("x", kind="numeric"),
                                               ColumnSpec("c")])
    with pytest.raises(InputError, match=r"duplicated columns \['x'\]; missing columns \['c'\]"):
        check_schema(path, config)


def test_parquet_types_pandas_writes_read_like_the_same_csv(tmp_path):
    """category (dictionary), all-missing (null), timestamp, date and decimal columns, NaN and '' as
    missing: each used to be refused ("unsupported Parquet type", "'nan' is not a valid number")."""
    import datetime
    import decimal

    import pyarrow.parquet as pq

    ts = [datetime.datetime(2023, 11, 14, 0, 0, 1, 900_000), datetime.datetime(2023, 11, 15),
          datetime.datetime(1969, 12, 31, 23, 59, 58, 500_000)]  # before 1970: floored to -2
    table = pa.table({
        "label": [1.0, 0.0, 1.0],
        "ts": pa.array(ts, pa.timestamp("ms", tz="UTC")),
        "day": pa.array([datetime.date(2023, 11, 14), None, datetime.date(2023, 11, 16)], pa.date32()),
        "x": [1.5, float("nan"), None],
        "s": ["2.5", "", None],
        "price": pa.array([decimal.Decimal("1.25"), None, decimal.Decimal("-3.50")], pa.decimal128(6, 2)),
        "cat": pa.array(["a", None, "b"]).dictionary_encode(),
        "empty": pa.nulls(3),
        # string_view (refused before) and the large/view binary kinds, as polars and pyarrow write them
        "sv": pa.array(["u", "", None], pa.string_view()),
        "lb": pa.array([b"v", None, b"w"], pa.large_binary()),
        "bv": pa.array([b"", b"z", None], pa.binary_view()),
    })
    pq.write_table(table, tmp_path / "p.parquet")
    assert pq.read_schema(tmp_path / "p.parquet").field("sv").type == pa.string_view()  # still a view on read
    csv = ("label,ts,day,x,s,price,cat,empty,sv,lb,bv\n1,1699920001,1699920000,1.5,2.5,1.25,a,,u,v,\n"
           "0,1700006400,,,,,,,,,z\n1,-2,1700092800,,,-3.5,b,,,w,\n")
    columns = [ColumnSpec("label", kind="label"), ColumnSpec("ts", kind="timestamp"),
               ColumnSpec("day", kind="numeric"), ColumnSpec("x", kind="numeric"), ColumnSpec("s", kind="numeric"),
               ColumnSpec("price", kind="numeric"), ColumnSpec("cat"), ColumnSpec("empty"), ColumnSpec("sv"),
               ColumnSpec("lb"), ColumnSpec("bv")]
    from_parquet, rejected = _read_all(str(tmp_path / "p.parquet"), DataConfig(format="parquet", columns=columns))
    assert rejected == []
    from_csv, _ = _read_all(_write(tmp_path / "p.csv", csv.encode()), DataConfig(format="csv", columns=columns))
    assert from_parquet.drop_columns(["__line"]).equals(from_csv.drop_columns(["__line"]))
    assert from_parquet["ts"].to_pylist() == [1699920001, 1700006400, -2]
    assert from_parquet["x"].to_pylist() == [1.5, None, None]
    assert from_parquet["sv"].to_pylist() == [b"u", None, None]


def test_whole_decimal_ids_read_as_the_int_ids_they_replace(tmp_path):
    """A warehouse export turned an int64 id column into NUMERIC(14,2): its ids read "123.00", so with
    yesterday's transform every one went to OOV, silently. Whole decimals read as integers now; other
    decimals keep their exact text."""
    import decimal

    import pyarrow.parquet as pq

    columns = [ColumnSpec("label", kind="label"), ColumnSpec("c")]
    ids = [123, -7, 0, 12345678901234]
    pq.write_table(pa.table({"label": [1.0, 0.0, 1.0, 0.0], "c": pa.array(ids, pa.int64())}), tmp_path / "int.parquet")
    pq.write_table(pa.table({"label": [1.0, 0.0, 1.0, 0.0],
                             "c": pa.array([decimal.Decimal(f"{i}.00") for i in ids], pa.decimal128(16, 2))}),
                   tmp_path / "dec.parquet")
    config = DataConfig(format="parquet", columns=columns)
    as_int, _ = _read_all(str(tmp_path / "int.parquet"), config)
    as_decimal, rejected = _read_all(str(tmp_path / "dec.parquet"), config)
    assert rejected == [] and as_decimal["c"].to_pylist() == as_int["c"].to_pylist() == [b"123", b"-7", b"0",
                                                                                          b"12345678901234"]
    pq.write_table(pa.table({"label": [1.0], "c": pa.array([decimal.Decimal("1.50")], pa.decimal128(6, 2))}),
                   tmp_path / "frac.parquet")
    assert _read_all(str(tmp_path / "frac.parquet"), config)[0]["c"].to_pylist() == [b"1.50"]


def test_quoted_line_breaks_in_real_text_are_kept(tmp_path):
    """Free text with line breaks is data: a short row with one is padded, not rejected, and a line that
    happens to hold a row's worth of commas is not taken for swallowed rows."""
    columns = [ColumnSpec("label", kind="label"), ColumnSpec("c"), ColumnSpec("review", kind="ignore")]
    path = _write(tmp_path / "r.csv", b'label,c,review\n1,a,"Great, fast shipping.\nWould buy again, 5 stars, thanks"\n'
                                      b'0,"two\nlines"\n1,b,ok\n')
    table, rejected = _read_all(path, DataConfig(format="csv", short_rows="pad", columns=columns))
    assert rejected == []
    assert table["c"].to_pylist() == [b"a", b"two\nlines", b"b"]


# -- real-world files a review fed the pipeline (each failed or read wrong before) -----------------------
_CSV_COLUMNS = [ColumnSpec("label", kind="label"), ColumnSpec("x", kind="numeric"), ColumnSpec("c")]


def test_old_mac_line_endings_read_like_unix_ones(tmp_path):
    """CR-only: the header was cut at the first \\n only, so the whole file was the "header" (csv.Error)."""
    unix = b"label,x,c\n0,0,k0\n1,1,k1\n0,2,k2\n"
    want, _ = _read_all(_write(tmp_path / "lf.csv", unix), DataConfig(format="csv", columns=_CSV_COLUMNS))
    got, rejected = _read_all(_write(tmp_path / "cr.csv", unix.replace(b"\n", b"\r")),
                              DataConfig(format="csv", columns=_CSV_COLUMNS))
    assert rejected == [] and got.equals(want) and got.num_rows == 3


def test_quoted_empty_fields_are_missing_values(tmp_path):
    """pandas' to_csv(quoting=QUOTE_NONNUMERIC) writes NaN as "": each such row was rejected."""
    path = _write(tmp_path / "q.csv", b'"label","x","c"\n1,"","a"\n0,2.5,""\n')
    table, rejected = _read_all(path, DataConfig(format="csv", columns=_CSV_COLUMNS))
    assert rejected == []
    assert table["x"].to_pylist() == [None, 2.5] and table["c"].to_pylist() == [b"a", None]


def test_compressed_text_is_recognised_by_content_and_its_lines_counted_as_parsed(tmp_path):
    """Row-count windows place each file by counting the lines before it. The count missed a lone \\r and
    .bz2 (rows of the next file landed in the previous window), and a gzipped file not named lower-case
    .gz was read as raw bytes: its rows were "rejected" as garbage and the job succeeded."""
    import bz2

    from ctrkit.pipelines.reading import count_lines
    from ctrkit.pipelines.runner import line_offsets

    lines = [ln.encode() for ln in _good_lines(7)]
    config = DataConfig()  # Criteo TSV
    want, _ = _read_all(_write(tmp_path / "plain.tsv", b"\n".join(lines) + b"\n"), config)
    files = {
        "crlf.tsv": b"\r\n".join(lines) + b"\r\n",
        "cr.tsv": b"\r".join(lines),  # no line end after the last row
        "mixed.tsv": b"\n".join(lines[:3]) + b"\r\n" + b"\r".join(lines[3:]) + b"\r",
        "up.TSV.GZ": gzip.compress(b"\n".join(lines) + b"\n"),
        "named_plain.tsv": gzip.compress(b"\n".join(lines) + b"\n"),
        "b.tsv.bz2": bz2.compress(b"\n".join(lines) + b"\n"),
    }
    paths = [_write(tmp_path / name, data) for name, data in files.items()]
    for path in paths:
        assert count_lines(path) == 7, path
        table, rejected = _read_all(path, config)
        assert rejected == [] and table.drop_columns(["__line"]).equals(want.drop_columns(["__line"])), path
    assert line_offsets(DataConfig(window_rows=5), paths) == [0, 7, 14, 21, 28, 35]
    from ctrkit.pipelines.reading import compression_of

    assert compression_of(_write(tmp_path / "bzh.csv", b"BZh91AY,x\n1,2\n")) is None  # text, not bz2
    assert compression_of(_write(tmp_path / "empty.bz2", bz2.compress(b""))) == "bz2"
    crlf_split = tmp_path / "split.tsv"  # a \r\n that straddles the counter's 16 MiB reads is one line end
    crlf_split.write_bytes(b"x" * ((1 << 24) - 1) + b"\r\n" + b"y\r\n")
    assert count_lines(str(crlf_split)) == 2


def test_input_spellings_of_one_file_literal_names_and_directories(tmp_path, monkeypatch):
    import os

    from ctrkit.pipelines.runner import expand_inputs

    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "a.tsv", b"x\n")
    os.symlink(tmp_path / "a.tsv", tmp_path / "link.tsv")
    # ./a.tsv, an absolute path and a symlink are one file: it was read (and counted) once per spelling
    assert expand_inputs(["a.tsv", "./a.tsv", str(tmp_path / "a.tsv"), "link.tsv"]) == ["a.tsv"]
    literal = _write(tmp_path / "day[1].tsv", b"x\n")
    _write(tmp_path / "day1.tsv", b"x\n")  # what the pattern "day[1].tsv" matches; it was read instead
    assert expand_inputs([literal]) == [literal]
    with pytest.raises(InputError, match=r"is a directory; pass its files"):
        expand_inputs([str(tmp_path)])
    (tmp_path / "prep").mkdir()
    (tmp_path / "prep" / "manifest.json").write_text("{}")  # its suggested 'prep/*' would read the output as logs
    with pytest.raises(InputError, match=r"is a ctrkit pipeline output, not raw logs; .* --transform-fn"):
        expand_inputs(["prep"])


def test_globbed_files_are_read_in_natural_order_and_one_path_is_one_input(tmp_path, monkeypatch):
    """Text order read day_10 between day_1 and day_2: with row-count windows, day 10's rows came before day 2's."""
    from ctrkit.pipelines.runner import expand_inputs

    monkeypatch.chdir(tmp_path)
    for name in ("day_10.tsv", "day_2.tsv", "day_1.tsv", "day_02b.tsv", "day_01.tsv"):
        _write(tmp_path / name, b"x\n")
    assert expand_inputs(["day_*.tsv"]) == ["day_01.tsv", "day_1.tsv", "day_2.tsv", "day_02b.tsv", "day_10.tsv"]
    assert expand_inputs(["day_2*.tsv", "day_1*.tsv"]) == ["day_2.tsv", "day_1.tsv", "day_10.tsv"]  # globs in order
    assert expand_inputs("day_2.tsv") == ["day_2.tsv"]  # not the patterns "d", "a", "y", ...


def test_parquet_whole_floats_read_as_integers_and_duplicate_columns_are_named(tmp_path):
    """pandas stores an int id column holding a NaN as float64: its ids made second vocabulary entries
    ("1.23456789012e+11" beside "123456789012")."""
    import pyarrow.parquet as pq

    columns = [ColumnSpec("label", kind="label"), ColumnSpec("c")]
    ids = [123456789012, 7, 1]
    pq.write_table(pa.table({"label": [1.0, 0.0, 1.0], "c": ids}), tmp_path / "int.parquet")
    pq.write_table(pa.table({"label": [1.0, 0.0, 1.0, 0.0], "c": [float(i) for i in ids] + [None]}),
                   tmp_path / "float.parquet")
    config = DataConfig(format="parquet", columns=columns)
    as_int, _ = _read_all(str(tmp_path / "int.parquet"), config)
    as_float, rejected = _read_all(str(tmp_path / "float.parquet"), config)
    assert rejected == [] and as_float["c"].to_pylist() == as_int["c"].to_pylist() + [None]
    pq.write_table(pa.Table.from_arrays([pa.array([1.0]), pa.array(["a"]), pa.array(["b"])], names=["label", "c", "c"]),
                   tmp_path / "dup.parquet")
    with pytest.raises(InputError, match=r"dup.parquet: Parquet columns \['c'\] appear more than once"):
        check_schema(str(tmp_path / "dup.parquet"), config)
    # a duplicated column the config ignores is never selected: fine, as before
    pq.write_table(pa.Table.from_arrays([pa.array([1.0]), pa.array(["a"]), pa.array([1]), pa.array([2])],
                                        names=["label", "c", "junk", "junk"]), tmp_path / "dup_ignored.parquet")
    ignoring = DataConfig(format="parquet", columns=columns + [ColumnSpec("junk", kind="ignore")])
    table, _ = _read_all(str(tmp_path / "dup_ignored.parquet"), ignoring)
    assert table["c"].to_pylist() == [b"a"]
    # numpy float16 columns (halffloat) have no floor kernel; they read as before
    pq.write_table(pa.table({"label": [1.0, 0.0], "c": pa.array([1.5, 2.0], pa.float16())}), tmp_path / "half.parquet")
    table, _ = _read_all(str(tmp_path / "half.parquet"), config)
    assert table["c"].to_pylist() == [b"1.5", b"2"]


def test_a_row_longer_than_the_parser_block_names_the_setting_to_raise(tmp_path):
    """pyarrow's "straddling object ... try to increase block size?" named no option ctrkit has."""
    columns = [ColumnSpec("label", kind="label"), ColumnSpec("c")]
    path = _write(tmp_path / "long.csv", b"label,c\n1,a\n0," + b"x" * (3 << 20) + b"\n1,b\n")
    with pytest.raises(InputError, match=r"long.csv: a row near line \d+ is longer than the parser's block .*raise "
                                         r"data.batch_size"):
        _read_all(path, DataConfig(format="csv", columns=columns, batch_size=1024))
    table, rejected = _read_all(path, DataConfig(format="csv", columns=columns, batch_size=1 << 15))
    assert rejected == [] and table.num_rows == 3


def test_a_failed_jobs_rejected_rows_never_replace_a_directory_of_other_files(tmp_path):
    """``<output>.rejected`` holding a user's own files (a name they chose) gets a time-stamped sibling."""
    from ctrkit.pipelines.runner import _FS, _keep_rejected

    work = tmp_path / ".out.tmp-1"
    (work / "rejected").mkdir(parents=True)
    (work / "rejected" / "part-00000-of-00001.jsonl").write_text('{"line": 7}\n')
    theirs = tmp_path / "out.rejected"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    kept = _keep_rejected(str(work), str(tmp_path / "out"), _FS(False))
    assert kept.startswith(f"{theirs}-") and kept != str(theirs)
    assert os.listdir(kept) == ["part-00000-of-00001.jsonl"]
    assert os.listdir(theirs) == ["notes.txt"] and not os.listdir(work / "rejected")


def test_max_rejected_fraction_is_a_fraction_or_null():
    assert DataConfig(max_rejected_fraction=None).max_rejected_fraction is None
    for bad in (-0.01, 1.5, True):
        with pytest.raises(ConfigError, match="data.max_rejected_fraction: must be a fraction from 0 to 1"):
            DataConfig(max_rejected_fraction=bad)
