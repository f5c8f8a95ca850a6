"""Repairing what snapshots reference: lost blobs from a replica (``keepwell repair --from-repo``),
and snapshots rewritten without what stays lost (``keepwell repair snapshots``).

Words:
    lost        a blob a snapshot references that no index lists (nor a pack pending deletion):
                its pack is missing, or its copy was recorded as damaged
                (keepwell.repository.damage, by ``check --read-data`` or ``repair packs``); a
                tree is lost too when it cannot be read or does not match its id. Data blobs are
                judged by the index alone: ``check --read-data`` finds damaged ones first.
    replica     a repository that holds copies of this one's snapshots with shared blob ids:
                made by ``keepwell copy`` (one of the two was made with ``init
                --copy-chunker-params-from`` the other), or a mirror of its objects (the
                control plane's replicas). The same data has the same id in both, so a lost
                blob can be taken from it. Every blob taken is decrypted with the
                replica's key, checked against its id, and encrypted with this repository's key.
    repaired    a snapshot rewritten without the files whose content is lost, and without the
                directories whose tree is lost. Such files are removed, not truncated: a restore
                must never produce a file with content that was not backed up. The new snapshot
                keeps the original's time, host, paths, kind, parent and source, gains the tag
                ``repaired`` and a summary field ``repaired`` (``from``: the original's id,
                ``removed``: how many paths, ``paths``: the first 1000 of them), and the original
                is forgotten unless asked to keep it.

Both write like a backup (a session, packs, index objects, then snapshots), so they run beside
backups and prunes without a lock.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keepwell.crypto import keyed_id
from keepwell.errors import IntegrityError, ObjectNotFoundError, UsageError
from keepwell.repository.copy import shares_ids
from keepwell.repository.format import TREE
from keepwell.repository.packer import BlobSink
from keepwell.repository.packreader import PackReader, Want, open_payload
from keepwell.repository.repo import Repository
from keepwell.repository.sessions import Session
from keepwell.repository.snapshot import Snapshot
from keepwell.repository.tree import DIR, Node, decode_tree, encode_tree
from keepwell.repository.writer import SnapshotWriter

REPAIRED_TAG = "repaired"
SUMMARY_PATHS = 1000  # removed paths kept in a repaired snapshot's summary
BATCH = 50_000  # lost blobs fetched from a replica per round
LOST = (IntegrityError, ObjectNotFoundError)  # what makes a tree lost (never a storage outage)


# -- snapshots ------------------------------------------------------------------------------------
@dataclass
class SnapshotRepair:
    dry_run: bool = False
    checked: int = 0
    snapshots: list[dict[str, Any]] = field(default_factory=list)  # one per damaged snapshot
    warnings: list[str] = field(default_factory=list)


class _Rewriter:
    """Trees without what is lost; each tree is rewritten once (memo), its new id found by
    ``save_tree`` (which stores it, or in a dry run only computes it)."""

    def __init__(self, repo: Repository, save_tree: Callable[[list[Node]], bytes]) -> None:
        self.repo = repo
        self.save_tree = save_tree
        self._memo: dict[bytes, tuple[bytes, list[str]]] = {}

    def nodes(self, tree_id: bytes) -> tuple[list[Node], list[str]]:
        """The nodes of a tree without what is lost, and the paths removed (relative to it)."""
        nodes = self.repo.load_tree(tree_id)
        content = [b for n in nodes for b in n.content]
        located = dict(zip(content, self.repo.locate_many(content), strict=True))
        kept: list[Node] = []
        removed: list[str] = []
        for node in nodes:
            if node.type == DIR and node.subtree is not None:
                try:
                    sub, sub_removed = self.tree(node.subtree)
                except LOST:
                    removed.append(node.name + "/")
                    continue
                removed += [f"{node.name}/{p}" for p in sub_removed]
                if sub != node.subtree:
                    node = dataclasses.replace(node, subtree=sub)  # cached trees stay untouched
            elif any(located[b] is None for b in node.content):
                removed.append(node.name)
                continue
            kept.append(node)
        return kept, removed

    def tree(self, tree_id: bytes) -> tuple[bytes, list[str]]:
        hit = self._memo.get(tree_id)
        if hit is None:
            kept, removed = self.nodes(tree_id)
            hit = self._memo[tree_id] = (self.save_tree(kept) if removed else tree_id, removed)
        return hit


def repair_snapshots(repo: Repository, refs: list[str] | None = None, *,
                     keep_originals: bool = False, dry_run: bool = False) -> SnapshotRepair:
    """Rewrite the snapshots (all, or those ``refs`` name) that reference lost blobs; see the
    module docstring."""
    report = SnapshotRepair(dry_run=dry_run)
    repo.refresh_index()
    snaps = [repo.find_snapshot(r) for r in refs] if refs else repo.list_snapshots()
    plan = _Rewriter(repo, lambda nodes: keyed_id(repo.id_key, encode_tree(nodes)))
    damaged: list[tuple[Snapshot, list[str] | None]] = []
    for snap in snaps:
        report.checked += 1
        try:
            removed: list[str] | None = ["/" + p for p in plan.nodes(bytes.fromhex(snap.tree))[1]]
        except LOST:
            removed = None  # its root tree is lost: nothing of it can be read
        if removed is None or removed:
            damaged.append((snap, removed))
    write = _Rewriter(repo, lambda nodes: b"")
    for snap, removed in damaged:
        entry: dict[str, Any] = {"id": snap.id, "removed": removed or [], "repaired": None,
                                 "forgotten": False}
        report.snapshots.append(entry)
        if removed is None:
            report.warnings.append(f"snapshot {snap.short_id}: its root tree is lost; "
                                   + ("kept" if keep_originals or dry_run else "forgotten"))
        elif not dry_run:
            entry["repaired"] = _rewrite(repo, write, snap, removed).id
        if not (keep_originals or dry_run):
            repo.forget([snap.id])
            entry["forgotten"] = True
    return report


def _rewrite(repo: Repository, rewriter: _Rewriter, snap: Snapshot, removed: list[str]) -> Snapshot:
    with SnapshotWriter(repo, snap.kind, snap.paths, host=snap.host,
                        tags=[*snap.tags, REPAIRED_TAG], source=snap.source,
                        parent=snap.parent) as writer:
        rewriter.save_tree = writer.save_tree
        top, _removed = rewriter.nodes(bytes.fromhex(snap.tree))
        for node in top:
            writer.add_node(node.name, node)
        writer.summary = {**snap.summary, "repaired": {
            "from": snap.id, "removed": len(removed), "paths": removed[:SUMMARY_PATHS]}}
        return writer.commit(time_=snap.time)


# -- from a replica -------------------------------------------------------------------------------
@dataclass
class ReplicaRepair:
    dry_run: bool = False
    replica: str = ""
    trees_checked: int = 0
    blobs_lost: int = 0  # referenced, but not in this repository
    blobs_taken: int = 0  # copied from the replica
    blobs_unavailable: list[str] = field(default_factory=list)  # not in the replica, or damaged there
    bytes_stored: int = 0
    packs_written: int = 0
    warnings: list[str] = field(default_factory=list)


class _Healer:
    """Walks every snapshot of ``repo`` and takes each lost blob from ``replica``."""

    def __init__(self, repo: Repository, replica: Repository, report: ReplicaRepair,
                 sink: BlobSink | None) -> None:
        self.repo = repo
        self.replica = replica
        self.report = report
        self.sink = sink
        self.reader = PackReader(replica, repo.events)
        self._lock = threading.Lock()
        self._settled: set[bytes] = set()  # taken, or found unavailable

    def _unavailable(self, blob_id: bytes, why: str) -> None:
        with self._lock:
            self.report.blobs_unavailable.append(f"{blob_id.hex()[:16]}: {why}")
            self._settled.add(blob_id)

    def tree(self, tree_id: bytes) -> list[Node] | None:
        try:
            return self.repo.load_tree(tree_id)
        except LOST:
            pass
        self.report.blobs_lost += 1
        try:
            plain = self.replica.load_blob(tree_id)  # verified against the shared id key
        except LOST as exc:
            self._unavailable(tree_id, f"tree lost in the replica too ({exc})")
            return None
        if keyed_id(self.repo.id_key, plain) != tree_id:
            self._unavailable(tree_id, "the replica's tree does not match its id here")
            return None
        self.report.blobs_taken += 1
        if self.sink is not None:
            self.sink.save(TREE, plain, tree_id)
        return decode_tree(plain)

    def data(self, ids: list[bytes]) -> None:
        """Take lost data blobs from the replica, verified one by one."""
        self.report.blobs_lost += len(ids)
        present = [b for b, loc in zip(ids, self.replica.locate_many(ids), strict=True)
                   if loc is not None]
        for b in sorted(set(ids) - set(present)):
            self._unavailable(b, "not in the replica")

        def store(w: Want, stored: memoryview) -> None:
            try:
                payload = open_payload(self.replica, w, stored)
            except IntegrityError as exc:
                self._unavailable(w.blob_id, f"damaged in the replica too ({exc})")
                return
            with self._lock:
                self.report.blobs_taken += 1
                self._settled.add(w.blob_id)
            if self.sink is not None:
                sealed = self.repo.master.encrypt_blob(w.blob_id, w.type, payload)
                self.sink.add_stored(w.type, w.blob_id, sealed, w.raw_length)

        try:
            self.reader.read(present, store)
        except LOST:
            for b in present:  # a pack of the replica is truncated or lost: one at a time
                if b in self._settled:
                    continue
                try:
                    self.reader.read([b], store)
                except LOST as exc:
                    self._unavailable(b, str(exc))

    def run(self) -> None:
        trees = [bytes.fromhex(s.tree) for s in self.repo.list_snapshots()]
        seen: set[bytes] = set()
        wanted: dict[bytes, None] = {}
        while trees:
            tree_id = trees.pop()
            if tree_id in seen:
                continue
            seen.add(tree_id)
            self.report.trees_checked += 1
            nodes = self.tree(tree_id)
            for node in nodes or []:
                if node.type == DIR and node.subtree is not None and node.subtree not in seen:
                    trees.append(node.subtree)
                content = [b for b in node.content if b not in wanted]
                for b, loc in zip(content, self.repo.locate_many(content), strict=True):
                    if loc is None:
                        wanted[b] = None
            if len(wanted) >= BATCH:
                self.data(list(wanted))
                wanted.clear()
        if wanted:
            self.data(list(wanted))


def repair_from(repo: Repository, replica: Repository, *, dry_run: bool = False) -> ReplicaRepair:
    """Take every lost blob of ``repo``'s snapshots from ``replica``; see the module docstring."""
    if replica.backend.location == repo.backend.location:
        raise UsageError("the replica is this repository itself")
    if not shares_ids(replica, repo):
        raise UsageError(
            f"{replica.backend.location} does not share blob ids with this repository, so no "
            "blob can be taken from it",
            hint="a replica made by 'keepwell copy' into a repository created with "
                 "'init --copy-chunker-params-from' (in either direction) shares them")
    report = ReplicaRepair(dry_run=dry_run, replica=replica.backend.location)
    if dry_run:
        repo.refresh_index()
        healer = _Healer(repo, replica, report, None)
        try:
            healer.run()
        finally:
            healer.reader.close()
        return report
    session = Session(repo, "repair from a replica")
    try:
        repo.refresh_index()  # after the session exists: see keepwell.repository.sessions
        sink = BlobSink(repo)
        healer = _Healer(repo, replica, report, sink)
        try:
            healer.run()
            sink.flush()
        finally:
            healer.reader.close()
            sink.close()
        report.bytes_stored = sink.stats.bytes_stored
        report.packs_written = sink.stats.packs
    finally:
        session.end()
    return report
