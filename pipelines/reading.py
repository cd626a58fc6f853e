"""Arrow-native reading and validation of raw click logs (no Beam, no TensorFlow).

:func:`read_file` turns one input file (Criteo TSV, CSV with a header, or Parquet; compressed text recognised by its magic bytes) into
record batches of *clean* rows plus a list of :class:`Rejected` rows. Parsing is pyarrow's C++ CSV reader;
validation is vectorised Arrow compute, so no Python runs per valid row. Only rows the parser itself
refuses (wrong field count) pass through Python, one by one.

Clean batch layout (what the rest of the pipeline consumes):

* label → float32, never null (validated to be 0 or 1)
* numeric → float32, null where missing
* categorical → binary (UTF-8 validated), null where missing; multi-valued columns are still joined
* timestamp → int64, never null;  teacher_logit → float32, never null
* ``__file`` int64 (index of the file in the sorted input list), ``__line`` int64 (1-based line number;
  row number for Parquet)
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import logging
import re
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ctrkit.errors import InputError
from ctrkit.schema import DataConfig, duplicated_names

log = logging.getLogger(__name__)

FILE_COLUMN = "__file"
LINE_COLUMN = "__line"
# Integers, decimals and exponents, as C strtod / pyarrow's float cast accept them (no inf/nan: a
# count of "nan" clicks is a broken log line, not a missing value).
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
# Unix seconds: an integer, or a whole decimal (`1700001000.0`, as pandas writes a float column to CSV) as a
# Parquet float column is read.
_WHOLE_SECONDS = r"^\s*[-+]?\d+(\.0*)?\s*$"


@dataclasses.dataclass(frozen=True)
class Rejected:
    """A raw row that was not written, and why."""

    file: str
    line: int
    raw: str
    reason: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def delimiter_of(config: DataConfig) -> str:
    if config.delimiter is not None:
        return config.delimiter
    return "\t" if config.format == "criteo_tsv" else ","


def raw_columns(config: DataConfig) -> list[str]:
    """Columns as they appear in the input, in order."""
    return [c.name for c in config.columns]


def used_columns(config: DataConfig):
    return [c for c in config.columns if c.kind != "ignore"]


def parquet_missing(config: DataConfig, file_names: list[str]) -> list[str]:
    """The columns ``data.columns`` reads that a Parquet file lacks. Parquet names its columns, so a ``kind: ignore``
    column, which is never read, may be absent: files written before a column was added and after both read."""
    return [c.name for c in used_columns(config) if c.name not in file_names]


def clean_schema(config: DataConfig) -> pa.Schema:
    """Arrow schema of the clean batches :func:`read_file` yields."""
    types = {"label": pa.float32(), "numeric": pa.float32(), "categorical": pa.binary(),
             "timestamp": pa.int64(), "teacher_logit": pa.float32()}
    fields = [pa.field(c.name, types[c.kind]) for c in used_columns(config)]
    return pa.schema(fields + [pa.field(FILE_COLUMN, pa.int64()), pa.field(LINE_COLUMN, pa.int64())])


# Compressed text is recognised by its first bytes, not its name: pyarrow's "detect" goes by a lower-case
# extension only, so a gzipped log named .TSV.GZ, .gzip or .tsv was read as raw bytes (its rows rejected
# as garbage, the job "successful").
# bz2: "BZh", the block size 1-9, then a block's or the end of stream's magic (text may start with "BZh").
_MAGIC = ((re.compile(rb"\x1f\x8b"), "gzip"), (re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P\x90)"), "bz2"),
          (re.compile(rb"\x28\xb5\x2f\xfd"), "zstd"), (re.compile(rb"\x04\x22\x4d\x18"), "lz4"))


def compression_of(path: str) -> str | None:
    """The codec whose magic bytes start the local file ``path`` (gzip, bz2, zstd, lz4), else None."""
    with open(path, "rb") as f:
        head = f.read(10)
    return next((codec for magic, codec in _MAGIC if magic.match(head)), None)


def _open_stream(path: str):
    """A pyarrow input stream, decompressed by content; remote paths through Beam's filesystems."""
    if "://" in path:
        from apache_beam.io.filesystems import FileSystems

        f = FileSystems.open(path)  # decompresses .gz by extension (CompressionTypes.AUTO)
        return pa.PythonFile(f, mode="r")
    return pa.input_stream(path, compression=compression_of(path))


def count_lines(path: str) -> int:
    """Lines of a text input as the parser splits them: ``\\n``, ``\\r\\n`` and a lone ``\\r`` each end one,
    and a last line without an end counts. Read through the parser's own stream (same decompression)."""
    n, previous_last = 0, b"\n"
    with _open_stream(path) as s:
        while chunk := s.read(1 << 24):
            n += chunk.count(b"\n") + chunk.count(b"\r") - chunk.count(b"\r\n")
            if previous_last == b"\r" and chunk[:1] == b"\n":
                n -= 1  # a \r\n split across two reads was counted twice
            previous_last = chunk[-1:]
    return n + (previous_last not in (b"\n", b"\r"))


