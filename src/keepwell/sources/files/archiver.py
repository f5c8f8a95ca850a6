"""Backing up file trees.

Directories are listed and stat'ed by one walker thread (keepwell.sources.files.prefetch stats
the tree ahead of it); small files are read, chunked, hashed, compressed and encrypted by worker
processes (keepwell.sources.files.readers), large ones by a pool of reader threads, whose chunks
the snapshot writer's pool spreads over the cores. Directory trees are built as their last child
finishes, in whatever thread that is, so no thread waits for a subtree. In-flight files are
bounded, so memory stays flat however large the tree.

A file is not re-read when the parent snapshot holds it with the same size, mtime, ctime and
inode, and all its blobs are still in the index; when every other field matches too, its old
node is kept as it is (the ctime covers the extended attributes too). Unreadable entries are
reported and skipped; the result then says it is partial. Sockets are skipped and counted
(``sockets_skipped``): nothing could restore one.

Extended attributes (keepwell.sources.files.metadata) are read through the descriptor a file is
read with, and by path for directories, symlinks and special files.

A `PathMap` lets a path be read from elsewhere than where it is recorded: a backup with
``--fs-snapshot`` (keepwell.sources.files.fssnapshot) walks the filesystem snapshot and records
the original paths. The walk goes by the paths it reads; the map gives the recorded path where
it matters (exclude patterns, reported errors, the parent snapshot, the root's name). The walk
leaves out the btrfs snapshots that such a backup puts into a subvolume's root.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from operator import attrgetter
from typing import Any

from keepwell.cpus import pool_threads, usable_cores
from keepwell.errors import KeepwellError, UsageError
from keepwell.memory import fewer_collections
from keepwell.repository import Repository, Snapshot
from keepwell.repository.format import DATA
from keepwell.repository.tree import BLOCKDEV, CHARDEV, DIR, FIFO, FILE, SOCKET, SYMLINK, Node
from keepwell.repository.writer import SnapshotWriter
from keepwell.sources.files import metadata
from keepwell.sources.files.fssnapshot import BTRFS_ROOT_INODE, fs_snapshots, is_own_btrfs_snapshot
from keepwell.sources.files.prefetch import Prefetch
from keepwell.sources.files.readers import ReaderPool, read_whole
from keepwell.sources.files.select import Selection
from keepwell.sources.files.workers import can_reopen, worker_count

# Files from this size on are streamed by the main process, a few at a time; smaller ones are read
# whole (by a worker process once there are many), where a file of 8 MiB and its compressed and
# encrypted copies held 24 MiB at once
_LARGE = 2 * 1024 * 1024
_OPEN_FLAGS = os.O_RDONLY | (getattr(os, "O_NOATIME", 0) if os.geteuid() == 0 else 0)
# Small files go to worker processes (keepwell.sources.files.readers) once a run has this many to
# read: below that, starting the processes costs more than it saves.
READERS_AFTER = 256


@dataclass
class BackupResult:
    snapshot: Snapshot
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return bool(self.errors)


class PathMap:
    """Where each path backed up is read from (``reads``: recorded path → path read); a path
    not in it is read where it is."""

    def __init__(self, reads: Mapping[str, str] | None = None) -> None:
        self._reads = dict(reads or {})
        # longest first, so a nested root wins
        self._back = sorted(((r, p) for p, r in self._reads.items() if r != p),
                            key=lambda rp: -len(rp[0]))
        # the device a path is read from → the device of the path it is recorded as: a
        # filesystem snapshot is a device of its own (a new one each time for btrfs), and a
        # node recording it would differ from its parent's node for every file and directory
        self.devs: dict[int, int] = {}
        for rec, read in self._reads.items():
            if rec != read:
                try:
                    self.devs[os.lstat(read).st_dev] = os.lstat(rec).st_dev
                except OSError:
                    pass

    def __bool__(self) -> bool:
        return bool(self._back)

    def read_from(self, path: str) -> str:
        return self._reads.get(path, path)

    def recorded(self, path: str) -> str:
        """The recorded path of a path the walk reads."""
        for read, rec in self._back:
            if path == read or path.startswith(read + "/"):
                return rec + path[len(read):]
        return path


class _Names:
    def __init__(self, devs: dict[int, int] | None = None) -> None:
        self.users: dict[int, str] = {}
        self.groups: dict[int, str] = {}
        self.devs = devs or {}  # PathMap.devs

    def user(self, uid: int) -> str:
        n = self.users.get(uid)
        if n is None:
            try:
                n = pwd.getpwuid(uid).pw_name
            except KeyError:
                n = ""
            self.users[uid] = n
        return n

    def group(self, gid: int) -> str:
        n = self.groups.get(gid)
        if n is None:
            try:
                n = grp.getgrgid(gid).gr_name
            except KeyError:
                n = ""
            self.groups[gid] = n
        return n


def node_from_stat(name: str, st: os.stat_result, names: _Names) -> Node:
    m = st.st_mode
    if stat.S_ISREG(m):
        kind = FILE
    elif stat.S_ISDIR(m):
        kind = DIR
    elif stat.S_ISLNK(m):
        kind = SYMLINK
    elif stat.S_ISFIFO(m):
        kind = FIFO
    elif stat.S_ISCHR(m):
        kind = CHARDEV
    elif stat.S_ISBLK(m):
        kind = BLOCKDEV
    else:
        kind = SOCKET
    return Node(
        name=name, type=kind, mode=stat.S_IMODE(m), uid=st.st_uid, gid=st.st_gid,
        user=names.user(st.st_uid), group=names.group(st.st_gid), mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns, size=st.st_size if kind == FILE else 0, inode=st.st_ino,
        dev=names.devs.get(st.st_dev, st.st_dev), nlink=st.st_nlink, rdev=st.st_rdev if kind in (CHARDEV, BLOCKDEV) else 0,
    )


class _Dir:
    """A directory whose tree is written once every child is known."""

    __slots__ = ("node", "nodes", "remaining", "parent", "slot", "done", "old_id", "old_nodes")

    def __init__(self, node: Node, count: int, parent: _Dir | None, slot: int,
                 done: Future[Node] | None = None) -> None:
        self.done = done
        self.old_id: bytes | None = None  # the parent snapshot's tree of this directory
        self.old_nodes: list[Node] = []
        self.node = node
        self.nodes: list[Node | None] = [None] * count
        self.remaining = count
        self.parent = parent
        self.slot = slot


class Archiver:
    def __init__(self, repo: Repository, writer: SnapshotWriter, *, selection: Selection,
                 one_file_system: bool, parent: Snapshot | None, workers: int,
                 processes: int = 0, kind: str = "files", paths: PathMap | None = None) -> None:
        self.repo = repo
        self.paths = paths or PathMap()
        self.writer = writer
        self.selection = selection
        self.one_file_system = one_file_system
        self.parent = parent
        self.names = _Names(self.paths.devs)
        self.errors: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        # Readers (large files; small ones go to worker processes): one per core plus one to
        # cover a blocking read.
        self._files = ThreadPoolExecutor(workers + 1, thread_name_prefix="kw-file")
        # One walker thread, taking the directory found last first (depth first: a directory's
        # tree is written, and the nodes it holds let go, soon after its subtree is walked;
        # breadth first, most directories stayed open until the end, and a re-backup of 600,000
        # files peaked 18 MiB higher). A second walker only hands the GIL back and forth (an
        # unchanged re-backup of 50,000 files: 2.45 s with two, 1.62 s with one); a cold disk's
        # latency is covered by `Prefetch`. A plain deque: an executor's bookkeeping per
        # directory cost 5 % of an unchanged re-backup.
        self._dir_queue: deque[tuple[Any, ...] | None] = deque()
        self._dir_ready = threading.Event()
        self._walker = threading.Thread(target=self._walk_loop, name="kw-walk", daemon=True)
        self._walker.start()
        self._slots = threading.BoundedSemaphore(64)
        self._large = threading.Semaphore(max(2, min(4, usable_cores())))
        self._error: BaseException | None = None
        self._wake = threading.Event()
        self._processes = processes if can_reopen(repo) else 0
        self._kind = kind
        self._readers: ReaderPool | None = None
        self._to_read = 0  # small files sent to be read so far
        self._dir_jobs = 0  # directories submitted and not yet listed
        self.counts = {"files_new": 0, "files_changed": 0, "files_unmodified": 0, "dirs": 0,
                       "bytes_processed": 0, "errors": 0, "reader_processes": 0,
                       "sockets_skipped": 0}
        # directories listed whose tree is not written yet (each holds its entries' nodes), and
        # the most there were at once: what the walk's memory grows with
        self.dirs_open = self.dirs_open_peak = 0
        self._xattrs = metadata.XattrReader()

    # -- results flowing up -------------------------------------------------------------------
    def _child_done(self, d: _Dir, slot: int, node: Node | None) -> None:
        with self._lock:
            d.nodes[slot] = node
            d.remaining -= 1
            finished = d.remaining == 0
        if finished:
            self._finish_dir(d)

    def _finish_dir(self, d: _Dir) -> None:
        try:
            nodes = [n for n in d.nodes if n is not None]
            if d.old_id is not None and nodes == d.old_nodes:
                d.node.subtree = d.old_id  # nothing in it changed: the same tree blob
            else:
                d.node.subtree = self.writer.save_tree(nodes)
            d.old_nodes = []
        except BaseException as exc:  # storage failure: stop the run
            self._fail(exc)
            return
        with self._lock:
            self.counts["dirs"] += 1
            self.dirs_open -= 1
        if d.parent is not None:
            self._child_done(d.parent, d.slot, d.node)
        elif d.done is not None:
            d.done.set_result(d.node)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc
        self._wake.set()

    def _report(self, path: str, msg: str) -> None:
        path = self.paths.recorded(path)
        with self._lock:
            self.errors.append((path, msg))
            self.counts["errors"] += 1
        self.repo.events.emit("error", path=path, message=msg)

    # -- files --------------------------------------------------------------------------------
    def _unchanged(self, node: Node, old: Node | None, known: set[str] | None = None) -> bool:
        """Same size, mtime, ctime and inode as in the parent snapshot, and every blob still
        stored. ``known``: names of the directory's old files whose blobs were checked at once."""
        if old is None or old.type != FILE or old.size != node.size or old.mtime_ns != node.mtime_ns \
                or old.ctime_ns != node.ctime_ns or old.inode != node.inode:
            return False
        if known is not None:
            return old.name in known
        index = self.repo.index
        return all(index.has(b) for b in old.content)

    def _known_files(self, olds: list[Node], tree_id: bytes | None) -> tuple[set[str], bool]:
        """Names of the old files whose blobs are all in the index, and whether the old tree
        itself is: one vectorised lookup per directory."""
        files = [n for n in olds if n.type == FILE]
        ids = [b for n in files for b in n.content]
        if tree_id is not None:
            ids.append(tree_id)
        hits = self.repo.index.has_each(ids)
        known = set()
        i = 0
        for n in files:
            k = len(n.content)
            if all(hits[i:i + k]):
                known.add(n.name)
            i += k
        return known, tree_id is not None and hits[-1]

    def read_file(self, path: str, node: Node) -> list[bytes]:
        """Store the content of the file at ``path``; sets the node's size to the bytes read and
        its extended attributes, and returns the content's blob ids."""
        fd = os.open(path, _OPEN_FLAGS)
        try:
            node.xattrs = metadata.read_fd(fd)
            if node.size < _LARGE:
                return self._read_whole(fd, node)
            # a few large files at once (`_large`): each stream's thread reads and cuts its file
            # alone (the writer's pool hashes, compresses and encrypts the chunks); with one at
            # a time, a file whose chunks are mostly known left the pool idle and every other
            # core with it (a re-backup of a changed 640 MiB image and 405 MiB database: 5.2-5.9 s
            # one at a time, 3.3-3.7 s two at once). Each stream holds a buffer (up to 6 MiB).
            with self._large, os.fdopen(os.dup(fd), "rb", buffering=0) as f:
                ids, node.size = self.writer.save_content(f, count=False, size=node.size)
                return ids
        finally:
            os.close(fd)

    def _read_whole(self, fd: int, node: Node) -> list[bytes]:
        """A file below `_LARGE`: one read into memory, then cut in place (no stream buffer to
        allocate and zero per file)."""
        data = read_whole(fd, node.size)
        node.size = len(data)
        self.repo.events.emit("bytes", n=len(data))
        if not data:
            return []
        sink = self.writer.sink
        if len(data) <= self.repo.chunker_params.min_size:
            return [sink.save(DATA, data)]
        return [sink.save(DATA, chunk) for chunk in self.repo.chunker.chunks_of(data)]

    def _file_job(self, d: _Dir, slot: int, path: str, node: Node, changed: bool) -> None:
        try:
            node.content = self.read_file(path, node)
            with self._lock:
                self.counts["files_changed" if changed else "files_new"] += 1
                self.counts["bytes_processed"] += node.size
            self.repo.events.emit("file", path=path, size=node.size)
            result: Node | None = node
        except OSError as exc:
            self._report(path, exc.strerror or str(exc))
            result = None
        except BaseException as exc:
            self._fail(exc)
            result = None
        finally:
            self._slots.release()
        self._child_done(d, slot, result)

    # -- the walk -----------------------------------------------------------------------------
    def _old_tree(self, old: Node | None) -> list[Node]:
        if old is None or old.type != DIR or old.subtree is None:
            return []
        try:
            return self.repo.load_tree(old.subtree)
        except KeepwellError:
            return []

    def _walk_dir(self, path: str, node: Node, old: Node | None, parent: _Dir | None, slot: int,
                  done: Future[Node] | None = None) -> None:
        node.xattrs = self._xattrs.read(path, node.dev, directory=True)
        try:
            with os.scandir(path) as it:
                # by name: the order of the old tree's nodes (byte order) for all but names
                # that are not UTF-8, whose trees are then compared in full, not by identity
                entries = sorted(it, key=attrgetter("name"))
        except OSError as exc:
            self._report(path, f"cannot list directory: {exc.strerror}")
            entries = []
        sel = self.selection
        if sel.tag_files and (only := sel.kept_names(path, (e.name for e in entries))) is not None:
            entries = [e for e in entries if e.name in only]
        kept = []
        recorded = self.paths.recorded if self.paths else None
        for e in entries:
            child = f"{path.rstrip('/')}/{e.name}"
            if sel.by_path and sel.skips_path(recorded(child) if recorded else child):
                continue
            kept.append((e, child))
        d = _Dir(node, len(kept), parent, slot, done)
        with self._lock:
            self.dirs_open += 1
            self.dirs_open_peak = max(self.dirs_open_peak, self.dirs_open)
        if not kept:
            self._finish_dir(d)
            return
        old_nodes = self._old_tree(old)
        known: set[str] | None = None
        if old_nodes:
            assert old is not None
            known, tree_kept = self._known_files(old_nodes, old.subtree)
            if tree_kept:  # the old tree blob can stand for this directory if nothing changed
                d.old_id, d.old_nodes = old.subtree, old_nodes
        old_children = {n.name: n for n in old_nodes}
        # Children settled here (unchanged files above all) are counted and released in one
        # step at the end; the extra count keeps the directory open until then.
        d.remaining += 1
        settled = same = same_bytes = sockets = 0
        nodes, names = d.nodes, self.names
        users, groups = names.users, names.groups  # filled by node_from_stat on a first miss
        devs = names.devs
        larger_than = sel.larger_than
        try:
            for i, (e, child) in enumerate(kept):
                if self._error is not None:
                    raise self._error
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError as exc:
                    self._report(child, exc.strerror or str(exc))
                    nodes[i] = None
                    settled += 1
                    continue
                if (larger_than is not None and sel.skips_size(st)) or (
                        st.st_ino == BTRFS_ROOT_INODE and is_own_btrfs_snapshot(e.name, st)):
                    nodes[i] = None
                    settled += 1
                    continue
                o = old_children.get(e.name)
                if o is not None and known is not None and o.name in known \
                        and o.xattrs is not None and o.mtime_ns == st.st_mtime_ns and o.ctime_ns == st.st_ctime_ns \
                        and o.size == st.st_size and o.inode == st.st_ino and o.type == FILE \
                        and stat.S_ISREG(st.st_mode) and o.mode == stat.S_IMODE(st.st_mode) \
                        and o.uid == st.st_uid and o.gid == st.st_gid and o.dev == devs.get(st.st_dev, st.st_dev) \
                        and o.nlink == st.st_nlink and o.user == users.get(st.st_uid) \
                        and o.group == groups.get(st.st_gid):
                    nodes[i] = o  # unchanged, and so is every field it records: the old node
                    settled += 1
                    same += 1
                    same_bytes += o.size
                    continue
                cnode = node_from_stat(e.name, st, names)
                if cnode.type in (FILE, DIR):
                    self._add(child, cnode, st, o, d, i, known)
                    continue
                if cnode.type == SOCKET:
                    nodes[i] = None
                    settled += 1
                    sockets += 1
                    continue
                cnode.xattrs = self._xattrs.read(child, st.st_dev)
                if cnode.type == SYMLINK:
                    try:
                        cnode.target = os.readlink(child)
                    except OSError as exc:
                        self._report(child, exc.strerror or str(exc))
                        nodes[i] = None
                        settled += 1
                        continue
                nodes[i] = cnode
                settled += 1
        finally:
            if sockets:
                with self._lock:
                    self.counts["sockets_skipped"] += sockets
            if same:
                with self._lock:
                    self.counts["files_unmodified"] += same
                    self.counts["bytes_processed"] += same_bytes
                self.repo.events.emit("files", n=same, bytes=same_bytes)
            with self._lock:
                d.remaining -= settled + 1
                finished = d.remaining == 0
            if finished:
                self._finish_dir(d)

    def _dir_job(self, path: str, node: Node, old: Node | None, d: _Dir | None, slot: int,
                 done: Future[Node] | None = None) -> None:
        try:
            self._walk_dir(path, node, old, d, slot, done)
        except BaseException as exc:
            self._fail(exc)
        finally:
            with self._lock:
                self._dir_jobs -= 1
                walked = self._dir_jobs == 0
            if walked and self._readers is not None:
                try:
                    self._readers.flush()  # no more files will come: send the partial batches
                except BaseException as exc:
                    self._fail(exc)

    def _submit_dir(self, path: str, node: Node, old: Node | None, d: _Dir | None, slot: int,
                    done: Future[Node] | None = None) -> None:
        with self._lock:
            self._dir_jobs += 1
        self._dir_queue.append((path, node, old, d, slot, done))
        self._dir_ready.set()

    def _walk_loop(self) -> None:
        queue, ready = self._dir_queue, self._dir_ready
        while True:
            try:
                job = queue.pop()
            except IndexError:
                ready.wait()
                ready.clear()  # then look again: whatever was added before the set is there
                continue
            if job is None:
                return
            if self._error is None:  # after a failure, only drain the queue
                self._dir_job(*job)

    # -- small files in worker processes ------------------------------------------------------
    def _reader_pool(self) -> ReaderPool | None:
        if self._readers is not None or self._processes <= 0:
            return self._readers
        with self._lock:
            self._to_read += 1
            if self._to_read < READERS_AFTER or self._readers is not None:
                return self._readers
            self._processes, processes = 0, self._processes  # start them once
        pool = ReaderPool(self.repo, processes, self._kind, self._fail)
        with self._lock:
            self._readers = pool
            self.counts["reader_processes"] = processes
        return pool

    def _file_stored(self, d: _Dir, slot: int, path: str, node: Node, changed: bool,
                     ids: list[bytes], size: int, error: str | None, assumed: list[bytes],
                     xattrs: metadata.Xattrs) -> None:
        """A worker process's answer for one file (called in its result thread)."""
        try:
            if error is not None:
                self._report(path, error)
                self._child_done(d, slot, None)
                return
            if assumed and not all(self.repo.index.has_each(assumed)):
                # an 8-byte key matched, the blob did not: store this file here
                self._slots.acquire()
                self._files.submit(self._file_job, d, slot, path, node, changed)
                return
            node.content, node.size, node.xattrs = ids, size, xattrs
            with self._lock:
                self.counts["files_changed" if changed else "files_new"] += 1
                self.counts["bytes_processed"] += size
            self.repo.events.emit("bytes", n=size)
            self.repo.events.emit("file", path=path, size=size)
        except BaseException as exc:
            self._fail(exc)
            return
        self._child_done(d, slot, node)

    def _add(self, path: str, node: Node, st: os.stat_result, old: Node | None, d: _Dir | None,
             slot: int, known: set[str] | None = None) -> None:
        """A directory or regular file the walk found: walk it, or store it unless unchanged."""
        if node.type == DIR:
            if self.one_file_system and d is not None and node.dev != d.node.dev:
                node.subtree = None
                self._child_done(d, slot, None)
                return
            self._submit_dir(path, node, old, d, slot)
            return
        assert d is not None and node.type == FILE  # other kinds are settled by the walk
        if self._unchanged(node, old, known):
            assert old is not None
            node.content = old.content
            node.xattrs = old.xattrs if old.xattrs is not None else self._xattrs.read(path, st.st_dev)
            with self._lock:
                self.counts["files_unmodified"] += 1
                self.counts["bytes_processed"] += node.size
            self.repo.events.emit("bytes", n=node.size)
            self.repo.events.emit("file", path=path, size=node.size)
            self._child_done(d, slot, node)
            return
        if node.size < _LARGE and (readers := self._reader_pool()) is not None:
            readers.submit(path, node.size,
                           partial(self._file_stored, d, slot, path, node, old is not None))
            return
        self._slots.acquire()
        self._files.submit(self._file_job, d, slot, path, node, old is not None)

    def backup_root(self, path: str) -> Node | None:
        """Walk one top-level path; return its node once its whole subtree is stored (None for
        a socket, which is skipped, and for a file ``--exclude-larger-than`` leaves out)."""
        old = None
        if self.parent is not None:
            try:
                old = self.repo.find_node(self.parent, path)
            except KeepwellError:
                old = None
        read = self.paths.read_from(path)
        return self.backup_tree(read, os.lstat(read), old)

    def backup_tree(self, path: str, st: os.stat_result, old: Node | None) -> Node | None:
        """`backup_root` against a given node of the parent (None: none), for a path whose
        `lstat` is ``st``: a subtree scanned again while a tree is kept up to date."""
        name = self.paths.recorded(path).rstrip("/").rsplit("/", 1)[-1] or "/"
        node = node_from_stat(name, st, self.names)
        if node.type == SOCKET:
            with self._lock:
                self.counts["sockets_skipped"] += 1
            return None
        if node.type == FILE and self.selection.skips_size(st):
            return None
        if node.type == FILE:  # a file named on the command line: counted as the walk counts
            if self._unchanged(node, old):
                assert old is not None
                node.content = old.content
                node.xattrs = old.xattrs if old.xattrs is not None else self._xattrs.read(path, st.st_dev)
                counter = "files_unmodified"
                self.repo.events.emit("bytes", n=node.size)
            else:
                node.content = self.read_file(path, node)
                counter = "files_new" if old is None else "files_changed"
            with self._lock:
                self.counts[counter] += 1
                self.counts["bytes_processed"] += node.size
            self.repo.events.emit("file", path=path, size=node.size)
            return node
        if node.type != DIR:
            node.xattrs = self._xattrs.read(path, st.st_dev)
            if node.type == SYMLINK:
                node.target = os.readlink(path)
            return node
        fut: Future[Node] = Future()
        fut.add_done_callback(lambda _: self._wake.set())
        self._submit_dir(path, node, old, None, 0, fut)
        while True:
            if self._error is not None:
                raise self._error
            if fut.done():
                return fut.result()
            self._wake.wait()
            self._wake.clear()

    def close(self) -> None:
        self._dir_queue.appendleft(None)  # under whatever is left: the walk ends once it is done
        self._dir_ready.set()
        self._walker.join()
        try:
            if self._readers is not None:
                # their packs and index objects are stored once they are closed
                totals = self._readers.close()
                self.writer.sink.stats.add(totals)
                self.repo.refresh_index()  # so this process can read what they stored
                # their uploads went past this process's backend (and whatever counts on it)
                self.repo.events.emit("stored_by_workers", bytes=totals.get("bytes_stored", 0),
                                      packs=totals.get("packs", 0))
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._files.shutdown(wait=True)
        if self._error is not None:
            raise self._error


