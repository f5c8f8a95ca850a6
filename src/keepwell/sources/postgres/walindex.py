"""Archived WAL that another process can read: every chunk of it in a pack some stored index lists.

A process that stores data knows the blobs of the packs it wrote before their index object is
written, and deduplicates against them. When that index write fails (a full disk, a lost
connection), the pack is in storage but no index lists it, and a WAL snapshot committed later by
the same long-lived process (the archiving uploader, the streamer) may use its chunks: for that
process everything looks archived, for a restore in another process the chunks do not exist.

`PackLedger` knows which packs are *listed*: those of the index the process loaded before it
wrote anything, those of the index objects it wrote and read back, and those of index objects
other processes wrote (listed again when needed). `ensure_listed` runs after a WAL snapshot is
committed and before any segment of it is acknowledged: a chunk in a pack no stored index lists
gets that pack *adopted* (an index object written from the pack's own header, as prune does), so
the segment is acknowledged only once any process can read it. A failure there fails the push,
and the retry (which finds the snapshot) runs the same check again.

`unreadable` is the check ``postgres check`` makes: every chunk of every WAL file and base
backup must be found as a restore finds it (`Repository.locate_many`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from keepwell.errors import IntegrityError
from keepwell.repository.format import KIND_INDEX, pack_object_name
from keepwell.repository.index import decode_index
from keepwell.repository.packer import StoredPack, index_content
from keepwell.repository.tree import DIR
from keepwell.repository.unindexed import read_pack_header, unique_entries


def snapshot_blobs(repo: Any, snap: Any) -> Iterator[tuple[str, list[bytes]]]:
    """(path, blob ids) of every tree and file of a snapshot ('' for the root tree)."""
    yield "", [bytes.fromhex(snap.tree)]
    for path, node in repo.walk(snap):
        ids = list(node.content or [])
        if node.type == DIR and node.subtree is not None:
            ids.append(node.subtree)
        if ids:
            yield path, ids


class PackLedger:
    """The packs that stored index objects list, as far as this process knows (see module)."""

    def __init__(self, repo: Any) -> None:
        self.repo = repo
        self._lock = threading.Lock()
        # made before this process writes anything: the loaded index lists stored packs only
        self.listed: set[bytes] = set(repo.index.pack_ids)
        self.read: set[str] = set(repo.index.files)
        self.checked: set[str] = set()  # snapshots known to be readable by anyone

    def _learn(self, names: list[str]) -> None:
        for name in names:
            with self._lock:
                if name in self.read:
                    continue
            content = decode_index(self.repo.get_object("index", name, KIND_INDEX))
            with self._lock:
                self.listed.update(bytes(p) for p in content.packs)
                self.read.add(name)

    def note_written(self, index_names: list[str]) -> None:
        """Index objects this process wrote: read back, so their packs count as listed."""
        self._learn(list(index_names))

    def refresh(self) -> None:
        """Index objects written since (by anyone)."""
        names = [i.name.split("/", 1)[1] for i in self.repo.backend.list("index/")]
        self._learn([n for n in names if n not in self.read])

    def unlisted(self, snap: Any) -> dict[bytes, int]:
        """Packs (id -> blob type) holding chunks of `snap` that no known index lists."""
        out: dict[bytes, int] = {}
        for path, ids in snapshot_blobs(self.repo, snap):
            for blob_id, loc in zip(ids, self.repo.index.lookup_many(ids), strict=True):
                if loc is None:  # in a pack a prune set aside: readers find it there
                    if self.repo.locate(blob_id) is None:
                        raise IntegrityError(f"snapshot {snap.short_id}: {path or 'its root'}"
                                             f" uses chunk {blob_id.hex()[:16]}, which no pack"
                                             " holds")
                    continue
                with self._lock:
                    if loc.pack not in self.listed:
                        out[loc.pack] = loc.pack_type
        return out

    def ensure_listed(self, snap: Any) -> list[str]:
        """Make every chunk of `snap` readable by any process; returns the adopted packs."""
        if snap.id in self.checked:
            return []
        missing = self.unlisted(snap)
        if not missing:
            self.checked.add(snap.id)
            return []
        self.refresh()
        with self._lock:
            missing = {p: t for p, t in missing.items() if p not in self.listed}
        adopted = []
        for pack, pack_type in sorted(missing.items()):
            name = pack_object_name(pack_type, pack.hex())
            header = read_pack_header(self.repo, name)
            if header is None:
                raise IntegrityError(f"pack {name} cannot be read back to index it",
                                     hint="the WAL snapshot using it is retried")
            written = self.repo.write_index(index_content(
                [StoredPack(pack, pack_type, unique_entries(header))]))
            with self._lock:
                self.listed.add(pack)
                self.read.add(written)
            adopted.append(name)
        self.checked.add(snap.id)
        return adopted


DAMAGED, NOT_INDEXED = "damaged", "not indexed"


def unreadable(repo: Any, snapshot_ids: list[str]) -> dict[str, dict[str, str]]:
    """Per snapshot, its paths that a restore cannot read (chunks found nowhere), each with
    why: `DAMAGED` (a chunk a check found corrupt: the index leaves it out) or `NOT_INDEXED`."""
    damage = repo.index is not None and getattr(repo, "damage", None)  # loaded with the index
    bad: set[bytes] = set().union(*damage.blobs.values()) if damage else set()
    out: dict[str, dict[str, str]] = {}
    for sid in snapshot_ids:
        snap = repo.find_snapshot(sid)
        try:
            for path, ids in snapshot_blobs(repo, snap):
                lost = [i for i, loc in zip(ids, repo.locate_many(ids), strict=True)
                        if loc is None]
                if lost:
                    out.setdefault(sid, {})[path or "(its root)"] = (
                        DAMAGED if any(i in bad for i in lost) else NOT_INDEXED)
        except IntegrityError as exc:
            out.setdefault(sid, {})[f"(its trees: {exc})"] = NOT_INDEXED
    return out