def read_file(path: str, file_index: int, config: DataConfig,
              counts: dict[str, int] | None = None) -> Iterator[tuple[pa.RecordBatch, list[Rejected]]]:
    """Yield ``(clean_batch, rejected_rows)`` pairs for one input file, in file order.

    ``counts``, when given, gets ``"rows_padded"`` raised by the short rows padded with missing values
    (``short_rows: pad``): they are clean rows, but a config with one column too many pads every row, so
    the pipeline reports how many there were.

    Raises:
        InputError: the file is missing, its header/schema does not match the config.
    """
    if config.format == "parquet":
        yield from _read_parquet(path, file_index, config)
    else:
        yield from _read_delimited(path, file_index, config, counts)


# -- delimited text ---------------------------------------------------------------------------------
class _UndecodableRefusedRow(Exception):
    """pyarrow stopped on a row it refused (wrong field count) whose bytes are not UTF-8."""


def _read_delimited(path: str, file_index: int, config: DataConfig, counts: dict[str, int] | None):
    """Parse with pyarrow; if a refused row is not UTF-8 (pyarrow cannot hand such a row to the handler and
    stops the file), read the file again with those rows masked, continuing after what was yielded.

    Only for unquoted formats (Criteo TSV), where a line is a row and its field count is its delimiter
    count: with CSV quoting a masked line could sit inside a quoted field, so a CSV file with such a row
    still fails with an error naming the line.
    """
    progress = {"done_through": 0}
    try:
        yield from _read_delimited_pass(path, file_index, config, counts, progress, None)
    except _UndecodableRefusedRow as e:
        log.warning("%s: line %s has the wrong number of fields and bytes that are not UTF-8; reading the file "
                    "again with such rows rejected (a UnicodeDecodeError pyarrow printed for it is handled)",
                    path, e)
        masked = _MaskUndecodableRows(delimiter_of(config).encode(), len(raw_columns(config)))
        yield from _read_delimited_pass(path, file_index, config, counts, progress, masked)


def _read_delimited_pass(path: str, file_index: int, config: DataConfig, counts: dict[str, int] | None,
                         progress: dict[str, int], masked: "_MaskUndecodableRows | None"):
    """One parse of the file. Lines below ``progress["done_through"]`` were yielded by an earlier pass and are
    skipped; ``progress`` is kept up to date for a later one."""
    names = raw_columns(config)
    delim = delimiter_of(config)
    header = config.format == "csv" and config.header
    quote = '"' if config.format == "csv" else False
    skip_below = progress["done_through"]
    can_mask = masked is None and not quote  # a first pass over an unquoted file may be read again, masked
    try:
        stream = _open_stream(path)
        if masked is not None:
            masked.source = stream
            stream = masked
    except FileNotFoundError as e:
        raise InputError(f"input file {path} not found") from e
    except OSError as e:
        raise InputError(f"cannot open input file {path}: {e}") from e
    first_line = 1
    if header:
        first_line = 2
        check_schema(path, config)

    bad: list = []

    def on_invalid(row) -> str:
        bad.append((row.number, row.text, row.actual_columns))
        return "skip"

    # Rows ≈ bytes / 256 for Criteo-shaped logs: aim the parser's blocks at config.batch_size rows.
    block_size = max(1 << 20, min(1 << 28, config.batch_size * 256))
    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(
                column_names=names, skip_rows=1 if header else 0, use_threads=False, block_size=block_size
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=delim, quote_char=quote, ignore_empty_lines=False, invalid_row_handler=on_invalid
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.binary() for n in names}, strings_can_be_null=True,
                # "" is missing as an empty field is: pandas' to_csv(quoting=QUOTE_ALL / QUOTE_NONNUMERIC)
                # writes a NaN as "", and each such row was rejected as "'' is not a valid number".
                quoted_strings_can_be_null=True, null_values=[""],
            ),
        )
    except (pa.ArrowInvalid, OSError) as e:
        if "Empty CSV file" in str(e) or (header and _only_a_header(path)):
            return  # an empty file has no rows; the driver decides whether *all* input is empty
        raise _parse_failure(path, first_line, e, can_mask) from e  # open_csv parses the first block
    except FileNotFoundError as e:
        raise InputError(f"input file {path} not found") from e

    # use_threads=False gives refused rows their line numbers, but the parser still reads ahead: when
    # a batch is returned, on_invalid has seen the refused rows of that batch *and* of blocks parsed
    # after it (open_csv parses one block, each read another). So refused rows wait in `pending`,
    # sorted by line, and each batch takes exactly those inside its span: a batch of n parsed rows that
    # starts at next_line ends once n lines that were not refused have gone by.
    pending: list = []
    next_line = first_line
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except (pa.ArrowInvalid, OSError) as e:
            raise _parse_failure(path, next_line, e, can_mask) from e
        pending = _take_refused(pending, bad, next_line, path)
        end = next_line + batch.num_rows
        k = 0
        while k < len(pending) and pending[k][0] < end:
            end += 1  # a refused row inside the span pushes its end one line further
            k += 1
        refused, pending = pending[:k], pending[k:]
        lines = np.arange(next_line, end, dtype=np.int64)
        if refused:
            lines = lines[~np.isin(lines, np.array([r[0] for r in refused], dtype=np.int64))]
        next_line = end
        if end <= skip_below:
            continue  # yielded by the pass before
        out = _settle(batch, lines, refused, file_index, path, config, names, delim, quote, counts, masked,
                      skip_below)
        progress["done_through"] = end
        if out is not None:
            yield out
    # Refused rows after the last parsed row (e.g. a short last line) belong to no batch.
    pending = _take_refused(pending, bad, next_line, path)
    if pending:
        empty = pa.RecordBatch.from_pylist([], schema=pa.schema([pa.field(n, pa.binary()) for n in names]))
        out = _settle(empty, np.zeros(0, dtype=np.int64), pending, file_index, path, config, names, delim, quote,
                      counts, masked, skip_below)
        if out is not None:
            yield out


