"""The stream chunker cuts where pyfastcdc's own stream chunker does, with a smaller buffer."""

from __future__ import annotations

import io
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyfastcdc import FastCDC

from keepwell import chunker as chunker_module
from keepwell.chunker import Chunker, ChunkerParams

SMALL = ChunkerParams(seed=7, min_size=256, avg_size=1024, max_size=4096)


class _Trickle(io.RawIOBase):
    """A pipe-like stream: each read returns a few hundred bytes at most."""

    def __init__(self, data: bytes, seed: int) -> None:
        self._data, self._pos, self._rnd = data, 0, random.Random(seed)

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._rnd.randint(1, 700), len(self._data) - self._pos)
        b[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


class _ReadOnly:
    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int) -> bytes:
        return self._f.read(n)


def _data(seed: int, size: int) -> bytes:
    """Random bytes with runs of zeros (no cut in them: chunks reach max_size)."""
    rnd = random.Random(seed)
    parts, total = [], 0
    while total < size:
        n = rnd.randint(1, 9000)
        parts.append(bytes(n) if rnd.random() < 0.3 else rnd.randbytes(n))
        total += n
    return b"".join(parts)[:size]


def _reference(params: ChunkerParams, data: bytes) -> list[bytes]:
    cdc = FastCDC(params.avg_size, min_size=params.min_size, max_size=params.max_size,
                  seed=params.seed)
    return [bytes(c.data) for c in cdc.cut_stream(io.BytesIO(data))]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 60_000), st.sampled_from(["file", "trickle", "read"]),
       st.sampled_from([None, 1.0, 0.5, 2.0]))
def test_stream_cuts_match_pyfastcdc(seed: int, size: int, kind: str, hint: float | None) -> None:
    """Whatever the stream's reads and whatever size it was expected to have."""
    data = _data(seed, size)
    stream = {"file": lambda: io.BytesIO(data), "trickle": lambda: _Trickle(data, seed),
              "read": lambda: _ReadOnly(data)}[kind]()
    old = chunker_module.STREAM_BUFFER, chunker_module._READ
    chunker_module.STREAM_BUFFER, chunker_module._READ = 3000, 500  # < max_size: it must grow
    try:
        expected = None if hint is None else int(size * hint)
        got = [bytes(c) for c in Chunker(SMALL).chunks(stream, size=expected)]  # type: ignore[arg-type]
    finally:
        chunker_module.STREAM_BUFFER, chunker_module._READ = old
    assert got == _reference(SMALL, data)


@pytest.mark.parametrize("seed", [1, 2])
def test_stream_cuts_match_pyfastcdc_at_the_repository_sizes(seed: int) -> None:
    params = ChunkerParams(seed=seed)  # 512 KiB / 1 MiB / 8 MiB
    rnd = random.Random(seed)
    data = rnd.randbytes(20 << 20) + bytes(20 << 20) + rnd.randbytes(9 << 20)
    got = [bytes(c) for c in Chunker(params).chunks(io.BytesIO(data))]
    assert got == _reference(params, data)
    assert max(len(c) for c in got) == params.max_size  # the zeros: the buffer grew


def test_a_writer_gives_the_chunker_the_expected_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file's size reaches the chunker (a buffer of its size, not the largest one)."""
    import os

    from keepwell.backends.memory import MemoryBackend
    from keepwell.repository import Repository

    monkeypatch.setenv("KEEPWELL_TESTONLY_WEAK_KDF", "1")
    repo = Repository.init(MemoryBackend(), "pw")
    seen: list[int | None] = []
    real = Chunker.chunks

    def recording(self: Chunker, stream: io.BufferedIOBase, *, size: int | None = None):  # type: ignore[no-untyped-def]
        seen.append(size)
        return real(self, stream, size=size)  # type: ignore[arg-type]

    monkeypatch.setattr(Chunker, "chunks", recording)
    data = os.urandom(3 << 20)
    with repo.new_snapshot("stdin", ["x"]) as w:
        ids, total = w.save_content(io.BytesIO(data), size=len(data))  # type: ignore[arg-type]
    assert seen == [len(data)] and total == len(data) and ids
