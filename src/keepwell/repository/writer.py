"""Writing one snapshot: streams and nodes in, trees built, everything stored, snapshot last.

`SnapshotWriter` is what every source uses. It opens a session (so a concurrent prune keeps what
this run may reference), refreshes the index, and offers ``add_stream``/``add_bytes`` for byte
streams and ``add_node`` for already-built subtrees (the file archiver). ``commit`` stores the
directory trees, waits for every pack and index object, and writes the snapshot object last.
Leaving without ``commit`` (or a ``commit`` that fails) records no snapshot; the packs that were
stored whole are indexed for reuse, and none that a failed write spoiled.
"""

from __future__ import annotations

import getpass
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import IO, Any

from keepwell import __version__
from keepwell.cpus import pool_threads
from keepwell.errors import UsageError
from keepwell.repository.format import DATA, KIND_SNAPSHOT, TREE
from keepwell.repository.packer import UPLOAD_WORKERS, BlobSink
from keepwell.repository.sessions import Session
from keepwell.repository.snapshot import Snapshot, decode_snapshot, encode_snapshot
from keepwell.repository.store import RepositoryStore
from keepwell.repository.tree import (
    DIR,
    FILE,
    Node,
    as_decoded,
    encode_pieces,
    encode_tree,
    in_tree_order,
    join_pieces,
)

DirMeta = Callable[[str], Node]


class _VirtualDir:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.children: dict[str, _VirtualDir | Node] = {}