def _take_refused(pending: list, bad: list, next_line: int, path: str) -> list:
    """``pending`` plus the rows refused since the last read, sorted by line; checks none is behind us."""
    if bad:
        if any(r[0] is None or r[0] < 0 for r in bad):  # only threaded parsing leaves them unnumbered
            raise InputError(f"{path}: the CSV parser refused a row without giving its line number")
        pending = sorted(pending + bad, key=lambda r: r[0])
        bad.clear()
    if pending and pending[0][0] < next_line:
        raise InputError(f"{path}: refused row at line {pending[0][0]} is before line {next_line}, which is "
                         f"already read (reader out of sync)")
    return pending


def _settle(batch: pa.RecordBatch, lines: np.ndarray, refused: list, file_index: int, path: str,
            config: DataConfig, names: list[str], delim: str, quote, counts: dict[str, int] | None,
            masked: "_MaskUndecodableRows | None" = None, skip_below: int = 0):
    """Validate one parsed batch plus the refused rows of its span; None when nothing is left to yield.

    Short rows are padded (``short_rows: pad``) and merged back in line order; the others are rejected.
    Rows below line ``skip_below`` were yielded by an earlier pass over the file and are dropped.
    """
    if skip_below:
        keep = lines >= skip_below
        if not keep.all():
            batch, lines = batch.filter(pa.array(keep)), lines[keep]
        refused = [r for r in refused if r[0] >= skip_below]
    rejected: list[Rejected] = []
    padded_rows = []
    padded_lines = []
    for number, text, n_fields in refused:
        raw = masked.rows.get(text) if masked is not None else None
        if raw is not None:
            rejected.append(Rejected(path, int(number), raw.decode("utf-8", "backslashreplace"),
                                     f"wrong number of fields: {raw.count(masked.delimiter) + 1}, expected "
                                     f"{len(names)}, and undecodable bytes (not UTF-8)"))
        elif quote and (spans := _runs_over_rows(text.encode(), delim, len(names))):
            # A quote opened and never closed swallows the lines up to the next quote (often the end of the
            # file) into one field; padding that row would train on it and hide the lost lines.
            log.warning("%s: the row at line %d has a quoted field running over %d lines (an unterminated "
                        "quote?); it is rejected with those lines (see rejected/)", path, number, spans)
            rejected.append(Rejected(path, int(number), text,
                                     f"wrong number of fields: {n_fields}, expected {len(names)}; a quoted field "
                                     f"runs over {spans} lines (an unterminated quote?)"))
        elif n_fields < len(names) and config.short_rows == "pad":
            padded_rows.append(_split(text, delim, quote))
            padded_lines.append(number)
        else:
            rejected.append(Rejected(path, int(number), text,
                                     f"wrong number of fields: {n_fields}, expected {len(names)}"))
    if padded_rows:
        extra = _rows_to_batch(padded_rows, names)
        batch = pa.concat_tables([pa.Table.from_batches([batch]), pa.Table.from_batches([extra])]) \
            .combine_chunks().to_batches()[0] if batch.num_rows else extra
        lines = np.concatenate([lines, np.array(padded_lines, dtype=np.int64)])
        order = np.argsort(lines, kind="stable")
        batch = batch.take(pa.array(order))
        lines = lines[order]
    if batch.num_rows == 0:
        if rejected:
            return pa.RecordBatch.from_pylist([], schema=clean_schema(config)), rejected
        return None
    clean, more_rejected = validate(batch, lines, file_index, path, config, delim)
    if padded_lines and counts is not None:  # only those validation kept: a padded row can lack its label
        kept = np.isin(np.array(padded_lines, dtype=np.int64), clean.column(LINE_COLUMN).to_numpy())
        counts["rows_padded"] = counts.get("rows_padded", 0) + int(kept.sum())
    return clean, rejected + more_rejected


