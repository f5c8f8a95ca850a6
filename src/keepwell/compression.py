"""Per-blob compression: a one-byte codec id in front of each payload, so readers auto-detect.

Compression is skipped for a blob when it does not pay (already-compressed media, random data).
"""

from __future__ import annotations

import threading

import zstandard

from keepwell.errors import IntegrityError

NONE = 0
ZSTD = 1

_local = threading.local()
# A blob is stored compressed only if it shrinks to at most this fraction of its size.
_WORTH_IT = 0.97


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "c", None)
    if cache is None or cache[0] != level:
        cache = (level, zstandard.ZstdCompressor(level=level))
        _local.c = cache
    return cache[1]


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def pack_payload(data: bytes | bytearray | memoryview, level: int) -> bytes:
    """Return codec byte + (compressed or raw) data."""
    if level > 0 and len(data) >= 64:
        comp = _compressor(level).compress(data)
        if len(comp) <= len(data) * _WORTH_IT:
            return b"\x01" + comp
    return b"\x00" + bytes(data)


def unpack_payload(payload: bytes, raw_length: int) -> bytes:
    codec = payload[0] if payload else -1
    if codec == NONE:
        return payload[1:]
    if codec == ZSTD:
        try:
            return _decompressor().decompress(payload[1:], max_output_size=raw_length)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"blob does not decompress: {exc}") from None
    raise IntegrityError(f"blob has unknown compression codec {codec}")
