"""The one pack reader: ranges of nearby blobs, short reads, verification, headers."""

from __future__ import annotations

import io
import os

import pytest

from keepwell.backends.memory import MemoryBackend
from keepwell.errors import IntegrityError
from keepwell.repository import Repository
from keepwell.repository.events import Events
from keepwell.repository.packreader import (
    PackReader,
    Want,
    locate_packs,
    open_payload,
    parse_header,
    ranges,
    read_header,
    read_range,
)

os.environ.setdefault("KEEPWELL_TESTONLY_WEAK_KDF", "1")


def _span(x: tuple[int, int]) -> tuple[int, int]:
    return x


def test_ranges_merge_nearby_blobs_within_the_gap_and_the_bound() -> None:
    wants = [(0, 100), (150, 100), (1000, 50), (1060, 10), (5000, 4000)]
    got = [(r.start, r.end, list(r.wants)) for r in ranges(wants, _span, max_gap=100, max_range=2000)]
    assert got == [(0, 250, wants[:2]), (1000, 1070, wants[2:4]), (5000, 9000, wants[4:])]
    # the bound splits a run of neighbours, but a blob larger than it is still one range
    got = [(r.start, r.end) for r in ranges(wants, _span, max_gap=10_000, max_range=200)]
    assert got == [(0, 100), (150, 250), (1000, 1070), (5000, 9000)]
    data = memoryview(bytes(range(250)))
    (first, *_rest) = ranges(wants, _span, max_gap=100)
    assert [bytes(b) for _w, b in first.pieces(data, _span)] == [bytes(range(100)), bytes(range(150, 250))]


def _repo_with_files(n: int) -> tuple[Repository, dict[str, bytes]]:
    repo = Repository.init(MemoryBackend(), "pw")
    files = {f"f{i}": os.urandom(3000 + i) for i in range(n)}
    with repo.new_snapshot("stdin", sorted(files)) as w:
        for name, data in files.items():
            w.add_stream(name, io.BytesIO(data))
        w.commit()
    return repo, files


def test_reader_verifies_each_blob_and_names_the_damaged_one() -> None:
    repo, files = _repo_with_files(20)
    snap = repo.list_snapshots()[0]
    ids = [b for _p, n in repo.walk(snap) for b in n.content]
    plan = locate_packs(repo, ids)
    assert sum(len(w) for w in plan.values()) == len(ids)
    got: dict[bytes, bytes] = {}
    reader = PackReader(repo, Events())
    try:
        reader.read(ids, lambda w, stored: got.__setitem__(
            w.blob_id, repo.open_blob(w.blob_id, w.type, stored, w.raw_length)))
        assert sorted(got.values()) == sorted(files.values())
        assert reader.blobs_read == len(ids)
        # one flipped byte inside one blob: that blob, and only it, is named
        name, wants = next(iter(plan.items()))
        victim: Want = wants[len(wants) // 2]
        data = bytearray(repo.backend.get(name))
        data[victim.offset + 20] ^= 1
        repo.backend.put(name, bytes(data), overwrite=True)
        bad: list[bytes] = []

        def check(w: Want, stored: memoryview) -> None:
            try:
                open_payload(repo, w, stored)
            except IntegrityError as exc:
                assert w.blob_id.hex()[:16] in str(exc)
                bad.append(w.blob_id)

        reader.read(ids, check)
        assert bad == [victim.blob_id]
    finally:
        reader.close()
    # a pack cut short is named as truncated, not taken for a damaged blob
    repo.backend.put(name, bytes(data[: victim.offset + 5]), overwrite=True)
    (last,) = ranges(wants[len(wants) // 2:], lambda w: (w.offset, w.length), max_range=1 << 40)
    with pytest.raises(IntegrityError, match="truncated pack"):
        read_range(repo.backend, name, last)


def test_header_from_the_tail_and_from_the_whole_pack_agree() -> None:
    repo, _files = _repo_with_files(5)
    for info in repo.backend.list("data/"):
        whole = repo.backend.get(info.name)
        entries = parse_header(repo.master, info.name, whole)
        assert entries == read_header(repo.backend, repo.master, info.name)
        assert entries and all(e.offset + e.length <= len(whole) for e in entries)
        with pytest.raises(ValueError):
            parse_header(repo.master, info.name, whole[-10:])