def _dir_meta(names: _Names) -> Callable[[str], Node]:
    def meta(path: str) -> Node:
        try:
            st = os.lstat(path)
            node = node_from_stat(path.rsplit("/", 1)[-1], st, names)
            node.xattrs = metadata.read_path(path)
            return node
        except OSError:
            return Node(name=path.rsplit("/", 1)[-1], type=DIR, mode=0o755)

    return meta


def scan_totals(paths: list[str], report: Callable[[int, int, bool], None], *,
                selection: Selection | None = None, one_file_system: bool = False,
                stop: threading.Event | None = None) -> None:
    """Count the regular files and bytes a backup of ``paths`` will read, calling
    ``report(files, bytes, finished)`` as the count grows: what a progress display needs for an
    ETA. Runs beside the backup (metadata only, so it is far ahead of the readers)."""
    sel = selection or Selection()
    files = size = 0
    last = 0
    stack: list[tuple[str, int | None]] = []
    for p in paths:
        ap = os.path.abspath(p)
        try:
            st = os.lstat(ap)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            stack.append((ap, st.st_dev))
        elif stat.S_ISREG(st.st_mode) and not sel.skips_size(st):
            files, size = files + 1, size + st.st_size
    while stack:
        if stop is not None and stop.is_set():
            return
        path, dev = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = list(it)
            if sel.tag_files and (only := sel.kept_names(path, (e.name for e in entries))) is not None:
                entries = [e for e in entries if e.name in only]
            for e in entries:
                child = f"{path.rstrip('/')}/{e.name}"
                if sel.by_path and sel.skips_path(child):
                    continue
                try:
                    if e.is_dir(follow_symlinks=False):
                        if one_file_system and e.stat(follow_symlinks=False).st_dev != dev:
                            continue
                        stack.append((child, dev))
                    elif e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        if not sel.skips_size(st):
                            files += 1
                            size += st.st_size
                except OSError:
                    continue
        except OSError:
            continue
        if files - last >= 1000:
            last = files
            report(files, size, False)
    report(files, size, True)


