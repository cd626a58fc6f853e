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

_MASK_DELTA = 0xA282EAD8
_LEN = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return _CRC.pack((((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF)


def frame(records: list[bytes]) -> bytes:
    """The uncompressed TFRecord encoding of ``records``."""
    parts = []
    append = parts.append
    for r in records:
        length = _LEN.pack(len(r))
        append(length)
        append(_masked_crc(length))
        append(r)
        append(_masked_crc(r))
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
