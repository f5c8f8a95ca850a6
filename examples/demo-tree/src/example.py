"""Content-defined chunking (FastCDC, native code that releases the GIL).

The gear table is permuted by a repository-secret seed, so chunk boundaries (and hence chunk
sizes) reveal nothing that could identify known files. Files no larger than ``min_size`` are one
chunk and never go through the chunker.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from pyfastcdc import FastCDC


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

    def chunks(self, stream: BinaryIO) -> Iterator[memoryview]:
        """Yield chunk views; each is valid only until the next one is requested."""
        for chunk in self._cdc().cut_stream(stream):
            yield chunk.data

    def chunks_of(self, buf: bytes | memoryview) -> Iterator[memoryview]:
        for chunk in self._cdc().cut_buf(buf):
            yield chunk.data