_HANDLER_FAILED = re.compile(r"Row #(-?\d+): Expected (\d+) columns, got (\d+)")
_LINE_END = re.compile(rb"(\r\n|\r|\n)")  # what ends a row for pyarrow's CSV parser


class _MaskUndecodableRows(io.RawIOBase):
    """A byte stream that replaces each line that is not UTF-8 *and* has the wrong number of fields by a
    one-field marker line, keeping the original in :attr:`rows` (marker → raw bytes).

    pyarrow decodes a refused row's text before calling the invalid-row handler and stops the whole file
    when that fails; a marker line is refused like any other row with the wrong field count (a config has
    at least two columns) and :func:`_settle` rejects it with the original bytes. Lines keep their numbers.
    Lines with the right field count pass unchanged: pyarrow reads their fields as bytes, and validation
    rejects undecodable values per field. Used only for a second pass over a file that needed it, and only
    for unquoted formats: lines end where pyarrow's rows end (``\r\n``, ``\r`` or ``\n``), and the
    delimiter count gives the field count.
    """

    MARKER = "\x01ctrkit-undecodable-row-"

    def __init__(self, delimiter: bytes, n_columns: int) -> None:
        super().__init__()
        self.delimiter = delimiter
        self.n_columns = n_columns
        self.source = None  # set to the file's stream before reading
        self.rows: dict[str, bytes] = {}
        self._tail = bytearray()
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not len(self._out):
            chunk = self.source.read(1 << 22)
            if not chunk:
                if not self._tail:
                    return 0
                block, self._tail = bytes(self._tail), bytearray()
            else:
                # Only whole lines, so a character never straddles two blocks. A "\r\n" cut between
                # its bytes leaves an empty line between them, which passes unchanged: the bytes are the same.
                cut = max(chunk.rfind(b"\n"), chunk.rfind(b"\r")) + 1
                if not cut:
                    self._tail += chunk
                    continue
                block = bytes(self._tail) + chunk[:cut]
                self._tail = bytearray(chunk[cut:])
            self._out = memoryview(self._mask(block))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _mask(self, block: bytes) -> bytes:
        try:
            block.decode("utf-8")
            return block  # the common case: nothing to mask in this block
        except UnicodeDecodeError:
            pass
        parts = _LINE_END.split(block)  # contents at even positions, line ends (kept) at odd ones
        for i in range(0, len(parts), 2):
            line = parts[i]
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                if line.count(self.delimiter) + 1 != self.n_columns:
                    marker = f"{self.MARKER}{len(self.rows)}"
                    self.rows[marker] = line
                    parts[i] = marker.encode()
        return b"".join(parts)


def _parse_failure(path: str, near_line: int, e: Exception, can_mask: bool) -> Exception:
    """What a parse failure raises: :class:`_UndecodableRefusedRow` (read the file again, masked) when pyarrow
    stopped on an undecodable refused row and ``can_mask``, else the user's :func:`_read_error`."""
    m = _HANDLER_FAILED.search(str(e))
    if m and can_mask:
        return _UndecodableRefusedRow(m.group(1))
    return _read_error(path, near_line, e)


def _read_error(path: str, near_line: int, e: Exception) -> InputError:
    """One-line InputError for a parse failure, naming the line where it is known."""
    m = _HANDLER_FAILED.search(str(e))
    if m and int(m.group(1)) > 0:
        # Our handler refuses every bad row, so the parser only stops on one when pyarrow could not hand
        # it over: it decodes the row's text as UTF-8 before calling the handler, and fails on bad bytes.
        return InputError(f"{path}: line {m.group(1)} has {m.group(3)} fields instead of {m.group(2)} and "
                          f"contains bytes that are not UTF-8, which the CSV parser cannot report as a rejected "
                          f"row; fix or remove that line")
    if "straddling object" in str(e):  # pyarrow's advice, "increase block size", names no ctrkit setting
        return InputError(f"{path}: a row near line {near_line} is longer than the parser's block (data.batch_size "
                          "x 256 bytes, at least 1 MiB); raise data.batch_size so a block holds the longest row")
    return InputError(f"{path}: cannot read near line {near_line}: {e}")