class SnapshotWriter:
    def __init__(self, repo: RepositoryStore, kind: str, paths: list[str], *, host: str | None = None,
                 tags: list[str] | tuple[str, ...] = (), source: dict[str, Any] | None = None,
                 parent: Snapshot | str | None = None, dir_meta: DirMeta | None = None,
                 upload_workers: int = UPLOAD_WORKERS, blob_workers: int | None = None,
                 probe_levels: bool = False, page_levels: bool = False,
                 remember_trees: bool = False) -> None:
        self.repo = repo
        # hand each tree written to the repository's tree cache (Repository.remember_tree)
        self.remember_trees = remember_trees
        self.kind = kind
        self.paths = list(paths)
        self.host = host or socket.gethostname()
        self.tags = sorted(set(tags))
        self.source: dict[str, Any] = dict(source or {})
        self.parent = parent.id if isinstance(parent, Snapshot) else parent
        self.summary: dict[str, Any] = {}
        self.started = time.time()
        self._dir_meta = dir_meta
        self._root = _VirtualDir(Node(name="", type=DIR, mode=0o755))
        self.session = Session(repo, f"backup {kind}")
        try:
            repo.refresh_index()  # after the session exists: see keepwell.repository.sessions
            levels = repo.levels(kind, probe=probe_levels, pages=page_levels)
            self.sink = BlobSink(repo, upload_workers=upload_workers, levels=levels)
        except BaseException:
            self.session.end()
            raise
        self.bytes_read = 0
        self._done = False
        self._blob_workers = blob_workers or pool_threads()
        self._blob_pool: ThreadPoolExecutor | None = None
        # Chunks waiting for or in the pool, over all streams at once: bounds memory however many
        # threads feed streams in parallel (the file archiver runs several).
        self._chunk_slots = threading.BoundedSemaphore(2 * self._blob_workers + 2)

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._done:
            self.abort()

    # -- content ------------------------------------------------------------------------------
    def save_content(self, reader: IO[bytes], *, count: bool = True,
                     size: int | None = None) -> tuple[list[bytes], int]:
        """Chunk a stream and store its chunks; returns their ids in order and the byte count.
        ``size``: the stream's expected length, if known (see `Chunker.chunks`).

        The calling thread only reads and cuts; hashing, compression and encryption of each chunk
        run on a small pool (native code, GIL released), with a bounded window of chunks in flight
        so memory stays flat however long the stream is.
        """
        pool = self._pool()
        window: deque[Future[bytes]] = deque()
        limit = 2 * self._blob_workers
        ids: list[bytes] = []
        total = 0
        release = self._release_chunk
        try:
            for chunk in self.repo.chunker.chunks(reader, size=size):
                n = len(chunk)
                total += n
                self._chunk_slots.acquire()
                fut = pool.submit(self.sink.save, DATA, bytes(chunk))  # the chunker reuses its buffer
                fut.add_done_callback(release)
                window.append(fut)
                self.repo.events.emit("bytes", n=n)
                if len(window) >= limit:
                    ids.append(window.popleft().result())
            while window:
                ids.append(window.popleft().result())
        finally:
            for fut in window:
                fut.cancel()
        if count:
            self.bytes_read += total
        return ids, total

    def _release_chunk(self, _fut: Future[bytes]) -> None:
        self._chunk_slots.release()

    def _pool(self) -> ThreadPoolExecutor:
        if self._blob_pool is None:
            self._blob_pool = ThreadPoolExecutor(self._blob_workers, thread_name_prefix="kw-chunk")
        return self._blob_pool

    def add_stream(self, path: str, reader: IO[bytes], *, mode: int = 0o600, mtime: float | None = None) -> int:
        ids, size = self.save_content(reader)
        now = time.time() if mtime is None else mtime
        self.add_node(path, Node(name=path.rsplit("/", 1)[-1], type=FILE, mode=mode, size=size,
                                 mtime_ns=int(now * 1e9), ctime_ns=int(now * 1e9), content=ids))
        return size

    def add_bytes(self, path: str, data: bytes, *, mode: int = 0o600, mtime: float | None = None,
                  fixed: bool = False) -> int:
        """Store a file held in memory. ``fixed``: cut it into pieces of the largest chunk size
        instead of content-defined chunks, for data written once and never shifted (a completed
        WAL segment): zstd starts from nothing at every blob, so a few large blobs compress as the
        whole does (busy WAL: 1.9 % smaller than 1 MiB chunks), and nothing is lost to dedup,
        since such data repeats, if at all, only at the same offsets."""
        if not fixed:
            import io

            return self.add_stream(path, io.BytesIO(data), mode=mode, mtime=mtime)
        step = self.repo.chunker_params.max_size
        view = memoryview(data)
        pieces = [view[i:i + step] for i in range(0, len(data), step)]
        ids = list(self._pool().map(lambda piece: self.sink.save(DATA, piece), pieces))
        self.repo.events.emit("bytes", n=len(data))
        self.bytes_read += len(data)
        now = time.time() if mtime is None else mtime
        self.add_node(path, Node(name=path.rsplit("/", 1)[-1], type=FILE, mode=mode, size=len(data),
                                 mtime_ns=int(now * 1e9), ctime_ns=int(now * 1e9), content=ids))
        return len(data)

    def save_tree(self, nodes: list[Node], *, ordered: bool = False,
                  known: list[bytes | None] | None = None) -> bytes:
        """Store a directory's tree blob. ``ordered``: ``nodes`` are in tree order already;
        ``known`` (with ``ordered``): beside them, the encodings of those taken unchanged from
        a tree held with its encodings (`Repository.tree_pieces`), None for the others."""
        if not ordered:
            nodes = in_tree_order(nodes)
        # the nodes of a held tree read back as they are (`as_decoded`): only new ones need it
        new = nodes if known is None else [n for n, p in zip(nodes, known, strict=True) if p is None]
        remember = self.remember_trees and as_decoded(new)
        # node by node where they are kept (for the next writing of the directory) or reused
        pieces = encode_pieces(nodes, known) if remember or known is not None else None
        plain = encode_tree(nodes, ordered=True) if pieces is None else join_pieces(pieces)
        tree_id = self.sink.save(TREE, plain)
        if remember:
            self.repo.remember_tree(tree_id, nodes, pieces)
        if (own := getattr(self.repo, "own", None)) is not None:
            own.put_tree(tree_id, plain)  # an append key's parent next time
        return tree_id

    def add_node(self, path: str, node: Node) -> None:
        parts = [p for p in path.strip("/").split("/") if p]
        if not parts:
            raise UsageError("empty path inside a snapshot")
        if any(p in (".", "..") or "\0" in p for p in parts):
            # a restore would refuse the snapshot (keepwell.repository.tree.unusable_name)
            raise UsageError(f"{path!r} cannot be a path inside a snapshot",
                             hint="give a path without '.' or '..' parts")
        d = self._root
        walked = ""
        for part in parts[:-1]:
            walked = f"{walked}/{part}"
            nxt = d.children.get(part)
            if nxt is None:
                meta = self._dir_meta(walked) if self._dir_meta else Node(name=part, type=DIR, mode=0o755)
                meta.name = part
                nxt = d.children[part] = _VirtualDir(meta)
            if not isinstance(nxt, _VirtualDir):
                raise UsageError(f"{walked} is a file in this snapshot and cannot hold {path}")
            d = nxt
        node.name = parts[-1]
        if parts[-1] in d.children:
            raise UsageError(f"{path} is added twice to the snapshot")
        d.children[parts[-1]] = node

    def _store_dir(self, d: _VirtualDir) -> bytes:
        nodes = []
        for child in d.children.values():
            if isinstance(child, _VirtualDir):
                child.node.subtree = self._store_dir(child)
                child.node.type = DIR
                nodes.append(child.node)
            else:
                nodes.append(child)
        return self.save_tree(nodes)

    # -- finishing ----------------------------------------------------------------------------
    def commit(self, *, time_: datetime | None = None) -> Snapshot:
        try:
            root = self._store_dir(self._root)
            self.sink.flush()
            st = self.sink.stats
            summary = {
                "bytes_read": self.bytes_read,
                "bytes_added": st.bytes_raw_new,
                "bytes_stored": st.bytes_stored,
                "blobs_new": st.blobs_new,
                "blobs_known": st.blobs_known,
                "packs": st.packs,
                "duration": round(time.time() - self.started, 3),
            }
            summary.update(self.summary)
            fields = {
                "time": time_ or datetime.fromtimestamp(self.started, UTC),
                "host": self.host,
                "username": getpass.getuser(),
                "paths": self.paths,
                "tags": self.tags,
                "kind": self.kind,
                "tree": root.hex(),
                "parent": self.parent,
                "summary": summary,
                "source": self.source,
                "program_version": __version__,
            }
            plain = encode_snapshot(fields)
            sid = self.repo.put_object("snapshots", KIND_SNAPSHOT, plain)
        except BaseException:
            self.abort()
            raise
        self._finish()
        if (own := getattr(self.repo, "own", None)) is not None:
            own.record(sid, plain)
        snap = decode_snapshot(sid, plain)
        self.repo.events.emit("snapshot_saved", snapshot=snap)
        return snap

    def abort(self) -> None:
        """Index what was stored whole (so a later run reuses it) but record no snapshot. A pack
        whose writing failed was discarded by the sink: it is never stored, nor indexed."""
        try:
            self.sink.flush()
        except Exception:
            pass
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            if self._blob_pool is not None:
                self._blob_pool.shutdown(wait=True)
            self.sink.close()
            self.session.end()
