"""The index: which blob is in which pack, at which offset.

On disk an index object lists packs and their blobs (see docs/repository-format.md). In memory the
`MasterIndex` keeps every entry in one sorted NumPy structured array (49 bytes per blob) plus a
sorted array of 8-byte keys for binary search (8 bytes per blob): 57 bytes per blob, no Python
object per blob. Blobs added by the running process sit in a small dict until `compact()` folds
them in.

NumPy is imported on first use, not with this module: a worker process that stores new blobs
starts with an empty index, adds to the dict, and writes index objects (`ENTRY` below, no NumPy),
so it never loads NumPy (10 MiB of memory and a tenth of a second per process) unless it adds
enough blobs to fold them.

Words:
    location    (pack id, offset, stored length, raw length, type) of one blob
    supersedes  index objects that a newer index object replaces (written by prune)
"""

from __future__ import annotations

import functools
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# one stored entry: blob id, pack number, offset, stored length, raw length, blob type
ENTRY = struct.Struct("<32sIIIIB")


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
    entries: np.ndarray | bytes  # entry_dtype() records or `ENTRY` structs; 'pack' indexes `packs`
    supersedes: list[str]

    def __len__(self) -> int:
        """The number of entries."""
        e = self.entries
        return len(e) // ENTRY.size if isinstance(e, bytes) else len(e)


def encode_index(content: IndexContent) -> bytes:
    head = _HEAD.pack(
        _MAGIC, 1, len(content.supersedes), len(content.packs), len(content)
    )
    parts = [head]
    parts += [bytes.fromhex(s) for s in content.supersedes]
    parts += content.packs
    parts.append(bytes(content.pack_types))
    if isinstance(content.entries, bytes):
        parts.append(content.entries)
    else:
        import numpy as np

        parts.append(np.ascontiguousarray(content.entries, dtype=entry_dtype()).tobytes())
    return b"".join(parts)


def encode_entries(rows: Iterable[tuple[bytes, int, int, int, int, int]]) -> bytes:
    """Entries (id, pack number, offset, length, raw length, type) as an index object stores them."""
    pack = ENTRY.pack
    return b"".join(pack(*row) for row in rows)


def decode_index(plain: bytes) -> IndexContent:
    import numpy as np

    dtype = entry_dtype()
    magic, version, n_sup, n_packs, n_entries = _HEAD.unpack_from(plain, 0)
    if magic != _MAGIC or version != 1:
        raise ValueError("not a keepwell index object")
    pos = _HEAD.size
    sup = [plain[pos + 32 * i : pos + 32 * (i + 1)].hex() for i in range(n_sup)]
    pos += 32 * n_sup
    packs = [plain[pos + 32 * i : pos + 32 * (i + 1)] for i in range(n_packs)]
    pos += 32 * n_packs
    types = list(plain[pos : pos + n_packs])
    pos += n_packs
    if len(plain) - pos != n_entries * ENTRY.size:
        raise ValueError("index object has the wrong size")
    entries = np.frombuffer(plain, dtype=dtype, count=n_entries, offset=pos)
    if n_entries and int(entries["pack"].max()) >= n_packs:
        raise ValueError("index entry points past the pack table")
    return IndexContent(packs, types, entries, sup)


def _keys_of(entries: np.ndarray) -> np.ndarray:
    import numpy as np

    raw = entries.view(np.uint8).reshape(-1, ENTRY.size)[:, :8]
    return np.ascontiguousarray(raw).view(">u8").ravel().astype(np.uint64)


