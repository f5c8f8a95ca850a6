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


# Idle compressors by level, shared by all threads: a zstd context holds 1.3 MiB (level 1) to
# 4 MiB (level 5), and a process makes only as many as compress at once, not one per thread and
# level that ever compressed (a backup's main process has a dozen threads)
_idle: dict[int, list[zstandard.ZstdCompressor]] = {}
_idle_lock = threading.Lock()


def _compress(level: int, data: bytes | bytearray | memoryview) -> bytes:
    with _idle_lock:
        idle = _idle.setdefault(level, [])
        c = idle.pop() if idle else None
    if c is None:
        c = zstandard.ZstdCompressor(level=level)
    try:
        return c.compress(data)
    finally:
        with _idle_lock:
            idle.append(c)


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def pack_payload(data: bytes | bytearray | memoryview, level: int) -> bytes:
    """Return codec byte + (compressed or raw) data."""
    if level > 0 and len(data) >= 64:
        comp = _compress(level, data)
        if len(comp) <= len(data) * _WORTH_IT:
            return b"\x01" + comp
    return b"\x00" + data


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


class Levels:
    """Chooses, blob by blob, between a strong and a fast zstd level by what the strong one buys.

    A sample of the blobs (each of the first `SAMPLES`, then one in `EVERY`) is compressed at both
    levels and the smaller result is stored. While the strong level saves at least `MIN_GAIN` of
    the fast level's output on recent samples (older ones count for less and less), blobs get
    the strong level; otherwise the fast one. Measured with zstd 1 and 3: file trees, PostgreSQL
    WAL and pages rewritten by updates save 7–12 % at level 3 and keep it; InnoDB files and
    dumps of random-looking text (hex digests), and freshly loaded pages, save under 2 % at level
    3 for twice the CPU time and get level 1. The strong level alone is used when both are
    the same.

    With ``probe``, each blob of at least `PROBE_MIN` bytes gets its own choice instead: three
    `PROBE` slices at its quarters are compressed at both levels, the strong level is taken if
    it saves `PROBE_GAIN` on them, and the whole blob is compressed once at the level chosen.
    This is for data written in few large pieces whose content changes from piece to piece,
    where samples of earlier blobs say little about the next: WAL segments (8 MiB pieces) are full-page images after a checkpoint (level 3
    saves 10 %), row changes or bulk-loaded text (level 1 is as small or smaller, and twice as
    fast). On four kinds of WAL this stored as little as the better level of the two for each
    piece (within 0.1 %), at 1.1–2 times the speed of level 3.
    """

    SAMPLES = 8
    EVERY = 16
    MIN_GAIN = 0.03
    DECAY = 0.8  # weight kept by the older samples at each new one
    PROBE_MIN = 1024 * 1024
    PROBE = 128 * 1024  # each of three slices
    # A blob's own slices predict its ratios better than samples of other blobs: a smaller gain
    # already pays for the strong level (on WAL after a checkpoint, 3 % gave 1 % more stored)
    PROBE_GAIN = 0.01

    def __init__(self, strong: int, fast: int, *, probe: bool = False) -> None:
        self.strong = strong
        self.fast = fast
        self.probe = probe
        self._lock = threading.Lock()
        self._blobs = 0
        self._strong_bytes = 0.0
        self._fast_bytes = 0.0

    @property
    def adaptive(self) -> bool:
        return self.fast != self.strong and self.strong > 0

    def current(self) -> int:
        """The level unsampled blobs get now."""
        if not self.adaptive or self._fast_bytes <= 0:
            return self.strong
        gain = (self._fast_bytes - self._strong_bytes) / self._fast_bytes
        return self.strong if gain >= self.MIN_GAIN else self.fast

    def payload(self, data: bytes | bytearray | memoryview) -> bytes:
        """Codec byte + data, compressed at the level chosen for it."""
        if not self.adaptive:
            return pack_payload(data, self.strong)
        if self.probe and len(data) >= self.PROBE_MIN:
            return pack_payload(data, self._probed(data))
        with self._lock:
            self._blobs += 1
            sample = self._blobs <= self.SAMPLES or self._blobs % self.EVERY == 0
            level = self.current()
        if not sample:
            return pack_payload(data, level)
        strong = pack_payload(data, self.strong)
        fast = pack_payload(data, self.fast)
        with self._lock:
            self._strong_bytes = self._strong_bytes * self.DECAY + len(strong)
            self._fast_bytes = self._fast_bytes * self.DECAY + len(fast)
        return strong if len(strong) <= len(fast) else fast

    def _probed(self, data: bytes | bytearray | memoryview) -> int:
        """The level for one large blob, from slices at its quarters compressed at both."""
        view, n, half = memoryview(data), len(data), self.PROBE // 2
        fast = strong = 0
        for k in (1, 2, 3):
            piece = view[n * k // 4 - half:n * k // 4 + half]
            fast += len(_compress(self.fast, piece))
            strong += len(_compress(self.strong, piece))
        return self.strong if (fast - strong) >= self.PROBE_GAIN * fast else self.fast
