"""Content-defined chunking (FastCDC, native code that releases the GIL).

Every entry of the gear table is XORed with a repository-secret seed, so chunk boundaries (and hence chunk
sizes) reveal nothing that could identify known files. Files no larger than ``min_size`` are one
chunk and never go through the chunker.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from pyfastcdc import FastCDC

STREAM_BUFFER = 6 * 1024 * 1024
_READ = 1024 * 1024


@dataclass(frozen=True)
class ChunkerParams:
    seed: int
    min_size: int = 512 * 1024
    avg_size: int = 1024 * 1024
    max_size: int = 8 * 1024 * 1024

    def to_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "min": self.min_size, "avg": self.avg_size, "max": self.max_size}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> ChunkerParams:
        return cls(seed=d["seed"], min_size=d["min"], avg_size=d["avg"], max_size=d["max"])


class Chunker:
    def __init__(self, params: ChunkerParams) -> None:
        self.params = params

    def _cdc(self) -> FastCDC:
        # FastCDC objects are not safe to share between threads; they are cheap to make.
        p = self.params
        return FastCDC(p.avg_size, min_size=p.min_size, max_size=p.max_size, seed=p.seed)

    def chunks(self, stream: IO[bytes], *, size: int | None = None) -> Iterator[memoryview]:
        """Yield chunk views; each is valid only until the next one is requested. ``size``: the
        stream's expected length, if known (a smaller buffer for a smaller stream; a stream
        that turns out longer is still cut right).

        The cuts are those of pyfastcdc's ``cut_stream`` (a cut depends only on the bytes
        before it), with a buffer of `STREAM_BUFFER` (6 MiB) instead of its twice ``max_size``
        (16 MiB): a cut found before the end of the buffered data is final; the data after the
        last one moves to the front (usually part of one chunk) and the buffer is filled again.
        Only a chunk longer than the buffer (rare: beyond the average size a cut is due every
        half average size) makes it grow to ``max_size`` and a read's worth, for the rest of the
        stream."""
        cdc = self._cdc()
        max_size = self.params.max_size
        capacity = min(STREAM_BUFFER, max_size + _READ)
        buf = bytearray(capacity if size is None else max(1, min(capacity, size + 1)))
        view = memoryview(buf)
        start = end = 0
        eof = False
        readinto = getattr(stream, "readinto", None)
        while True:
            if end > start:
                length = next(iter(cdc.cut_buf(view[start:end]))).length
                if length < end - start or length >= max_size or eof:
                    yield view[start:start + length]
                    start += length
                    continue
            elif eof:
                return
            # no final cut in what is buffered: keep the rest, make room and read more
            tail = end - start
            if tail == len(buf):
                grown = bytearray(max_size + _READ)
                grown[:tail] = view[start:end]
                buf, view = grown, memoryview(grown)
            elif start:
                view[:tail] = view[start:end]
            start, end = 0, tail
            while end < len(buf) and not eof:
                if readinto is not None:
                    n = readinto(view[end:])
                else:
                    data = stream.read(len(buf) - end)
                    n = len(data)
                    view[end:end + n] = data
                if n:
                    end += n
                else:
                    eof = True

    def chunks_of(self, buf: bytes | memoryview) -> Iterator[memoryview]:
        for chunk in self._cdc().cut_buf(buf):
            yield chunk.data
