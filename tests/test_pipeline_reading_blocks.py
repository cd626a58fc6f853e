"""Row accounting of ctrkit.pipelines.reading on files larger than one parser block.

pyarrow's CSV reader parses one block ahead of the batch it returns, so the rows it refuses (wrong field
count) reach the handler a block early. These files span several 1 MiB blocks, with refused rows in every
block and right at the end, and check that every physical line comes out exactly once, as itself.
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from ctrkit.pipelines.reading import read_file
from ctrkit.schema import ColumnSpec, DataConfig

N_LINES = 13_000  # ~3.4 MB of 40-field rows: four parser blocks at the 1 MiB floor
BATCH_SIZE = 100  # block_size = max(1 MiB, batch_size * 256) = 1 MiB


def _criteo_row(line: int) -> list[str]:
    """A full row that names its own line: I1 = line, C1 = r<line>, the other categoricals c<line>."""
    return ["1" if line % 3 else "0", str(line)] + [str(line % 97)] * 12 + [f"r{line}"] + [f"c{line:07d}"] * 25


def _kind(line: int, n_lines: int) -> str:
    """Which kind of line goes where: sparse early, dense later, and refused rows to the very end."""
    if line > n_lines - 3:
        return "short" if line % 2 else "long"  # refused rows after the last parsed row
    dense = line > n_lines // 2
    if line % (5 if dense else 41) == 1:
        return "short"
    if line % (7 if dense else 53) == 2:
        return "long"
    if line % (19 if dense else 97) == 3:
        return "empty"
    return "good"


@pytest.fixture(scope="module")
def multi_block_tsv(tmp_path_factory):
    lines, kinds = [], {}
    for ln in range(1, N_LINES + 1):
        kind = kinds[ln] = _kind(ln, N_LINES)
        row = _criteo_row(ln)
        text = {"good": row, "short": row[:16 + ln % 20], "long": row + ["extra"], "empty": []}[kind]
        lines.append("\t".join(text))
    path = tmp_path_factory.mktemp("blocks") / "multi_block.tsv"
    path.write_text("\n".join(lines) + "\n")
    assert os.path.getsize(path) > 3 * (1 << 20)  # the point of the test: several parser blocks
    return str(path), lines, kinds


@pytest.mark.parametrize("short_rows", ["pad", "reject"])
def test_every_line_of_a_multi_block_file_is_accounted_once(multi_block_tsv, short_rows):
    path, lines, kinds = multi_block_tsv
    config = DataConfig(short_rows=short_rows, batch_size=BATCH_SIZE)
    clean_lines, rejected, padded = [], [], {}
    n_batches = 0
    for batch, rej in read_file(path, 0, config):
        n_batches += 1
        rejected.extend(rej)
        got = batch.to_pydict()
        clean_lines.extend(got["__line"])
        # A clean row is the row of its own line: its values name that line.
        for ln, i1, c1 in zip(got["__line"], got["I1"], got["C1"]):
            assert (int(i1), c1) == (ln, f"r{ln}".encode()), ln
        for i, ln in enumerate(got["__line"]):
            if kinds[ln] == "short":
                padded[ln] = {c: got[c][i] for c in got}
    assert n_batches > 3
    rejected_lines = [r.line for r in rejected]
    assert sorted(clean_lines + rejected_lines) == list(range(1, N_LINES + 1))
    assert len(set(rejected_lines)) == len(rejected_lines)
    for r in rejected:
        kind = kinds[r.line]
        assert r.file == path
        if kind == "empty":
            assert r.reason in ("empty line", "wrong number of fields: 1, expected 40"), r
        else:
            assert r.raw == lines[r.line - 1], r.line  # the raw text is that of the physical line
            n_fields = len(lines[r.line - 1].split("\t"))
            assert r.reason == f"wrong number of fields: {n_fields}, expected 40", r
    expected_rejected = {ln for ln, k in kinds.items() if k in ("long", "empty")
                         or (k == "short" and short_rows == "reject")}
    assert set(rejected_lines) == expected_rejected
    if short_rows == "pad":
        # Padded rows carry their own values, and missing ones where their line was cut short.
        short = [ln for ln, k in kinds.items() if k == "short"]
        assert sorted(padded) == short and N_LINES - 1 in padded  # the short last-but-one line too
        for ln, row in padded.items():
            n_fields = len(lines[ln - 1].split("\t"))
            assert row["I2"] == float(ln % 97) and row["C2"] == f"c{ln:07d}".encode()
            last = f"C{n_fields - 14}"
            assert row[last] == f"c{ln:07d}".encode() and row[f"C{n_fields - 13}"] is None and row["C26"] is None
    else:
        assert not padded


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # pyarrow's own, logged
def test_undecodable_refused_rows_in_later_blocks_lose_only_themselves(multi_block_tsv, tmp_path):
    """A refused row with bytes that are not UTF-8 stops pyarrow's parse; the second pass must yield each
    line once: nothing again from before the stop, nothing skipped after it."""
    _, lines, kinds = multi_block_tsv
    raw = [ln.encode() for ln in lines]
    # From the third block on, so the first pass has yielded batches before it stops.
    undecodable = [ln for ln, k in kinds.items() if k in ("short", "long") and ln > N_LINES // 2][5::150]
    assert len(undecodable) > 3
    for ln in undecodable:
        raw[ln - 1] += b"\xff"
    path = tmp_path / "undecodable.tsv"
    path.write_bytes(b"\n".join(raw) + b"\n")
    config = DataConfig(short_rows="pad", batch_size=BATCH_SIZE)
    counts = {}
    clean_lines, rejected = [], []
    for batch, rej in read_file(str(path), 0, config, counts):
        clean_lines += batch["__line"].to_pylist()
        rejected += rej
    assert sorted(clean_lines + [r.line for r in rejected]) == list(range(1, N_LINES + 1))
    bad = {r.line: r for r in rejected if "undecodable" in r.reason}
    assert sorted(bad) == undecodable
    for ln, r in bad.items():
        n_fields = len(lines[ln - 1].split("\t"))
        assert r.reason == f"wrong number of fields: {n_fields}, expected 40, and undecodable bytes (not UTF-8)"
        assert r.raw == lines[ln - 1] + "\\xff"
    assert counts["rows_padded"] == sum(1 for ln, k in kinds.items() if k == "short" and ln not in bad)


def test_multi_block_file_through_the_beam_pipeline(tmp_path):
    """The same bookkeeping inside the job: rows read = written + rejected, rejected/ names real lines.

    A small schema (a wide ignored column keeps the file several blocks long with few rows), a timestamp
    column and analyze_windows, so the window planning reads the file the same way as the job.
    """
    from ctrkit.manifest import Manifest
    from ctrkit.pipelines import preprocess

    n_lines, day = 12_000, 86_400
    columns = [ColumnSpec("label", kind="label"), ColumnSpec("ts", kind="timestamp"),
               ColumnSpec("x", kind="numeric"), ColumnSpec("c"), ColumnSpec("pad", kind="ignore"),
               ColumnSpec("tail")]
    lines, expected_rejected = [], {}
    for ln in range(1, n_lines + 1):
        row = [str(ln % 2), str(day * (ln * 3 // n_lines)), str(ln), f"c{ln % 50}", "p" * 280, f"t{ln % 7}"]
        if ln % 9 == 4:
            row = row[:5]  # short: padded (tail missing)
        elif ln % 31 == 5 or ln == n_lines:
            row = row + ["extra"]
            expected_rejected[ln] = "wrong number of fields: 7, expected 6"
        elif ln % 37 == 6:
            row[1] = "99999999999999999999"
            expected_rejected[ln] = "field ts: '99999999999999999999' is out of int64 range"
        lines.append("\t".join(row))
    path = tmp_path / "blocks.tsv"
    path.write_text("\n".join(lines) + "\n")
    assert os.path.getsize(path) > 3 * (1 << 20)
    config = DataConfig(columns=columns, batch_size=BATCH_SIZE, window_seconds=day, analyze_windows=1,
                        max_rejected_fraction=0.1)  # ~5% of these rows are bad on purpose
    out = str(tmp_path / "out")
    preprocess(config, [str(path)], out)
    m = Manifest.load(out)
    assert m.rows_read == n_lines and m.rows_rejected == len(expected_rejected)
    assert m.rows_written == n_lines - len(expected_rejected)
    rejected = [json.loads(line) for p in sorted(glob.glob(os.path.join(out, "rejected", "*"))) for line in open(p)]
    assert {r["line"]: r["reason"] for r in rejected} == expected_rejected
    assert all(r["raw"] == lines[r["line"] - 1] for r in rejected)
    assert [w.rows for w in m.windows] == list(np.bincount(
        [ln * 3 // n_lines for ln in range(1, n_lines + 1) if ln not in expected_rejected]))


def test_readers_report_rows_read_for_the_progress_bar(multi_block_tsv, tmp_path):
    """Each read (the transform's, and analysis's second one) records its rows per file as it goes; the
    driver's bar sums them."""
    from ctrkit.pipelines.beam_pipeline import _ReadFile
    from ctrkit.pipelines.runner import _rows_reported

    path, lines, _ = multi_block_tsv
    config = DataConfig(short_rows="pad", batch_size=BATCH_SIZE)
    progress = tmp_path / "progress"
    progress.mkdir()
    seen = []
    for _ in _ReadFile(config, True, str(progress)).process((3, path, 0)):
        seen.append(_rows_reported(str(progress)))
    assert seen[0] < N_LINES and seen[-1] == N_LINES and seen == sorted(seen)  # it grows while reading
    list(_ReadFile(config, False, str(progress)).process((3, path, 0)))
    assert sorted(os.listdir(progress)) == ["analyze-3", "read-3"]
    assert _rows_reported(str(progress)) == 2 * N_LINES