def check_schema(path: str, config: DataConfig) -> None:
    """Fail fast (before any Beam work) when a file's header / Parquet schema disagrees with the config.

    Headerless formats are checked row by row instead (wrong field counts are rejected rows).
    """
    names = raw_columns(config)
    if config.format == "parquet":
        import pyarrow.parquet as pq

        try:
            file_names = pq.ParquetFile(path).schema_arrow.names
        except FileNotFoundError as e:
            raise InputError(f"input file {path} not found") from e
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{path}: not a readable Parquet file ({e})") from e
        duplicated = sorted(set(duplicated_names(file_names)) & {c.name for c in used_columns(config)})
        if duplicated:  # pyarrow cannot select such a column by name: the job failed with a KeyError
            raise InputError(f"{path}: Parquet columns {duplicated} appear more than once; write the file with "
                             "unique column names")
        missing = parquet_missing(config, file_names)
        extra = [n for n in file_names if n not in names]
        if missing or extra:
            raise InputError(f"{path}: Parquet columns do not match data.columns: "
                             f"missing {missing}, unexpected {extra} (declare extra columns with kind: ignore)")
        return
    if not (config.format == "csv" and config.header):
        return
    file_names = _read_header(path, delimiter_of(config))
    if file_names != names:
        missing = [n for n in names if n not in file_names]
        extra = [n for n in file_names if n not in names]
        detail = []
        duplicated = duplicated_names(file_names)
        if duplicated:
            detail.append(f"duplicated columns {duplicated}")
        if missing:
            detail.append(f"missing columns {missing}")
        if extra:
            detail.append(f"unexpected columns {extra} (declare them with kind: ignore)")
        if not detail:
            i = next(i for i, (a, b) in enumerate(zip(file_names, names)) if a != b)
            detail.append(f"the same columns in another order (column {i + 1} is {file_names[i]!r} in the file, "
                          f"{names[i]!r} in the config); text columns are read by position, so list data.columns "
                          "in the header's order")
        raise InputError(f"{path}: header does not match data.columns: {'; '.join(detail)}")


def read_timestamps(path: str, config: DataConfig) -> np.ndarray:
    """The timestamps of the rows of one file that :func:`read_file` keeps, in file order.

    Used to plan the analyzed windows before the job, so it reads exactly as the job does: a row
    rejected there (bad timestamp, or any other bad field) must not count towards a window here, and a
    short row padded there must.
    """
    ts = config.timestamp
    parts = [batch.column(ts).to_numpy() for batch, _ in read_file(path, 0, config) if batch.num_rows]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _read_header(path: str, delim: str) -> list[str]:
    with _open_stream(path) as s:
        first = b""
        while not _LINE_END.search(first):
            chunk = s.read(1 << 16)
            if not chunk:
                break
            first += chunk
            if len(first) > (1 << 24):
                break
    line = _LINE_END.split(first, 1)[0]  # any line end: a CR-only file was one "header" line
    if line.startswith(codecs.BOM_UTF8):  # Excel writes one; the CSV parser itself skips it too
        line = line[len(codecs.BOM_UTF8):]
    if not line:
        raise InputError(f"{path}: empty file (expected a header line)")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: header line is not UTF-8 ({e})") from e
    return next(csv.reader(io.StringIO(text), delimiter=delim))


def _only_a_header(path: str) -> bool:
    """Whether the file is one line (pyarrow cannot skip a header that has no line end after it)."""
    with _open_stream(path) as s:
        head = s.read(1 << 21)
    return len(head) < (1 << 21) and not _LINE_END.search(head.rstrip(b"\r\n"))


def _split(text: str, delim: str, quote) -> list[str]:
    if quote:
        return next(csv.reader(io.StringIO(text), delimiter=delim))
    return text.split(delim)


def _rows_to_batch(rows: list[list[str]], names: list[str]) -> pa.RecordBatch:
    """Short rows padded with missing values up to the configured columns."""
    cols = []
    for j in range(len(names)):
        values = [(r[j].encode("utf-8", "surrogateescape") if j < len(r) and r[j] != "" else None) for r in rows]
        cols.append(pa.array(values, pa.binary()))
    return pa.RecordBatch.from_arrays(cols, names=names)


# -- validation (vectorised) ------------------------------------------------------------------------
def _raw_lines(batch: pa.RecordBatch, rows: np.ndarray, names: list[str], delim: str, quoted: bool) -> list[str]:
    """Reconstruct the raw text of a few rows (for rejected/), missing fields as empty strings.

    CSV fields that need it are quoted again (minimal quoting), so a rejected row parses back to the fields
    it was read as; TSV rows come back exactly.
    """
    sub = batch.take(pa.array(rows)).to_pydict()
    out = []
    for i in range(len(rows)):
        fields = ["" if v is None else (v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else str(v))
                  for v in (sub[n][i] for n in names)]
        if quoted:
            text = io.StringIO()
            csv.writer(text, delimiter=delim, quotechar='"', lineterminator="").writerow(fields)
            out.append(text.getvalue())
        else:
            out.append(delim.join(fields))
    return out


