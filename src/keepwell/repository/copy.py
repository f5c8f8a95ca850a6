"""Copying snapshots from one repository into another (``keepwell copy``).

Words:
    source, destination  the repository read from and the one written to. Each has its own master
                         key: every blob is decrypted with the source's key, checked against its
                         id, and encrypted again with the destination's key.
    shared ids           both repositories have the same blob-id key and chunker parameters (the
                         destination was made with ``init --copy-chunker-params-from``): the same
                         plaintext has the same id in both.
    fast path            copying with shared ids: blobs keep their ids and trees keep theirs, so
                         each missing blob is copied as it is stored (decrypted, verified,
                         encrypted again; its compressed payload is reused, never re-chunked).
    re-chunk path        copying without shared ids: ids cannot be carried over, so the content
                         of each file is read and stored again through the destination's chunker,
                         and every tree is rewritten with the new ids.
    identity             what names a snapshot across copies: ``source["copied_from"]`` of a copy,
                         the snapshot's own id otherwise. A source snapshot whose identity is
                         already in the destination is skipped, so copying twice copies nothing.

Each snapshot is written through a `SnapshotWriter` (a session that keeps a concurrent prune
away; packs → index → snapshot last), so an interrupted copy leaves a valid destination whose
indexed packs the next run reuses. Blobs are read from the source with
`keepwell.repository.packreader.PackReader` (found as a restore finds them, nearby blobs of a
pack in one ranged read, on a few threads). The copy keeps the original's time, host, tags, paths,
kind, summary and source dict, and its parent when that parent was copied too.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

import blake3

from keepwell.backends.base import Backend
from keepwell.cpus import pool_threads
from keepwell.repository.format import DATA
from keepwell.repository.packer import UPLOAD_WORKERS, BlobSink
from keepwell.repository.packreader import PackReader, Want, open_payload
from keepwell.repository.repo import BlobReader, Repository
from keepwell.repository.snapshot import Snapshot, SnapshotFilter
from keepwell.repository.tree import DIR, Node
from keepwell.repository.writer import SnapshotWriter

COPIED_FROM = "copied_from"
FAST_BATCH_BLOBS = 50_000  # blob ids planned per round of reads on the fast path
RECHUNK_BATCH_BYTES = 32 * 1024 * 1024  # file content fetched per round on the re-chunk path


# -- choosing what to copy ------------------------------------------------------------------------
def identity(snap: Snapshot) -> str:
    return str(snap.source.get(COPIED_FROM) or snap.id)


def shares_ids(src: Repository, dst: Repository) -> bool:
    """True when a blob has the same id in both repositories (the fast path applies)."""
    return src.id_key == dst.id_key and src.chunker_params == dst.chunker_params


def select_snapshots(src: Repository, refs: Iterable[str] = (),
                     flt: SnapshotFilter | None = None) -> list[Snapshot]:
    """The snapshots a command works on (those to copy, tag, rewrite...), oldest first: all
    that match ``flt``, or the ones named by ``refs`` (id prefixes, which must match ``flt``;
    ``latest`` is the newest that does)."""
    flt = flt or SnapshotFilter()
    refs = list(refs)
    if not refs:
        return [s for s in src.list_snapshots() if flt.matches(s)]
    chosen = {snap.id: snap for snap in (src.find_snapshot(ref, where=flt) for ref in refs)}
    return sorted(chosen.values(), key=lambda s: (s.time, s.id))


# -- the copy ---------------------------------------------------------------------------------------
@dataclass
class CopyReport:
    mode: str
    copied: list[dict[str, str]] = field(default_factory=list)  # {"source": id, "copy": id}
    skipped: list[str] = field(default_factory=list)  # source ids already in the destination
    blobs_read: int = 0
    bytes_read: int = 0
    blobs_new: int = 0
    bytes_stored: int = 0
    packs: int = 0
    duration: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _trees(repo: Repository, root: bytes, skip: Collection[bytes] = ()) -> Iterator[tuple[bytes, list[Node]]]:
    """Every distinct tree under ``root`` (once each), not descending into trees in ``skip``."""
    seen: set[bytes] = set()
    stack = [root]
    while stack:
        tree_id = stack.pop()
        if tree_id in seen or tree_id in skip:
            continue
        seen.add(tree_id)
        nodes = repo.load_tree(tree_id)
        yield tree_id, nodes
        for n in nodes:
            if n.type == DIR and n.subtree is not None and n.subtree not in seen:
                stack.append(n.subtree)


def _content_key(content: list[bytes]) -> bytes:
    return blake3.blake3(b"".join(content)).digest()


class Copier:
    """Copies snapshots from ``src`` to ``dst``; one instance per run (it remembers, across the
    snapshots of the run, which trees and file contents it has already rewritten)."""

    def __init__(self, src: Repository, dst: Repository, *, workers: int = 4,
                 upload_workers: int = UPLOAD_WORKERS) -> None:
        self.src = src
        self.dst = dst
        self.events = dst.events
        self.fast = shares_ids(src, dst)
        self.upload_workers = upload_workers
        self.reader = PackReader(src, self.events, workers=workers)
        self.report = CopyReport(mode="fast" if self.fast else "rechunk")
        # re-chunk path: source tree id -> destination tree id; source content -> new blob ids
        self._tree_map: dict[bytes, bytes] = {}
        self._content_map: dict[bytes, list[bytes]] = {}
        self._background = ThreadPoolExecutor(1, thread_name_prefix="kw-copy-fetch")
        self._savers = ThreadPoolExecutor(pool_threads(), thread_name_prefix="kw-copy-save")

    def close(self) -> None:
        self._background.shutdown(wait=True, cancel_futures=True)
        self._savers.shutdown(wait=True, cancel_futures=True)
        self.reader.close()

    def __enter__(self) -> Copier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, snapshots: list[Snapshot]) -> CopyReport:
        started = time.monotonic()
        in_dst = {identity(d): d.id for d in self.dst.list_snapshots()}
        by_id = {s.id: s for s in self.src.list_snapshots()}
        todo = []
        for snap in snapshots:
            if identity(snap) in in_dst:
                self.report.skipped.append(snap.id)
            else:
                todo.append(snap)
                in_dst[identity(snap)] = ""  # a source holding two copies of one original
        self.events.emit("copy_plan", snapshots=len(todo), skipped=len(self.report.skipped),
                         mode=self.report.mode)
        for snap in todo:
            parent = by_id.get(snap.parent) if snap.parent else None
            copy = self.copy_one(snap, in_dst.get(identity(parent)) if parent else None)
            in_dst[identity(snap)] = copy.id
            self.report.copied.append({"source": snap.id, "copy": copy.id})
            self.events.emit("copy_snapshot", source=snap, copy=copy)
        self.report.blobs_read = self.reader.blobs_read
        self.report.bytes_read = self.reader.bytes_read
        self.report.duration = round(time.monotonic() - started, 3)
        return self.report

    def copy_one(self, snap: Snapshot, parent: str | None = None) -> Snapshot:
        source = dict(snap.source)
        source[COPIED_FROM] = identity(snap)
        with SnapshotWriter(self.dst, snap.kind, snap.paths, host=snap.host, tags=snap.tags,
                            source=source, parent=parent or None,
                            upload_workers=self.upload_workers) as writer:
            root = bytes.fromhex(snap.tree)
            if self.fast:
                self._copy_blobs(writer.sink, root)
                top = [dataclasses.replace(n) for n in self.src.load_tree(root)]
            else:
                self._rechunk_files(writer, root)
                top = self._rewrite_trees(writer, root)
            for node in top:
                writer.add_node(node.name, node)
            writer.summary = dict(snap.summary)
            copy = writer.commit(time_=snap.time)
            st = writer.sink.stats
        self.report.blobs_new += st.blobs_new
        self.report.bytes_stored += st.bytes_stored
        self.report.packs += st.packs
        return copy

    # -- fast path: blobs keep their ids ----------------------------------------------------------
    def _copy_blobs(self, sink: BlobSink, root: bytes) -> None:
        has = self.dst.index.has
        planned: set[bytes] = set()
        batch: list[bytes] = []

        def want(blob_id: bytes) -> None:
            if blob_id not in planned and not has(blob_id):
                planned.add(blob_id)
                batch.append(blob_id)

        def store(w: Want, stored: memoryview) -> None:
            payload = open_payload(self.src, w, stored)
            sink.add_stored(w.type, w.blob_id, self.dst.master.encrypt_blob(w.blob_id, w.type, payload),
                            w.raw_length)

        for tree_id, nodes in _trees(self.src, root):
            want(tree_id)
            for node in nodes:
                for blob_id in node.content:
                    want(blob_id)
            if len(batch) >= FAST_BATCH_BLOBS:
                self.reader.read(batch, store)
                batch.clear()
        if batch:
            self.reader.read(batch, store)

    # -- re-chunk path: content stored again, trees rewritten ---------------------------------------
    def _fetch_plain(self, ids: list[bytes]) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        lock = threading.Lock()

        def keep(w: Want, stored: memoryview) -> None:
            plain = self.src.open_blob(w.blob_id, w.type, stored, w.raw_length, w.sender)
            with lock:
                out[w.blob_id] = plain

        self.reader.read(ids, keep)
        return out

    def _save_batch(self, writer: SnapshotWriter, files: list[tuple[bytes, list[bytes]]],
                    fetched: Future[dict[bytes, bytes]]) -> None:
        plain = fetched.result()
        one_chunk = self.dst.chunker_params.min_size
        singles: list[tuple[bytes, Future[bytes]]] = []
        for key, content in files:
            parts = [plain[b] for b in content]
            if sum(map(len, parts)) <= one_chunk:
                # one chunk whatever the seed: stored in parallel with the other small files
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                singles.append((key, self._savers.submit(writer.sink.save, DATA, data)))
                continue
            ids, _size = writer.save_content(cast(BinaryIO, BlobReader(iter(parts))))
            self._content_map[key] = ids
        for key, fut in singles:
            self._content_map[key] = [fut.result()]

    def _stream_file(self, writer: SnapshotWriter, key: bytes, content: list[bytes]) -> None:
        def counted() -> Iterator[bytes]:
            for data in self.src.iter_blobs(content):  # verified by Repository.load_blob
                self.reader.count(len(data), 1)
                yield data

        ids, _size = writer.save_content(cast(BinaryIO, BlobReader(counted())))
        self._content_map[key] = ids

    def _rechunk_files(self, writer: SnapshotWriter, root: bytes) -> None:
        """Store the content of every file not yet stored in this run through the destination's
        chunker. One batch of small files is fetched in the background while the previous one
        is chunked and stored."""
        files: list[tuple[bytes, list[bytes]]] = []
        ids: dict[bytes, None] = {}
        size = 0
        pending: tuple[list[tuple[bytes, list[bytes]]], Future[dict[bytes, bytes]]] | None = None
        planned: set[bytes] = set()

        def submit() -> None:
            nonlocal files, ids, size, pending
            fut = self._background.submit(self._fetch_plain, list(ids))
            if pending is not None:
                self._save_batch(writer, *pending)
            pending = (files, fut)
            files, ids, size = [], {}, 0

        try:
            for _tree_id, nodes in _trees(self.src, root, skip=self._tree_map):
                for node in nodes:
                    if not node.content:
                        continue
                    key = _content_key(node.content)
                    if key in self._content_map or key in planned:
                        continue
                    planned.add(key)
                    if node.size > RECHUNK_BATCH_BYTES:
                        self._stream_file(writer, key, node.content)
                        continue
                    files.append((key, node.content))
                    ids.update(dict.fromkeys(node.content))
                    size += node.size
                    if size >= RECHUNK_BATCH_BYTES:
                        submit()
            if files:
                submit()
            if pending is not None:
                self._save_batch(writer, *pending)
                pending = None
        finally:
            if pending is not None:
                pending[1].cancel()

    def _new_nodes(self, tree_id: bytes) -> list[Node]:
        out = []
        for n in self.src.load_tree(tree_id):
            m = dataclasses.replace(n)  # the source's tree cache must stay untouched
            if n.type == DIR and n.subtree is not None:
                m.subtree = self._tree_map[n.subtree]
            if n.content:
                m.content = list(self._content_map[_content_key(n.content)])
            out.append(m)
        return out

    def _rewrite_trees(self, writer: SnapshotWriter, root: bytes) -> list[Node]:
        """Store every tree below the root with the new ids (children first); return the root's
        rewritten nodes, which the writer stores as the snapshot's root tree."""
        stack: list[tuple[bytes, bool]] = [(root, False)]
        while stack:
            tree_id, expanded = stack.pop()
            if tree_id in self._tree_map:
                continue
            if tree_id == root and expanded:
                break
            if expanded:
                self._tree_map[tree_id] = writer.save_tree(self._new_nodes(tree_id))
                continue
            stack.append((tree_id, True))
            for n in self.src.load_tree(tree_id):
                if n.type == DIR and n.subtree is not None and n.subtree not in self._tree_map:
                    stack.append((n.subtree, False))
        return self._new_nodes(root)


def copy_snapshots(src: Repository, dst: Repository, snapshots: list[Snapshot], *,
                   workers: int = 4) -> CopyReport:
    """Copy ``snapshots`` of ``src`` into ``dst`` (skipping those already there)."""
    with Copier(src, dst, workers=workers) as copier:
        return copier.run(snapshots)


def init_like(backend: Backend, password: str, source: Repository, **options: Any) -> Repository:
    """Create a repository that shares ``source``'s blob-id key and chunker parameters, so that
    copies between the two take the fast path (see docs/storage.md on what this shares)."""
    return Repository.init(backend, password, chunker=source.chunker_params, id_key=source.id_key,
                           **options)
