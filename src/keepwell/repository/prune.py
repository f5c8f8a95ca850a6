"""Pruning: deleting packs that no snapshot references any more.

Safety against concurrent backups (ARCHITECTURE rule 5): prune only deletes while no live
backup session exists (see keepwell.repository.sessions): a session may hold blobs of an unused
pack in the index it loaded. Order: new index (without the packs) → delete superseded index
objects → delete packs. A crash at any point leaves a valid repository: at worst unindexed
packs, which the next prune removes. Packs that are only partly used are kept whole.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from keepwell.errors import KeepwellError, ObjectNotFoundError
from keepwell.repository.format import (
    DATA,
    KIND_PACK_HEADER,
    PACK_PREFIX,
    TRAILER_SIZE,
    TREE,
    PackEntry,
    decode_pack_header,
    pack_object_name,
    parse_trailer,
)
from keepwell.repository.packer import StoredPack, index_content
from keepwell.repository.repo import Repository
from keepwell.repository.sessions import list_sessions
from keepwell.repository.tree import DIR


@dataclass
class PruneReport:
    packs_deleted: int = 0
    bytes_freed: int = 0
    packs_kept: int = 0
    waiting_for_sessions: int = 0
    dry_run: bool = False


def used_blobs(repo: Repository) -> set[bytes]:
    used: set[bytes] = set()
    for snap in repo.list_snapshots():
        used.add(bytes.fromhex(snap.tree))
        for _path, node in repo.walk(snap):
            used.update(node.content)
            if node.type == DIR and node.subtree is not None:
                used.add(node.subtree)
    return used


def prune(repo: Repository, *, dry_run: bool = False) -> PruneReport:
    report = PruneReport(dry_run=dry_run)
    now = time.time()
    live = [s for s in list_sessions(repo) if s.live(now)]
    if live:
        report.waiting_for_sessions = len(live)
        return report
    stored = {i.name: i.size for p in PACK_PREFIX.values() for i in repo.backend.list(p + "/")}
    index = repo.refresh_index()
    old_files = set(index.files)
    used = used_blobs(repo)
    packs: dict[tuple[bytes, int], list[PackEntry]] = {}
    for blob_id, loc in index.entries():
        packs.setdefault((loc.pack, loc.pack_type), []).append(
            PackEntry(loc.type, blob_id, loc.offset, loc.length, loc.raw_length))
    keep: list[StoredPack] = []
    drop: list[str] = []
    for (pack, ptype), entries in packs.items():
        name = pack_object_name(ptype, pack.hex())
        if name not in stored:
            continue
        if any(e.id in used for e in entries):
            seen: set[bytes] = set()
            uniq = [e for e in entries if not (e.id in seen or seen.add(e.id))]  # type: ignore[func-returns-value]
            keep.append(StoredPack(pack, ptype, uniq))
        else:
            drop.append(name)
    indexed = {pack_object_name(p.type, p.id.hex()) for p in keep} | set(drop)
    orphans = []
    for name in (n for n in stored if n not in indexed):
        header = read_pack_header(repo, name)
        if header is None or any(e.id in used for e in header):
            if header is not None:  # adopt: a backup that raced an earlier prune uses it
                ptype = TREE if name.startswith("tree/") else DATA
                keep.append(StoredPack(bytes.fromhex(name.rsplit("/", 1)[1]), ptype, header))
            continue
        orphans.append(name)
    report.packs_kept = len(keep)
    targets = drop + orphans
    report.packs_deleted = len(targets)
    report.bytes_freed = sum(stored[n] for n in targets)
    if dry_run or not targets:
        return report
    repo.write_index(index_content(keep, supersedes=sorted(old_files)))
    for name in old_files:
        try:
            repo.backend.delete(f"index/{name}")
        except ObjectNotFoundError:
            pass
    if any(s.live(time.time()) for s in list_sessions(repo)):
        # a backup began meanwhile and may have loaded the old index: delete nothing now
        report.waiting_for_sessions = 1
        report.packs_deleted = report.bytes_freed = 0
        repo._index = None
        return report
    for name in targets:
        try:
            repo.backend.delete(name)
        except ObjectNotFoundError:
            pass
        except KeepwellError:
            raise
    repo._index = None  # reload on next use
    return report


def read_pack_header(repo: Repository, name: str) -> list[PackEntry] | None:
    """The blobs a pack says it holds (packs are self-describing); None if unreadable."""
    try:
        size = repo.backend.stat(name).size
        tail = repo.backend.get(name, max(0, size - 65536))
        hlen = parse_trailer(tail)
        header = tail[-TRAILER_SIZE - hlen : -TRAILER_SIZE]
        if len(header) != hlen:
            header = repo.backend.get(name, size - TRAILER_SIZE - hlen, hlen)
        return decode_pack_header(repo.master.decrypt_object(KIND_PACK_HEADER, header, name))
    except (KeepwellError, ValueError):
        return None