def _utf8_invalid(col: pa.Array) -> np.ndarray | None:
    """Boolean mask of non-UTF-8 values, or None when the whole column is valid (the common case)."""
    try:
        col.cast(pa.string())
        return None
    except pa.ArrowInvalid:
        values = col.to_pylist()
        mask = np.zeros(len(values), dtype=bool)
        for i, v in enumerate(values):
            if v is not None:
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError:
                    mask[i] = True
        return mask


def _to_float(col: pa.Array) -> pa.Array | None:
    """Fast path: the whole column parses as finite numbers (or is missing); None when it does not."""
    try:
        number = pc.cast(col.cast(pa.string()), pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if not pc.all(pc.fill_null(pc.is_finite(number), True)).as_py():
        return None
    return number


# Timestamps are Unix seconds. Outside these years a value is a unit mistake (a log in milliseconds is
# ~1.7e12, the year ~55,000) or garbage: it would make its own window and end a job after all its work
# on a date Python cannot represent.
TIMESTAMP_RANGE = (-2_208_988_800, 32_503_680_000)  # [1900-01-01, 3000-01-01) UTC


def _implausible_seconds(seconds: pa.Array) -> np.ndarray:
    low, high = TIMESTAMP_RANGE
    outside = pc.or_(pc.less(seconds, low), pc.greater_equal(seconds, high))
    return pc.fill_null(outside, False).to_numpy(zero_copy_only=False)


def _to_int64(good: pa.Array, reject) -> pa.Array:
    """Cast trimmed integer strings (null where invalid) to int64; ``reject(mask)`` the ones beyond int64."""
    try:
        return pc.cast(good, pa.int64())
    except pa.ArrowInvalid:
        # Beyond int64 (the regex has no length limit), or a leading '+' that Arrow's cast refuses: convert
        # in Python, value by value, and reject only the values too large for int64.
        ints = [None if v is None else int(v) for v in good.to_pylist()]
        big = np.array([i is not None and not -(1 << 63) <= i < (1 << 63) for i in ints], dtype=bool)
        reject(big)
        return pa.array([None if b else i for i, b in zip(ints, big)], pa.int64())


def _value_at(col: pa.Array):
    """``i -> col[i]`` as a Python value, for the reason of a rejected row: converting the whole column
    there (``col.to_pylist()[i]``) made every rejected row cost a pass over its batch (50% bad labels:
    586 s instead of 63 s for 400k rows)."""
    return lambda i: col[int(i)].as_py()


def validate(batch: pa.RecordBatch, lines: np.ndarray, file_index: int, path: str, config: DataConfig,
             delim: str = "\t") -> tuple[pa.RecordBatch, list[Rejected]]:
    """Check and convert one batch of binary columns; returns the clean batch and the rejected rows.

    The first failing check of a row names the reason (field and value); the row is dropped. Every
    check has a whole-column fast path (one Arrow cast); only a column that fails it is examined
    value by value.
    """
    n = batch.num_rows
    names = [f.name for f in batch.schema]
    reason = np.full(n, None, dtype=object)

    def reject(mask: np.ndarray, why) -> None:
        fresh = mask & (reason == None)  # noqa: E711 - elementwise on an object array
        for i in np.flatnonzero(fresh):
            reason[i] = why(i) if callable(why) else why

    if config.format == "csv":
        for name in names:
            for i, spans in _swallowed_lines(batch.column(name), delim, len(names)).items():
                log.warning("%s: field %s of the row at line %d runs over %d lines that look like rows (an "
                            "unterminated quote?); it is rejected with those lines (see rejected/)",
                            path, name, lines[i], spans)
                reject(np.arange(n) == i, f"field {name}: a quoted field runs over {spans} lines, and the later "
                                          "ones look like rows of the file (an unterminated quote?)")
    out: dict[str, pa.Array] = {}
    for spec in used_columns(config):
        col = batch.column(spec.name)
        if spec.kind == "categorical":
            bad = _utf8_invalid(col)
            if bad is not None:
                reject(bad, f"undecodable bytes (not UTF-8) in field {spec.name}")
            out[spec.name] = col
            continue
        missing = col.is_null().to_numpy(zero_copy_only=False)
        what = {"numeric": "number", "label": "label", "timestamp": "timestamp", "teacher_logit": "teacher logit"}[spec.kind]
        if spec.kind != "numeric":
            reject(missing, f"field {spec.name}: missing {what}")
        number = None if spec.kind == "timestamp" else _to_float(col)
        if number is None:  # slow path: find the offending values
            bad_utf8 = _utf8_invalid(col)
            if bad_utf8 is not None:
                reject(bad_utf8, f"undecodable bytes (not UTF-8) in field {spec.name}")
                col = pc.if_else(pa.array(~bad_utf8), col, pa.nulls(n, pa.binary()))
            pattern = _WHOLE_SECONDS if spec.kind == "timestamp" else _NUMBER
            ok = pc.fill_null(pc.match_substring_regex(col, pattern), False).to_numpy(zero_copy_only=False)
            values = _value_at(col)
            what_valid = "timestamp (whole Unix seconds)" if spec.kind == "timestamp" else what
            reject(~missing & ~ok, lambda i, s=spec.name, v=values, w=what_valid: f"field {s}: {_show(v(i))} is not a valid {w}")
            good = pc.utf8_trim_whitespace(pc.if_else(pa.array(ok), col, pa.nulls(n, pa.binary())).cast(pa.string()))
            if spec.kind == "timestamp":
                good = pc.replace_substring_regex(good, r"\.0*$", "")
                seconds = _to_int64(good, lambda mask, s=spec.name, v=values: reject(
                    mask, lambda i: f"field {s}: {_show(v(i))} is out of int64 range"))
                reject(_implausible_seconds(seconds), lambda i, s=spec.name, v=values: (
                    f"field {s}: {_show(v(i))} is not a Unix time in seconds between the years 1900 and 3000 "
                    "(timestamps in milliseconds or microseconds must be divided down to seconds)"))
                out[spec.name] = seconds
                continue
            number = pc.cast(good, pa.float64())
        if spec.kind == "label":
            # Compared by value, not with is_in, which hashes bit patterns and so refused "-0".
            is01 = pc.fill_null(pc.or_(pc.equal(number, 0.0), pc.equal(number, 1.0)), True)
            is01 = is01.to_numpy(zero_copy_only=False)
            reject(~is01, lambda i, s=spec.name, v=_value_at(col): f"field {s}: label {_show(v(i))} is not 0 or 1")
            number = pc.add(number, 0.0)  # -0.0 + 0.0 is +0.0: the label written is a plain 0
        number = pc.cast(number, pa.float32(), safe=False)
        # The regex bounds the syntax, not the size: 1e39 overflows float32 (1e400 float64) to inf, which
        # must not reach the model.
        finite = pc.fill_null(pc.is_finite(number), True).to_numpy(zero_copy_only=False)
        if not finite.all():
            reject(~finite, lambda i, s=spec.name, v=_value_at(col): f"field {s}: {_show(v(i))} is out of float32 range")
        out[spec.name] = number

    keep = np.array([r is None for r in reason], dtype=bool) if n else np.ones(0, dtype=bool)
    rejected: list[Rejected] = []
    arrays = [out[c.name] for c in used_columns(config)]
    if not keep.all():
        idx = np.flatnonzero(~keep)
        raws = _raw_lines(batch, idx, names, delim, quoted=config.format == "csv")
        for i, raw in zip(idx, raws):
            why = str(reason[i])
            if all(batch.column(c)[int(i)].as_py() is None for c in names):
                why = "empty line"
            rejected.append(Rejected(path, int(lines[i]), raw, why))
        take = pa.array(np.flatnonzero(keep))
        arrays = [a.take(take) for a in arrays]
    arrays += [pa.array(np.full(int(keep.sum()), file_index, dtype=np.int64)), pa.array(lines[keep])]
    return pa.RecordBatch.from_arrays(arrays, schema=clean_schema(config)), rejected


def _swallowed_lines(col: pa.Array, delim: str, n_columns: int) -> dict[int, int]:
    """Row → line count, for the values of ``col`` that :func:`_runs_over_rows` finds."""
    breaks = pc.or_(pc.match_substring(col, "\n"), pc.match_substring(col, "\r"))
    breaks = pc.fill_null(breaks, False).to_numpy(zero_copy_only=False)
    found = {}
    for i in np.flatnonzero(breaks):
        spans = _runs_over_rows(col[int(i)].as_py(), delim, n_columns)
        if spans:
            found[int(i)] = spans
    return found


def _runs_over_rows(text: bytes, delim: str, n_columns: int) -> int | None:
    """The number of lines of ``text`` if its later lines look like rows of the file, else None.

    A quote opened and never closed takes the lines up to the next quote (often the end of the file) into
    one field, and the row can still have the right number of fields. Such lines each hold exactly a row's
    delimiters. Free text with line breaks seldom does, line after line: at least two later lines, and
    most of them, must look like rows. (So a quote left open on the second-to-last line, swallowing one
    row, goes unnoticed.)
    """
    later = _LINE_END.split(text.rstrip(b"\r\n"))[2::2]
    separator = delim.encode()
    like_rows = sum(line.count(separator) == n_columns - 1 for line in later)
    if like_rows >= 2 and 2 * like_rows > len(later):
        return len(later) + 1
    return None


def _show(v) -> str:
    if isinstance(v, bytes):
        v = v.decode("utf-8", "backslashreplace")
    return repr(v)


# -- parquet ----------------------------------------------------------------------------------------
def _read_parquet(path: str, file_index: int, config: DataConfig):
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(_open_stream(path) if "://" in path else path)
    except FileNotFoundError as e:
        raise InputError(f"input file {path} not found") from e
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from e
    names = raw_columns(config)
    file_names = f.schema_arrow.names
    missing = parquet_missing(config, file_names)
    if missing:
        raise InputError(f"{path}: Parquet file lacks columns {missing} named in data.columns")
    extra = [n for n in file_names if n not in names]
    if extra:
        raise InputError(f"{path}: Parquet file has columns {extra} not in data.columns (declare them with kind: ignore)")
    # Ignored columns are neither read nor converted: they may have any type (lists, structs, ...).
    names = [c.name for c in used_columns(config)]
    next_row = 1
    for batch in f.iter_batches(batch_size=config.batch_size, columns=names):
        lines = np.arange(next_row, next_row + batch.num_rows, dtype=np.int64)
        next_row += batch.num_rows
        # Typed Parquet columns go through the same validation as text: render them as text once.
        cols = [_parquet_as_text(batch.column(name), name, path) for name in names]
        text_batch = pa.RecordBatch.from_arrays(cols, names=names)
        yield validate(text_batch, lines, file_index, path, config, delim="\t")


def _parquet_as_text(col: pa.Array, name: str, path: str) -> pa.Array:
    """One Parquet column as the binary text a delimited file would hold, missing values as nulls.

    Missing is what the writers use for it: null, an empty string (as an empty field is in text), and NaN
    in a float column (pandas without nullable dtypes). Dictionary (pandas ``category``) columns are
    decoded, an all-null column is all missing, dates and timestamps become Unix seconds (floored to whole
    seconds), decimals their exact text (whole ones without their zero fraction). Large and view
    string/binary columns (polars, pyarrow's ``string_view``) read as the plain ones.
    """
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_null(col.type):
        return pa.nulls(len(col), pa.binary())
    if pa.types.is_timestamp(col.type):  # floored, so -1.5 s is -2 like any time before 1970
        col = pc.floor_temporal(col, unit="second").cast(pa.timestamp("s", tz=col.type.tz)).cast(pa.int64())
    elif pa.types.is_date(col.type):
        col = col.cast(pa.timestamp("s")).cast(pa.int64())
    elif pa.types.is_decimal(col.type):
        # Exact text (a float would merge long decimal ids of a categorical column), a whole value without its
        # zero fraction: a warehouse NUMERIC(14,2) id column reads "123", as the int64 column it replaced did.
        col = pc.replace_substring_regex(col.cast(pa.string()), r"^(-?\d+)\.0+$", r"\1")
    elif pa.types.is_boolean(col.type):
        col = col.cast(pa.int8())
    if pa.types.is_floating(col.type):
        if col.type == pa.float16():  # numpy float16; floor and friends have no half-float kernels
            col = col.cast(pa.float32())
        col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
        # Whole numbers as integer text: pandas stores an int id column holding a NaN as float64, and its
        # ids must read as in the files where it stayed int64 ("123456789012", not "1.23456789012e+11",
        # which made a second vocabulary entry). Non-whole values, dropped by if_else, cast unsafely.
        whole = pc.and_(pc.equal(pc.floor(col), col), pc.less(pc.abs(col), 2.0**53))
        as_int = pc.cast(pc.if_else(whole, col, pa.scalar(0, col.type)), pa.int64(), safe=False)
        return pc.if_else(whole, as_int.cast(pa.string()), col.cast(pa.string())).cast(pa.binary())
    if pa.types.is_integer(col.type):
        return col.cast(pa.string()).cast(pa.binary())
    if (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_string_view(col.type)
            or pa.types.is_large_binary(col.type) or pa.types.is_binary_view(col.type)):
        col = col.cast(pa.binary())
    if pa.types.is_binary(col.type):
        return pc.if_else(pc.equal(col, b""), pa.scalar(None, pa.binary()), col)
    raise InputError(f"{path}: column {name} has unsupported Parquet type {col.type} (supported: strings, "
                     "binary, integers, floats, booleans, decimals, dates, timestamps, dictionary-encoded "
                     "columns of these)")
