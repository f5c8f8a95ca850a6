"""The index: which blob is in which pack, at which offset.

On disk an index object lists packs and their blobs (see docs/repository-format.md). In memory the
`MasterIndex` keeps every entry in one sorted run of `ENTRY` records (49 bytes per blob) plus a
sorted array of 8-byte keys for binary search (8 bytes per blob): 57 bytes per blob, no Python
object per blob. Blobs added by the running process sit in a small dict until a fold merges them
in.

NumPy sorts the folds of large indexes only (`NUMPY_AT` entries and more), and is imported then:
its libraries hold 16 MiB in every process that loads them, more than the index of a repository
of 200,000 blobs. Lookups are binary searches of the key array (`bisect`, in C) and need no
NumPy, nor does a worker process that starts with an empty index and writes index objects.

Words:
    location    (pack id, offset, stored length, raw length, type) of one blob
    supersedes  index objects that a newer index object replaces (written by prune)
"""

from __future__ import annotations

import bisect
import functools
import operator
import struct
import threading
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# one stored entry: blob id, pack number, offset, stored length, raw length, blob type
ENTRY = struct.Struct("<32sIIIIB")
_REST = struct.Struct("<IIIIB")  # an entry after its id


@functools.cache
def entry_dtype() -> np.dtype[Any]:
    """The NumPy record of one entry: the same 49 bytes as `ENTRY`."""
    import numpy as np

    dtype = np.dtype([("id", "V32"), ("pack", "<u4"), ("offset", "<u4"), ("length", "<u4"),
                      ("raw", "<u4"), ("type", "u1")])
    assert dtype.itemsize == ENTRY.size
    return dtype


def __getattr__(name: str) -> Any:
    if name == "ENTRY_DTYPE":  # kept for callers that build entries with NumPy
        return entry_dtype()
    raise AttributeError(name)


_MAGIC = b"KWIX"
_HEAD = struct.Struct("<4sBIIQ")


@dataclass(frozen=True, slots=True)
class BlobLocation:
    pack: bytes
    pack_type: int
    offset: int
    length: int
    raw_length: int
    type: int


@dataclass
class IndexContent:
    """One index object, decoded: pack ids (with their blob type) and entries."""

    packs: list[bytes]
    pack_types: list[int]
    entries: np.ndarray | bytes | memoryview  # `ENTRY` records (or entry_dtype() records);
    # 'pack' indexes `packs`
    supersedes: list[str]
    # pack id -> its sender's public key, for the packs an append key wrote (version 2)
    senders: dict[bytes, bytes] = field(default_factory=dict)

    def __len__(self) -> int:
        """The number of entries."""
        e = self.entries
        return len(e) // ENTRY.size if isinstance(e, bytes | memoryview) else len(e)


def entries_bytes(entries: Any) -> bytes | bytearray | memoryview:
    """Entries as the bytes of their `ENTRY` records (NumPy records are taken as they are)."""
    if isinstance(entries, bytes | bytearray | memoryview):
        return entries
    import numpy as np

    return np.ascontiguousarray(entries, dtype=entry_dtype()).tobytes()


_NO_SENDER = bytes(32)


def encode_index(content: IndexContent) -> bytes:
    """Version 1, or version 2 (a sender per pack) when an append key wrote one of its packs."""
    senders = [content.senders.get(p, _NO_SENDER) for p in content.packs]
    version = 2 if any(s != _NO_SENDER for s in senders) else 1
    head = _HEAD.pack(
        _MAGIC, version, len(content.supersedes), len(content.packs), len(content)
    )
    parts: list[bytes | bytearray | memoryview] = [head]
    parts += [bytes.fromhex(s) for s in content.supersedes]
    parts += content.packs
    parts.append(bytes(content.pack_types))
    if version == 2:
        parts += senders
    parts.append(entries_bytes(content.entries))
    return b"".join(parts)


def encode_entries(rows: Iterable[tuple[bytes, int, int, int, int, int]]) -> bytes:
    """Entries (id, pack number, offset, length, raw length, type) as an index object stores them."""
    pack = ENTRY.pack
    return b"".join(pack(*row) for row in rows)


def decode_index(plain: bytes) -> IndexContent:
    """An index object's content; its entries are a view of ``plain`` (`MasterIndex.stage`
    copies them, checking their pack numbers)."""
    magic, version, n_sup, n_packs, n_entries = _HEAD.unpack_from(plain, 0)
    if magic != _MAGIC or version not in (1, 2):
        raise ValueError("not a keepwell index object")
    pos = _HEAD.size
    sup = [plain[pos + 32 * i : pos + 32 * (i + 1)].hex() for i in range(n_sup)]
    pos += 32 * n_sup
    packs = [plain[pos + 32 * i : pos + 32 * (i + 1)] for i in range(n_packs)]
    pos += 32 * n_packs
    types = list(plain[pos : pos + n_packs])
    pos += n_packs
    senders: dict[bytes, bytes] = {}
    if version == 2:
        for i, p in enumerate(packs):
            s = plain[pos + 32 * i : pos + 32 * (i + 1)]
            if s != _NO_SENDER:
                senders[p] = s
        pos += 32 * n_packs
    if len(plain) - pos != n_entries * ENTRY.size:
        raise ValueError("index object has the wrong size")
    return IndexContent(packs, types, memoryview(plain)[pos:], sup, senders)


