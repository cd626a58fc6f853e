"""Gzip TFRecord files written in bulk.

``tf.io.TFRecordWriter(options="GZIP")`` compresses record by record through zlib at its default level:
~20-90 µs per Criteo-sized record here, the single largest cost of the pipeline's data path. This writes
the same file format (length, masked CRC32C, data, masked CRC32C per record; one gzip stream) by framing
all records of a shard in one buffer and compressing it in one zlib call at a fast level.
"""
from __future__ import annotations

import struct
import zlib

import google_crc32c
import numpy as np

_MASK_DELTA = 0xA282EAD8
_LEN = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def _mask(crc: np.ndarray | int) -> np.ndarray | int:
    """TFRecord's CRC masking (rotate right by 15, add a constant), on uint32 scalars or arrays."""
    if isinstance(crc, np.ndarray):
        crc = crc.astype(np.uint64)
        return ((((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF).astype("<u4")
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


class _Headers(dict):
    """length → the 12-byte record header (length, masked CRC of the length), computed once per length."""

    def __missing__(self, n: int) -> bytes:
        length = _LEN.pack(n)
        header = self[n] = length + _CRC.pack(_mask(google_crc32c.value(length)))
        return header


_HEADERS = _Headers()


def frame(records: list[bytes]) -> bytes:
    """The uncompressed TFRecord encoding of ``records``.

    Records of a shard have few distinct lengths, so headers come from a cache; the data CRCs are
    computed by one C call per record and masked as a NumPy array. ~5x faster than a per-record
    ``struct``/CRC loop (1M Criteo rows: 5.2 s → ~1 s under cProfile).
    """
    if not records:
        return b""
    headers = _HEADERS
    crcs = np.fromiter(map(google_crc32c.value, records), dtype=np.uint64, count=len(records))
    trailers = _mask(crcs).tobytes()
    parts: list[bytes] = [b""] * (3 * len(records))
    parts[0::3] = [headers[len(r)] for r in records]
    parts[1::3] = records
    parts[2::3] = [trailers[i:i + 4] for i in range(0, 4 * len(records), 4)]
    return b"".join(parts)


def gzip_bytes(data: bytes, level: int = 1) -> bytes:
    """One gzip member (wbits=31), which TF's GZIP record reader and ``gzip`` both read."""
    c = zlib.compressobj(level, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def write_gzip_tfrecords(path: str, records: list[bytes], level: int = 1) -> None:
    """Write ``records`` to ``path`` as a gzip-compressed TFRecord file (any ``tf.io.gfile`` path)."""
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(gzip_bytes(frame(records), level))
