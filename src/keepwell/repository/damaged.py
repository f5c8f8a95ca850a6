"""The damage a repository knows of: damaged pairs (a blob id and the pack holding a bad copy),
as loaded from the ``damaged/`` records (`keepwell.repository.damage` reads and writes those
records; the index leaves these pairs out when it loads)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from keepwell.repository.index import ENTRY, NUMPY_AT, IndexContent, entries_bytes, entry_dtype

_PACK_NO = struct.Struct("<I")


def pack_id_of(name: str) -> bytes:
    """The pack id of a pack object name (``data/ab/ab12...`` -> bytes of ``ab12...``)."""
    return bytes.fromhex(name.rsplit("/", 1)[1])


@dataclass(frozen=True)
class Damage:
    """Every damaged pair the readable records name."""

    records: dict[str, frozenset[str]] = field(default_factory=dict)  # record -> its packs
    blobs: dict[bytes, frozenset[bytes]] = field(default_factory=dict)  # pack id -> blob ids
    unreadable: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.blobs)

    def covers(self, pack: bytes, blob_id: bytes) -> bool:
        return blob_id in self.blobs.get(pack, ())

    def names(self) -> set[str]:
        """Every record this was loaded from, readable or not."""
        return set(self.records) | set(self.unreadable)

    def count(self) -> int:
        return sum(len(ids) for ids in self.blobs.values())

    def filter(self, content: IndexContent) -> IndexContent:
        """``content`` without the entries of damaged pairs (the same object if none)."""
        bad = {n: self.blobs[p] for n, p in enumerate(content.packs) if p in self.blobs}
        if not bad:
            return content
        raw = memoryview(entries_bytes(content.entries)).cast("B")
        if len(raw) // ENTRY.size >= NUMPY_AT:
            return self._filter_large(content, raw, bad)
        size = ENTRY.size
        kept = bytearray()
        for pos in range(0, len(raw), size):
            (n,) = _PACK_NO.unpack_from(raw, pos + 32)
            ids = bad.get(n)
            if ids is None or raw[pos:pos + 32].tobytes() not in ids:
                kept += raw[pos:pos + size]
        return IndexContent(content.packs, content.pack_types, bytes(kept), content.supersedes,
                            content.senders)

    @staticmethod
    def _filter_large(content: IndexContent, raw: memoryview,
                      bad: dict[int, frozenset[bytes]]) -> IndexContent:
        """`filter` of a large index object (a prune's): only the rows of damaged packs are
        looked at one by one."""
        import numpy as np

        records = np.frombuffer(raw, dtype=entry_dtype())
        keep = np.ones(len(records), dtype=bool)
        for row in np.flatnonzero(np.isin(records["pack"], list(bad))):
            if records["id"][row].tobytes() in bad[int(records["pack"][row])]:
                keep[row] = False
        return IndexContent(content.packs, content.pack_types, records[keep].tobytes(),
                            content.supersedes, content.senders)
