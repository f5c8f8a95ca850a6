"""Damage records (keepwell.repository.damage): written once, read back, and applied to index
objects of every size; a damaged copy is left out, the same blob in another pack is not."""

from __future__ import annotations

import os

import pytest

from keepwell.backends.memory import MemoryBackend
from keepwell.repository import Repository
from keepwell.repository.damage import Damage, load_damage, record_damage, settle
from keepwell.repository.index import ENTRY, NUMPY_AT, IndexContent, encode_entries


def content(packs: list[bytes], rows: list[tuple[bytes, int]]) -> IndexContent:
    return IndexContent(packs, [0] * len(packs),
                        encode_entries((b, n, i, 10, 10, 0) for i, (b, n) in enumerate(rows)), [])


def ids_of(c: IndexContent) -> list[tuple[bytes, int]]:
    raw = bytes(c.entries)  # type: ignore[arg-type]
    return [(r[0], r[1]) for r in ENTRY.iter_unpack(raw)]


@pytest.mark.parametrize("extra", [0, NUMPY_AT])  # a backup's index object, and a prune's
def test_filter_leaves_out_only_the_damaged_pairs(extra: int) -> None:
    p, q = os.urandom(32), os.urandom(32)
    bad, good = os.urandom(32), os.urandom(32)
    filler = [(i.to_bytes(32, "big"), 1) for i in range(extra)]
    c = content([p, q], [(bad, 0), (good, 0), (bad, 1), *filler])
    damage = Damage({"damaged/x": frozenset({"data/aa/" + p.hex()})}, {p: frozenset({bad})})
    kept = ids_of(damage.filter(c))
    assert kept[:2] == [(good, 0), (bad, 1)]  # the copy of `bad` in pack q stays
    assert len(kept) == 2 + extra
    assert Damage().filter(c) is c


def test_records_are_written_once_read_back_and_settled() -> None:
    repo = Repository.init(MemoryBackend(), "pw")
    pack = "data/ab/" + os.urandom(32).hex()
    blobs = {os.urandom(32), os.urandom(32)}
    name, count = record_damage(repo, {pack: blobs})
    assert name is not None and name.startswith("damaged/") and count == 2
    damage = load_damage(repo)
    assert damage.count() == 2 and set(damage.records) == {name}
    # what is known already is not recorded twice
    assert record_damage(repo, {pack: blobs}, damage) == (None, 0)
    # a record whose pack is still stored or indexed stays; then it is deleted
    assert settle(repo, damage, {pack}) == []
    assert settle(repo, damage, set()) == [name]
    assert not load_damage(repo)


def test_an_unreadable_record_is_ignored_and_named() -> None:
    repo = Repository.init(MemoryBackend(), "pw")
    repo.backend.put("damaged/" + "0" * 64, b"not a record")
    damage = load_damage(repo)
    assert not damage and damage.unreadable == ("damaged/" + "0" * 64,)