def find_parent(repo: Repository, paths: list[str], host: str) -> Snapshot | None:
    if not repo.full:
        # an append key reads no snapshot: its own last one is in its local cache
        # (keepwell.repository.owncache); without it every file is read again, and only what
        # the index does not know is stored (docs/security.md)
        own = repo.own.last(host, paths, repo.snapshot_ids()) if repo.own is not None else None
        if own is None:
            repo.events.emit("info", message="no earlier backup of these paths by this append "
                             "key in its local cache: every file is read")
        return own
    for snap in reversed(repo.list_snapshots("files")):
        if snap.host == host and sorted(snap.paths) == sorted(paths):
            return snap
    return None


def backup_paths(repo: Repository, paths: list[str], *, excludes: list[str] | tuple[str, ...] = (),
                 selection: Selection | None = None, one_file_system: bool = False,
                 tags: list[str] | tuple[str, ...] = (),
                 host: str | None = None, parent: Snapshot | None | str = "auto",
                 workers: int | None = None, source: dict[str, Any] | None = None,
                 kind: str = "files", fs_snapshot: str | None = None) -> BackupResult:
    """Back up ``paths`` into a new snapshot. ``fs_snapshot`` (btrfs, lvm, auto): read them from
    a filesystem snapshot taken first and removed at the end (keepwell.sources.files.fssnapshot)."""
    if not paths:
        raise UsageError("nothing to back up: give at least one path")
    if "" in paths:  # an empty or unset variable: never the current directory
        raise UsageError("an empty path names nothing to back up",
                         hint="give the files and directories; '.' is the current directory")
    absolute = []
    missing: list[tuple[str, str]] = []  # reported, and the rest is saved (a partial snapshot)
    for p in paths:
        ap = os.path.abspath(os.path.expanduser(p))
        if ap == "/":
            raise UsageError("backing up / itself: give its subdirectories instead")
        if not os.path.lexists(ap):
            missing.append((ap, "no such file or directory"))
        elif ap not in absolute:
            absolute.append(ap)
    if not absolute:
        raise UsageError(f"{paths[0]}: no such file or directory" if len(paths) == 1
                         else "nothing to back up: none of the paths exists")
    for path, msg in missing:
        repo.events.emit("error", path=path, message=msg)
    run = partial(_backup, repo, absolute, missing, selection=selection or Selection(excludes),
                  one_file_system=one_file_system, tags=tags, host=host, parent=parent,
                  workers=workers, source=source, kind=kind)
    if fs_snapshot is None:
        return run(PathMap())
    with fs_snapshots(absolute, fs_snapshot,
                      lambda line: repo.events.emit("warning", message=line)) as reads:
        return run(PathMap(reads))