def _keys_of(entries: np.ndarray) -> np.ndarray:
    import numpy as np

    raw = entries.view(np.uint8).reshape(-1, ENTRY.size)[:, :8]
    return np.ascontiguousarray(raw).view(">u8").ravel().astype(np.uint64)


def _renumber(entries: bytes | bytearray | memoryview, mapping: list[int]) -> bytes | bytearray | np.ndarray:
    """A copy of `ENTRY` records with each pack number `n` replaced by ``mapping[n]``;
    ValueError for a number past the mapping."""
    count = len(entries) // ENTRY.size
    if count >= NUMPY_AT:
        import numpy as np

        records = np.frombuffer(entries, dtype=entry_dtype()).copy()
        if count and int(records["pack"].max()) >= len(mapping):
            raise ValueError("index entry points past the pack table")
        records["pack"] = np.array(mapping, dtype=np.uint32)[records["pack"]]
        return records
    out = bytearray(entries)
    pack_at = struct.Struct("<I")
    for pos in range(32, len(out), ENTRY.size):
        (n,) = pack_at.unpack_from(out, pos)
        if n >= len(mapping):
            raise ValueError("index entry points past the pack table")
        pack_at.pack_into(out, pos, mapping[n])
    return out


# From this many entries on, a fold sorts with NumPy (16 MiB of libraries, loaded on first use);
# below, with Python's own sort, whose temporary objects (about 100 bytes per entry) then stay
# under what NumPy itself would cost. Lookups never need NumPy.
NUMPY_AT = 200_000


