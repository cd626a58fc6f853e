"""Criteo-shaped synthetic click logs with planted feature crosses (known ground truth).

:func:`generate` returns a ``pyarrow.Table`` with the Criteo columns

* ``label``      int64 0/1
* ``I1..I13``    int64 counts, long-tailed, with missing values (nulls); ``I2`` can be negative like Criteo's
* ``C1..C26``    8-hex-char strings (32-bit "hashes"), long-tailed vocabularies, with missing values
* ``timestamp``  int64 seconds, non-decreasing, spanning ``days`` simulated days (optional)
* ``true_logit`` float64, the planted logit (only with ``with_truth=True``)

Ground truth. With ``s_c(v) ∈ {-1, +1}`` a fixed pseudo-random sign per (column, vocabulary index) and
``z(I1) = (log1p(I1) - 1.5) / 1.2`` (missing I1 → 0), the click probability is ``sigmoid(logit)`` with::

    logit = -1.5                                           bias: about 20-25 % clicks, like Criteo
            + 0.4 · s_C7(C7)                               a main effect
            + w2(t) · s_C1(C1) · s_C2(C2)                  2nd-order categorical cross
            + 0.6 · z(I1) · s_C3(C3)                       numeric × categorical cross
            + 0.9 · s_C4(C4) · s_C5(C5) · s_C6(C6)         3rd-order cross (no 1st/2nd-order signal)
    w2(t) = 1.2 · (1 - 0.75 · t)                           drift: the 2nd-order cross fades over time,
                                                           t = elapsed fraction of the simulated span
    a missing categorical value contributes sign 0.

Everything is vectorised NumPy/Arrow (no per-row Python): 1M rows take a few seconds.
Writers: :func:`write_tsv` (Criteo format: no header, no timestamp), :func:`write_csv`, :func:`write_parquet`.
"""
from __future__ import annotations

import gzip as _gzip
import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

NUMERIC = tuple(f"I{i}" for i in range(1, 14))
CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))
START_TIMESTAMP = 1_699_920_000  # a UTC midnight, so day windows align with simulated days
SECONDS_PER_DAY = 86_400