def _backup(repo: Repository, absolute: list[str], missing: list[tuple[str, str]], paths: PathMap,
            *, selection: Selection, one_file_system: bool, tags: list[str] | tuple[str, ...],
            host: str | None, parent: Snapshot | None | str, workers: int | None,
            source: dict[str, Any] | None, kind: str) -> BackupResult:
    import socket

    host = host or socket.gethostname()
    names = _Names()
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))
    writer = repo.new_snapshot(kind, absolute, host=host, tags=tags, source=source,
                               dir_meta=_dir_meta(names))
    with writer, fewer_collections():
        if parent == "auto":
            parent = find_parent(repo, absolute, host) if kind == "files" else None
        elif isinstance(parent, str):
            parent = repo.find_snapshot(parent)
        writer.parent = parent.id if parent is not None else None
        archiver = Archiver(repo, writer, selection=selection, one_file_system=one_file_system,
                            parent=parent, workers=workers or pool_threads(),
                            # one per core: the walk, the trees and the large files of this
                            # process leave it idle much of the time on a tree of small files
                            processes=worker_count("KEEPWELL_FILE_PROCESSES"), kind=kind,
                            paths=paths)
        prefetch = Prefetch([paths.read_from(ap) for ap in absolute],
                            one_file_system=one_file_system)
        try:
            for ap in absolute:
                if (root := archiver.backup_root(ap)) is not None:
                    writer.add_node(ap, root)
        except BaseException as exc:  # an interruption too: the walk stops instead of finishing
            archiver._fail(exc)
            raise
        finally:
            prefetch.stop()
            archiver.close()
        archiver.counts["errors"] += len(missing)
        writer.summary.update(archiver.counts)
        snap = writer.commit()
    return BackupResult(snap, missing + archiver.errors)