class MasterIndex:
    """Every known blob location; safe for concurrent lookups and additions."""

    _FOLD_AT = 200_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pack_ids: list[bytes] = []
        self.pack_types: list[int] = []
        self._pack_no: dict[bytes, int] = {}
        # the sorted arrays, made at the first fold (None: nothing folded yet)
        self._entries: np.ndarray | None = None
        self._keys: np.ndarray | None = None
        self._staged: list[np.ndarray] = []
        self._extra: dict[bytes, tuple[int, int, int, int, int]] = {}
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
        """Add an index object's entries; call `finish()` once all are staged."""
        import numpy as np

        with self._lock:
            mapping = np.array(
                [self._pack_number(p, t) for p, t in zip(content.packs, content.pack_types, strict=True)]
                or [0],
                dtype=np.uint32,
            )
            given = content.entries
            entries = (np.frombuffer(given, dtype=entry_dtype()) if isinstance(given, bytes)
                       else given).copy()
            if len(entries):
                entries["pack"] = mapping[entries["pack"]]
            self._staged.append(entries)
            self.files.add(name)

    def finish(self) -> None:
        with self._lock:
            self._fold()

    def _fold(self) -> None:
        """Merge staged and added entries into the one sorted array.

        Peak memory matters here (a repository of 10 million blobs must open in well under
        1.5 GB): parts are copied into a preallocated array and released one by one, and the sort
        permutation is applied one field at a time, so at most one field is ever held twice."""
        if not self._staged and not self._extra:
            return
        import numpy as np

        dtype = entry_dtype()
        parts = [p for p in (self._entries, *self._staged) if p is not None]
        if self._extra:
            extra = np.zeros(len(self._extra), dtype=dtype)
            ids = b"".join(self._extra.keys())
            extra["id"] = np.frombuffer(ids, dtype="V32")
            vals = np.array(list(self._extra.values()), dtype=np.int64).reshape(-1, 5)
            for col, field in enumerate(("pack", "offset", "length", "raw", "type")):
                extra[field] = vals[:, col]
            parts.append(extra)
            del extra
        self._staged = []
        self._extra = {}
        if len(parts) == 1 and self._entries is parts[0]:
            return
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
        self._keys = keys[order]
        del keys
        assert dtype.names is not None
        for name in dtype.names:
            merged[name] = merged[name][order]
        del order
        self._entries = merged

    def add(self, blob_id: bytes, pack: bytes, pack_type: int, offset: int, length: int,
            raw_length: int, blob_type: int) -> None:
        with self._lock:
            n = self._pack_number(pack, pack_type)
            self._extra[blob_id] = (n, offset, length, raw_length, blob_type)
            if len(self._extra) >= self._FOLD_AT:
                self._fold()

    # -- lookups -------------------------------------------------------------------------------
    def _find(self, blob_id: bytes) -> int:
        keys, entries = self._keys, self._entries
        if keys is None or entries is None:
            return -1
        import numpy as np

        key = np.uint64(int.from_bytes(blob_id[:8], "big"))  # a Python int > 2**63 would
        i = int(np.searchsorted(keys, key))  # make NumPy convert the whole array to float
        n = len(keys)
        while i < n and keys[i] == key:
            if entries["id"][i].tobytes() == blob_id:
                return i
            i += 1
        return -1

    def has(self, blob_id: bytes) -> bool:
        with self._lock:
            return blob_id in self._extra or self._find(blob_id) >= 0

    def _rows(self, blob_ids: list[bytes]) -> list[int]:
        """Rows of the sorted array holding these ids (-1: not there), found in one vectorised
        pass; the caller holds the lock."""
        sorted_keys, entries = self._keys, self._entries
        if sorted_keys is None or entries is None or not len(sorted_keys) or not blob_ids:
            return [-1] * len(blob_ids)
        import numpy as np

        n = len(sorted_keys)
        keys = np.frombuffer(b"".join(b[:8] for b in blob_ids), dtype=">u8").astype(np.uint64)
        pos = np.minimum(np.searchsorted(sorted_keys, keys), n - 1)
        ids = np.frombuffer(b"".join(blob_ids), dtype="V32")
        hit = (sorted_keys[pos] == keys) & (entries["id"][pos] == ids)
        # a miss at the first position of its key may still be further along equal keys
        return [p if h else self._find(b)
                for p, h, b in zip(pos.tolist(), hit.tolist(), blob_ids, strict=True)]

    def _location(self, blob_id: bytes, row: int) -> BlobLocation | None:
        hit = self._extra.get(blob_id)
        if hit is not None:
            n, offset, length, raw, btype = hit
        elif row >= 0 and self._entries is not None:
            e = self._entries[row]
            n, offset, length, raw, btype = (
                int(e["pack"]), int(e["offset"]), int(e["length"]), int(e["raw"]), int(e["type"])
            )
        else:
            return None
        return BlobLocation(self.pack_ids[n], self.pack_types[n], offset, length, raw, btype)

    def has_each(self, blob_ids: list[bytes]) -> list[bool]:
        """`has` for many ids in one vectorised pass (the unchanged-file check of a re-backup)."""
        with self._lock:
            rows = self._rows(blob_ids)
            return [r >= 0 or b in self._extra for r, b in zip(rows, blob_ids, strict=True)]

    def lookup_many(self, blob_ids: list[bytes]) -> list[BlobLocation | None]:
        """`lookup` for many ids in one vectorised pass (a restore plans thousands at once)."""
        with self._lock:
            rows = self._rows(blob_ids)
            hits = [r for r in rows if r >= 0]
            cols: Iterator[tuple[int, ...]] = iter(())
            if hits and self._entries is not None:
                picked = self._entries[hits]  # one gather, not one per blob
                cols = iter(zip(*(picked[f].tolist() for f in ("pack", "offset", "length", "raw", "type")),
                                strict=True))
            out: list[BlobLocation | None] = []
            for b, r in zip(blob_ids, rows, strict=True):
                if r >= 0:
                    n, offset, length, raw, btype = next(cols)
                    if b not in self._extra:
                        out.append(BlobLocation(self.pack_ids[n], self.pack_types[n], offset,
                                                length, raw, btype))
                        continue
                out.append(self._location(b, -1))
            return out

    def lookup(self, blob_id: bytes) -> BlobLocation | None:
        with self._lock:
            return self._location(blob_id, -1 if blob_id in self._extra else self._find(blob_id))

    def __len__(self) -> int:
        with self._lock:
            folded = 0 if self._entries is None else len(self._entries)
            return folded + len(self._extra) + sum(len(s) for s in self._staged)

    def entries(self) -> Iterator[tuple[bytes, BlobLocation]]:
        """Every entry (duplicates included); for check, prune and stats."""
        with self._lock:
            self._fold()
            entries = self._entries
            packs, types = list(self.pack_ids), list(self.pack_types)
        if entries is None:
            return
        ids = entries["id"]
        for i in range(len(entries)):
            e = entries[i]
            n = int(e["pack"])
            yield ids[i].tobytes(), BlobLocation(
                packs[n], types[n], int(e["offset"]), int(e["length"]), int(e["raw"]), int(e["type"])
            )

    def key_array(self) -> np.ndarray:
        """The sorted 8-byte keys of every entry (a copy): a compact "maybe known" test for
        another process; a hit must be confirmed against the full id."""
        import numpy as np

        with self._lock:
            self._fold()
            return np.zeros(0, np.uint64) if self._keys is None else self._keys.copy()

    def nbytes(self) -> int:
        if self._entries is None or self._keys is None:
            return 0
        return int(self._entries.nbytes + self._keys.nbytes)