# Vocabulary sizes at 1M rows: a few tiny fields, a few huge ones, like Criteo. They scale with
# n_rows (down to a floor) so small samples still repeat their tokens.
_BASE_VOCAB = (
    1400, 550, 250_000, 120_000, 300, 20, 12_000, 600, 3, 50_000,
    5_000, 200_000, 3_000, 26, 9_000, 150_000, 10, 4_000, 2_000, 4,
    180_000, 15, 15, 60_000, 80, 45_000,
)
_CAT_MISSING = (
    0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0,
    0.0, 0.03, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0, 0.44, 0.44,
    0.03, 0.0, 0.76, 0.03, 0.44, 0.44,
)
_NUM_MISSING = (0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04, 0.77, 0.22)
_NUM_SCALE = (3.0, 100.0, 20.0, 7.0, 18_000.0, 115.0, 16.0, 12.0, 100.0, 0.6, 2.7, 1.0, 8.0)
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap, well-spread integer hash (vectorised)."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _hex8(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """uint32 values → Arrow string array of 8 lowercase hex chars, null where ``~valid``."""
    shifts = np.arange(28, -1, -4, dtype=np.uint64)
    digits = (values.astype(np.uint64)[:, None] >> shifts) & np.uint64(0xF)
    chars = _HEX[digits.astype(np.intp)]  # (n, 8) uint8
    n = len(values)
    offsets = np.arange(0, 8 * n + 1, 8, dtype=np.int32)
    null_bitmap = None if valid.all() else pa.array(valid).buffers()[1]
    return pa.StringArray.from_buffers(
        n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(chars.tobytes()), null_bitmap,
        null_count=int(n - valid.sum()),
    )


def _sign(column: int, index: np.ndarray) -> np.ndarray:
    """Fixed pseudo-random ±1 per (column, vocabulary index)."""
    with np.errstate(over="ignore"):
        h = _mix(index.astype(np.uint64) + np.uint64(column) * np.uint64(0x9E3779B97F4A7C15))
    return np.where((h & np.uint64(1)) == 1, 1.0, -1.0)


def generate(
    n_rows: int,
    seed: int = 0,
    days: int = 4,
    timestamp: bool = True,
    with_truth: bool = False,
    vocab_scale: float | None = None,
) -> pa.Table:
    """Generate ``n_rows`` Criteo-shaped click-log rows (see the module docstring for the ground truth).

    Args:
        n_rows: number of rows.
        seed: random seed; the same seed gives the same table.
        days: simulated days the ``timestamp`` column spans; the drift is a function of elapsed time.
        timestamp: add the integer ``timestamp`` column (seconds since the epoch, non-decreasing).
        with_truth: add a ``true_logit`` float64 column holding the planted logit.
        vocab_scale: multiplies the per-column vocabulary sizes; default ``min(1, n_rows / 1e6)`` with a
            floor of 3 tokens per column, so small samples still repeat tokens.

    Returns:
        A ``pyarrow.Table`` with columns label, I1..I13, C1..C26[, timestamp][, true_logit].

    Example:
        >>> t = generate(1000, seed=1)
        >>> t.num_rows, t.column_names[:3]
        (1000, ['label', 'I1', 'I2'])
    """
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    rng = np.random.default_rng(seed)
    scale = vocab_scale if vocab_scale is not None else min(1.0, max(n_rows, 1) / 1e6)
    # Time first: everything that drifts depends on it. Sorted, so the log is in time order.
    span = days * SECONDS_PER_DAY
    offsets = np.sort(rng.integers(0, span, size=n_rows))
    t_frac = offsets / span

    columns: dict[str, pa.Array] = {}
    numeric_raw: dict[str, np.ndarray] = {}
    for j, name in enumerate(NUMERIC):
        values = np.floor(rng.lognormal(mean=0.0, sigma=1.3, size=n_rows) * _NUM_SCALE[j] / 3.0).astype(np.int64)
        if name == "I2":  # Criteo's I2 has -1, -2, -3 values
            values = values - (rng.random(n_rows) < 0.08) * rng.integers(1, 4, size=n_rows)
        valid = rng.random(n_rows) >= _NUM_MISSING[j]
        numeric_raw[name] = np.where(valid, values, -1)
        columns[name] = pa.array(values, mask=~valid)

    cat_index: dict[str, np.ndarray] = {}
    cat_valid: dict[str, np.ndarray] = {}
    for j, name in enumerate(CATEGORICAL):
        vocab = max(3, int(round(_BASE_VOCAB[j] * scale)))
        # Log-uniform ranks: a long tail where a few tokens cover most rows.
        u = rng.random(n_rows)
        index = np.minimum(np.floor(np.expm1(u * np.log1p(vocab))), vocab - 1).astype(np.int64)
        valid = rng.random(n_rows) >= _CAT_MISSING[j]
        cat_index[name], cat_valid[name] = index, valid
        token = _mix(index.astype(np.uint64) * np.uint64(1_000_003) + np.uint64(j + 1)) & np.uint64(0xFFFFFFFF)
        columns[name] = _hex8(token, valid)

    def s(name: str) -> np.ndarray:
        col = CATEGORICAL.index(name) + 1
        return np.where(cat_valid[name], _sign(col, cat_index[name]), 0.0)

    i1 = numeric_raw["I1"]
    z_i1 = np.where(i1 >= 0, (np.log1p(np.maximum(i1, 0)) - 1.5) / 1.2, 0.0)
    logit = (
        -1.5
        + 0.4 * s("C7")
        + 1.2 * (1.0 - 0.75 * t_frac) * s("C1") * s("C2")
        + 0.6 * z_i1 * s("C3")
        + 0.9 * s("C4") * s("C5") * s("C6")
    )
    label = (rng.random(n_rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)

    arrays = {"label": pa.array(label)}
    arrays.update(columns)
    if timestamp:
        arrays["timestamp"] = pa.array(START_TIMESTAMP + offsets.astype(np.int64))
    if with_truth:
        arrays["true_logit"] = pa.array(logit)
    return pa.table(arrays)


def _criteo_columns(table: pa.Table) -> list[str]:
    return ["label", *NUMERIC, *CATEGORICAL]


def _open_out(path: str, gzip: bool):
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    if gzip:
        return _gzip.open(path, "wb", compresslevel=1)
    return open(path, "wb")


def write_tsv(table: pa.Table, path: str, gzip: bool = False) -> str:
    """Write the Criteo TSV format: label, I1..I13, C1..C26, tab-separated, no header, empty = missing.

    The timestamp and ``true_logit`` columns are not written (Criteo files carry neither).
    """
    return _write_delimited(table.select(_criteo_columns(table)), path, "\t", header=False, gzip=gzip)


def write_csv(table: pa.Table, path: str, header: bool = True, gzip: bool = False,
              columns: list[str] | None = None) -> str:
    """Write comma-separated values (all columns except ``true_logit`` unless ``columns`` is given)."""
    cols = columns or [c for c in table.column_names if c != "true_logit"]
    return _write_delimited(table.select(cols), path, ",", header=header, gzip=gzip)


def write_parquet(table: pa.Table, path: str, columns: list[str] | None = None) -> str:
    """Write a Parquet file (all columns except ``true_logit`` unless ``columns`` is given)."""
    cols = columns or [c for c in table.column_names if c != "true_logit"]
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    pq.write_table(table.select(cols), path)
    return path


def _write_delimited(table: pa.Table, path: str, delimiter: str, header: bool, gzip: bool) -> str:
    # quoting_style="none": Criteo-shaped values never contain the delimiter, and quotes would
    # change the bytes a real Criteo reader sees.
    options = pacsv.WriteOptions(include_header=header, delimiter=delimiter, quoting_style="none")
    with _open_out(path, gzip) as f:
        pacsv.write_csv(table, f, write_options=options)
    return path