class MasterIndex:
    """Every known blob location; safe for concurrent lookups and additions."""

    _FOLD_AT = 200_000
    _FOLD_MIN = 16_384

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pack_ids: list[bytes] = []
        self.pack_types: list[int] = []
        self._pack_no: dict[bytes, int] = {}
        # the sorted `ENTRY` records (bytes) and their 8-byte keys ('Q'), made at the first fold
        # (None: nothing folded yet); views of bytes and an array, or of NumPy arrays
        self._entries: memoryview | None = None
        self._keys: memoryview | None = None
        self._staged: list[bytes | bytearray | np.ndarray] = []
        # added blobs: id -> the rest of its `ENTRY` record (pack number, offset, lengths, type)
        self._extra: dict[bytes, bytes] = {}
        self.files: set[str] = set()

    # -- building ------------------------------------------------------------------------------
    def _pack_number(self, pack: bytes, pack_type: int) -> int:
        n = self._pack_no.get(pack)
        if n is None:
            n = self._pack_no[pack] = len(self.pack_ids)
            self.pack_ids.append(pack)
            self.pack_types.append(pack_type)
        return n

    def stage(self, name: str, content: IndexContent) -> None:
        """Add an index object's entries (ValueError if one names a pack the object does not
        list); call `finish()` once all are staged."""
        given = entries_bytes(content.entries)
        with self._lock:
            mapping = [self._pack_number(p, t)
                       for p, t in zip(content.packs, content.pack_types, strict=True)]
        records = _renumber(given, mapping)
        with self._lock:
            self._staged.append(records)
            self.files.add(name)

    def finish(self) -> None:
        """Fold what was staged. Blobs added one by one stay in their dict until `add` folds
        them: an index refreshed after every small run (a watcher's commits) would otherwise
        copy and sort all its entries each time."""
        with self._lock:
            if self._staged:
                self._fold()

    def _fold(self) -> None:
        """Merge staged and added entries into the sorted records and keys."""
        if not self._staged and not self._extra:
            return
        count = sum(len(p) for p in self._staged) // ENTRY.size + len(self._extra)
        if self._keys is not None:
            count += len(self._keys)
        if count >= NUMPY_AT:
            self._fold_numpy()
        else:
            self._fold_small()

    def _fold_small(self) -> None:
        size = ENTRY.size
        rows: list[bytes] = []
        for part in (self._entries, *self._staged):
            if part is not None:
                assert not hasattr(part, "dtype"), "NumPy parts are folded by _fold_numpy"
                view = memoryview(part).cast("B")
                rows += [view[i:i + size].tobytes() for i in range(0, len(view), size)]
        rows += [blob_id + rest for blob_id, rest in self._extra.items()]
        self._staged, self._extra = [], {}
        rows.sort(key=operator.itemgetter(slice(0, 8)))  # stable: the order of the keys
        keys = array("Q", [int.from_bytes(r[:8], "big") for r in rows])
        self._entries, self._keys = memoryview(b"".join(rows)), memoryview(keys)

    def _fold_numpy(self) -> None:
        """The fold of a large index. Peak memory matters here (a repository of 10 million blobs
        must open in well under 1.5 GB): parts are copied into a preallocated array and released
        one by one, and the sort permutation is applied one field at a time, so at most one field
        is ever held twice."""
        import numpy as np

        dtype = entry_dtype()
        parts: list[Any] = [p if isinstance(p, np.ndarray) else np.frombuffer(p, dtype=dtype)
                            for p in (self._entries, *self._staged) if p is not None]
        if self._extra:
            parts.append(np.frombuffer(b"".join(k + v for k, v in self._extra.items()), dtype=dtype))
        self._staged = []
        self._extra = {}
        self._entries = self._keys = None  # drop references before merging
        merged = np.empty(sum(len(p) for p in parts), dtype=dtype)
        pos = 0
        parts.reverse()
        while parts:
            part = parts.pop()
            merged[pos:pos + len(part)] = part
            pos += len(part)
            del part
        keys = _keys_of(merged)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        del keys
        assert dtype.names is not None
        for name in dtype.names:
            merged[name] = merged[name][order]
        del order
        self._entries = merged.view(np.uint8).data
        self._keys = sorted_keys.view(np.uint8).data.cast("Q")

    def add(self, blob_id: bytes, pack: bytes, pack_type: int, offset: int, length: int,
            raw_length: int, blob_type: int) -> None:
        with self._lock:
            n = self._pack_number(pack, pack_type)
            self._extra[blob_id] = _REST.pack(n, offset, length, raw_length, blob_type)
            # folded, an entry takes 57 bytes; in the dict about 150: fold once the dict holds
            # half as many as the sorted records (a run that stores many blobs, in a worker
            # process above all), at least `_FOLD_MIN` (a fold copies everything once)
            folded = 0 if self._keys is None else len(self._keys)
            if len(self._extra) >= min(self._FOLD_AT, max(self._FOLD_MIN, folded // 2)):
                self._fold()

    # -- lookups -------------------------------------------------------------------------------
    def _find(self, blob_id: bytes) -> int:
        """The row of ``blob_id`` in the sorted records, or -1; the caller holds the lock."""
        keys, entries = self._keys, self._entries
        if keys is None or entries is None:
            return -1
        key = int.from_bytes(blob_id[:8], "big")
        i = bisect.bisect_left(keys, key)
        n, size = len(keys), ENTRY.size
        while i < n and keys[i] == key:
            if entries[i * size:i * size + 32] == blob_id:
                return i
            i += 1
        return -1

    def has(self, blob_id: bytes) -> bool:
        with self._lock:
            return blob_id in self._extra or self._find(blob_id) >= 0

    def _location(self, blob_id: bytes, row: int) -> BlobLocation | None:
        hit = self._extra.get(blob_id)
        if hit is not None:
            n, offset, length, raw, btype = _REST.unpack(hit)
        elif row >= 0 and self._entries is not None:
            _, n, offset, length, raw, btype = ENTRY.unpack_from(self._entries, row * ENTRY.size)
        else:
            return None
        return BlobLocation(self.pack_ids[n], self.pack_types[n], offset, length, raw, btype)

    def has_each(self, blob_ids: list[bytes]) -> list[bool]:
        """`has` for many ids (the unchanged-file check of a re-backup)."""
        with self._lock:
            extra, find = self._extra, self._find
            return [b in extra or find(b) >= 0 for b in blob_ids]

    def lookup_many(self, blob_ids: list[bytes]) -> list[BlobLocation | None]:
        """`lookup` for many ids (a restore plans thousands at once)."""
        with self._lock:
            extra, find, location = self._extra, self._find, self._location
            return [location(b, -1 if b in extra else find(b)) for b in blob_ids]

    def lookup(self, blob_id: bytes) -> BlobLocation | None:
        with self._lock:
            return self._location(blob_id, -1 if blob_id in self._extra else self._find(blob_id))

    def __len__(self) -> int:
        with self._lock:
            folded = 0 if self._keys is None else len(self._keys)
            return folded + len(self._extra) + sum(len(s) for s in self._staged) // ENTRY.size

    def entries(self) -> Iterator[tuple[bytes, BlobLocation]]:
        """Every entry (duplicates included); for check, prune and stats."""
        with self._lock:
            self._fold()
            entries = self._entries
            packs, types = list(self.pack_ids), list(self.pack_types)
        if entries is None:
            return
        for blob_id, n, offset, length, raw, btype in ENTRY.iter_unpack(entries):
            yield blob_id, BlobLocation(packs[n], types[n], offset, length, raw, btype)

    def key_array(self) -> array[int]:
        """The sorted 8-byte keys of every entry (a copy): a compact "maybe known" test for
        another process; a hit must be confirmed against the full id."""
        with self._lock:
            self._fold()
            keys = array("Q")
            if self._keys is not None:
                keys.frombytes(self._keys.cast("B"))
            return keys

    def nbytes(self) -> int:
        if self._entries is None or self._keys is None:
            return 0
        return self._entries.nbytes + self._keys.nbytes
