"""Restoring file trees.

The tree is walked once to create directories, links and empty files and to plan every blob's
destinations, a batch of files at a time; each batch's blobs are fetched pack by pack, in
parallel, with nearby blobs of a pack read in one ranged request, while the next batch is planned. Every blob is decrypted and checked against its id before a
byte of it is written. Large files are written from many packs at once (``pwrite`` at their
offsets), and runs of zeros are left as holes, so sparse files stay sparse. Metadata (owner,
mode, times) is applied to each file when its last blob lands and to directories at the end,
deepest first.

Files of one blob (most files of most trees) are written by worker processes once a restore has
enough of them (keepwell.sources.workers): each gets whole packs' worth of such files, reads
and checks the blobs and writes the files with their metadata, single-threaded, so the many
small system calls do not hand the GIL around. Files of several blobs are written here.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from keepwell.errors import KeepwellError, RestoreTargetError
from keepwell.process import fewer_collections
from keepwell.repository import Repository, Snapshot
from keepwell.repository.format import pack_object_name
from keepwell.repository.packreader import Range, ranges, read_range
from keepwell.repository.tree import BLOCKDEV, CHARDEV, DIR, FIFO, FILE, SYMLINK, Node
from keepwell.sources.files import fileio
from keepwell.sources.files.select import Matcher
from keepwell.sources.workers import Workers, can_reopen, repository_init, worker_count

_MAX_RANGE = 8 * 1024 * 1024  # one ranged read of nearby blobs, in a worker process
# the same in this process, whose threads each hold a range and its blobs at once (files of
# several blobs are large: their blobs are rarely near each other's anyway)
_MAX_RANGE_HERE = 2 * 1024 * 1024
BATCH_FILES = 4096  # files planned (and their blob locations held) at a time
WRITERS_AFTER = 256  # files of one blob in the first batch before worker processes start
_UNIT_FILES = 256  # files of one blob per request to a worker

# one file of one blob for a worker: path, mode, mtime_ns, owner to set (None: keep)
_Dest = tuple[str, int, int, tuple[int, int] | None]
# a blob for a worker: offset, stored length, raw length, id, type, files it fills
_Unit = tuple[int, int, int, bytes, int, list[_Dest]]


@dataclass
class RestoreResult:
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    processes: int = 0  # worker processes that wrote files of one blob


@dataclass(slots=True)
class _Target:
    path: str
    node: Node
    remaining: int
    created: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(slots=True)
class _Want:
    offset: int
    length: int
    raw_length: int
    blob_id: bytes
    type: int
    dests: list[tuple[_Target, int]]


def _mkdir(path: str) -> None:
    """A directory whose parent the walk made just before (one call, not makedirs' checks)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)


def _is_zero(data: bytes) -> bool:
    # the ends first: almost every blob fails there, without a pass over all of it
    return bool(data) and data[0] == 0 and data[-1] == 0 and data.count(0) == len(data)


class Restorer:
    def __init__(self, repo: Repository, snap: Snapshot, target: str, *, includes: Matcher,
                 excludes: Matcher, workers: int, processes: int = 0) -> None:
        self.repo = repo
        self.processes = processes if can_reopen(repo) else 0
        self._writers: Workers | None = None
        self.snap = snap
        self.target = target
        self.includes = includes
        self.excludes = excludes
        self.workers = workers
        self.result = RestoreResult()
        self._lock = threading.Lock()
        self._is_root = os.geteuid() == 0
        self._dirs: list[tuple[str, Node]] = []
        self._made_dirs: set[str] = set()
        self._links: dict[tuple[int, int], str] = {}
        self._deferred_links: list[tuple[str, str, Node]] = []
        # the owner a file created here has without a chown; unknown (so every file is chowned)
        # when restoring over existing files, or into a set-group-id directory (it passes its
        # group on)
        fresh = os.path.isdir(target) and not os.listdir(target)
        setgid = fresh and os.stat(target).st_mode & stat.S_ISGID
        self._creator = (os.geteuid(), os.getegid()) if fresh and not setgid else None

    # -- metadata -----------------------------------------------------------------------------
    def _apply(self, path: str, node: Node) -> None:
        link = node.type == SYMLINK
        try:
            if self._is_root:
                os.chown(path, node.uid, node.gid, follow_symlinks=not link)
            if not link:
                os.chmod(path, node.mode)
            os.utime(path, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=not link)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP):
                self._error(path, f"cannot set metadata: {exc.strerror}")

    def _error(self, path: str, msg: str) -> None:
        with self._lock:
            self.result.errors.append((path, msg))
        self.repo.events.emit("error", path=path, message=msg)

    def _ensure_parent(self, dest: str) -> None:
        parent = os.path.dirname(dest)
        if parent not in self._made_dirs:
            os.makedirs(parent, exist_ok=True)
            self._made_dirs.add(parent)

    def _apply_open(self, fd: int, path: str, node: Node) -> None:
        """`_apply` for a regular file this restore created and still holds open."""
        owner = (node.uid, node.gid) if self._is_root else None
        if owner == self._creator:
            owner = None  # created with that owner already
        try:
            fileio.set_meta(fd, node.mode, node.mtime_ns, owner)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP):
                self._error(path, f"cannot set metadata: {exc.strerror}")

    # -- planning -----------------------------------------------------------------------------
    def _selected(self, spath: str, node: Node) -> bool:
        if self.excludes and self.excludes.matches_within(spath):
            return False
        return not (self.includes and not self.includes.matches_within(spath))

    def plan(self) -> Iterator[dict[tuple[bytes, int], list[_Want]]]:
        """Walk the snapshot, make directories, links and empty files, and yield the blobs to
        fetch, grouped by pack, for one batch of files at a time (so memory stays flat)."""
        unplaced: list[_Target] = []
        total_files = total_bytes = planned = 0
        s = self.snap.summary
        if not self.includes and not self.excludes and "bytes_processed" in s:
            self.repo.events.emit("total", bytes=s["bytes_processed"], final=True, files=sum(
                s.get(k, 0) for k in ("files_new", "files_changed", "files_unmodified")))
        for rel, node in self.repo.walk(self.snap):
            spath = "/" + rel
            dest = os.path.join(self.target, rel)
            if node.type == DIR:
                if self._selected(spath, node) or (self.includes and not self.excludes.matches_within(spath)):
                    self._dirs.append((dest, node))
                    if self._selected(spath, node):
                        _mkdir(dest)
                        self._made_dirs.add(dest)
                continue
            if not self._selected(spath, node):
                continue
            self._ensure_parent(dest)
            try:
                if node.type == FILE:
                    total_files += 1
                    total_bytes += node.size
                    planned += 1
                    self._plan_file(dest, node, unplaced)
                    if planned >= BATCH_FILES:
                        yield self._place(unplaced)
                        unplaced, planned = [], 0
                elif node.type == SYMLINK:
                    os.symlink(node.target or "", dest)
                    self._apply(dest, node)
                elif node.type == FIFO:
                    os.mkfifo(dest, node.mode)
                    self._apply(dest, node)
                elif node.type in (CHARDEV, BLOCKDEV) and self._is_root:
                    kind = stat.S_IFCHR if node.type == CHARDEV else stat.S_IFBLK
                    os.mknod(dest, node.mode | kind, node.rdev)
                    self._apply(dest, node)
            except OSError as exc:
                self._error(dest, exc.strerror or str(exc))
        self.repo.events.emit("total", files=total_files, bytes=total_bytes, final=True)
        yield self._place(unplaced)

    def _plan_file(self, dest: str, node: Node, unplaced: list[_Target]) -> None:
        if node.nlink > 1:
            key = (node.dev, node.inode)
            first = self._links.get(key)
            if first is not None:
                self._deferred_links.append((first, dest, node))
                return
            self._links[key] = dest
        with self._lock:
            self.result.files += 1
        if not node.content:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
            self._apply(dest, node)
            return
        target = _Target(dest, node, len(node.content))
        if len(node.content) > 1:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, node.size)
            finally:
                os.close(fd)
            target.created = True
        unplaced.append(target)

    def _place(self, targets: list[_Target]) -> dict[tuple[bytes, int], list[_Want]]:
        """Find every blob of a batch of files (one index pass) and group them by pack."""
        packs: dict[tuple[bytes, int], dict[bytes, _Want]] = defaultdict(dict)
        locs = iter(self.repo.locate_many([b for t in targets for b in t.node.content]))
        for target in targets:
            offset = 0
            for blob_id in target.node.content:
                loc = next(locs)
                if target.remaining < 0:
                    continue
                if loc is None:
                    self._error(target.path, f"blob {blob_id.hex()[:16]} is missing from the repository")
                    target.remaining = -1
                    continue
                want = packs[(loc.pack, loc.pack_type)].get(blob_id)
                if want is None:
                    want = packs[(loc.pack, loc.pack_type)][blob_id] = _Want(
                        loc.offset, loc.length, loc.raw_length, blob_id, loc.type, [])
                want.dests.append((target, offset))
                offset += loc.raw_length
        return {k: sorted(v.values(), key=lambda w: w.offset) for k, v in packs.items()}

    # -- fetching and writing -----------------------------------------------------------------
    def _write(self, target: _Target, offset: int, data: bytes) -> None:
        with target.lock:
            if target.remaining < 0:
                return
            fd = fileio.open_write(target.path, not target.created)
            target.created = True
            try:
                if _is_zero(data) and len(data) >= 4096:
                    if os.fstat(fd).st_size < offset + len(data):
                        os.ftruncate(fd, offset + len(data))
                else:
                    fileio.pwrite_all(fd, data, offset)
                target.remaining -= 1
                done = target.remaining == 0
                if done:
                    self._apply_open(fd, target.path, target.node)
            finally:
                fileio.close(fd)
        with self._lock:
            self.result.bytes += len(data)
        self.repo.events.emit("bytes", n=len(data))
        if done:
            self.repo.events.emit("file", path=target.path, size=target.node.size)

    # -- files of one blob, in worker processes ------------------------------------------------
    def _to_writers(self, batch: dict[tuple[bytes, int], list[_Want]]) -> dict[tuple[bytes, int], list[_Want]]:
        """Send the batch's files of one blob to the worker processes (starting them on the
        first batch that has enough); return what is left to write here."""
        if self._writers is None:
            if self.processes <= 0:
                return batch
            single = sum(1 for wants in batch.values() for w in wants for t, _ in w.dests
                         if len(t.node.content) == 1)
            if single < WRITERS_AFTER:
                return batch
            init = {**repository_init(self.repo), "is_root": self._is_root, "creator": self._creator}
            self._writers = Workers("keepwell.sources.files.restorer:PackWriter", init,
                                    self.processes, lambda exc: None, "file writer")
            self.result.processes, self.processes = self.processes, 0
        writers = self._writers
        here: dict[tuple[bytes, int], list[_Want]] = {}
        for (pack, pack_type), wants in batch.items():
            name = pack_object_name(pack_type, pack.hex())
            units: list[_Unit] = []
            files = 0
            for w in wants:
                mine = [(t.path, t.node.mode, t.node.mtime_ns, self._owner(t.node))
                        for t, _ in w.dests if len(t.node.content) == 1]
                rest = [(t, o) for t, o in w.dests if len(t.node.content) != 1]
                if mine:
                    units.append((w.offset, w.length, w.raw_length, w.blob_id, w.type, mine))
                    files += len(mine)
                if rest:
                    here.setdefault((pack, pack_type), []).append(
                        _Want(w.offset, w.length, w.raw_length, w.blob_id, w.type, rest))
                if files >= _UNIT_FILES:
                    self._send_unit(writers, name, units)
                    units, files = [], 0
            if units:
                self._send_unit(writers, name, units)
        return here

    def _owner(self, node: Node) -> tuple[int, int] | None:
        owner = (node.uid, node.gid) if self._is_root else None
        return None if owner == self._creator else owner

    def _send_unit(self, writers: Workers, name: str, units: list[_Unit]) -> None:
        writers.send(writers.least_busy(), (name, units), self._written)

    def _written(self, results: list[tuple[str, int, str | None]]) -> None:
        """A worker's answer: each file's path, bytes written, error."""
        for path, n, err in results:
            if err is not None:
                self._error(path, err)
                continue
            with self._lock:
                self.result.bytes += n
            self.repo.events.emit("bytes", n=n)
            self.repo.events.emit("file", path=path, size=n)

    def _fail_dests(self, want: _Want, msg: str) -> None:
        for target, _ in want.dests:
            with target.lock:
                if target.remaining >= 0:
                    target.remaining = -1
                    self._error(target.path, msg)

    def _fetch_pack(self, pack: bytes, pack_type: int, wants: list[_Want]) -> None:
        name = pack_object_name(pack_type, pack.hex())
        for r in ranges(wants, _want_span, max_range=_MAX_RANGE_HERE):
            try:
                data = read_range(self.repo.backend, name, r)
            except KeepwellError as exc:
                for w in r.wants:
                    self._fail_dests(w, f"cannot read {name}: {exc}")
                continue
            for w, stored in r.pieces(data, _want_span):
                try:
                    plain = self.repo.open_blob(w.blob_id, w.type, stored, w.raw_length)
                except KeepwellError as exc:
                    self._fail_dests(w, str(exc))
                    continue
                for target, offset in w.dests:
                    try:
                        self._write(target, offset, plain)
                    except OSError as exc:
                        self._fail_dests(w, exc.strerror or str(exc))

    def run(self) -> RestoreResult:
        with ThreadPoolExecutor(self.workers, thread_name_prefix="kw-restore") as pool:
            # batches are planned while earlier ones are fetched; at most three are held at once,
            # and the pool never drains between two of them
            inflight: deque[list[Future[None]]] = deque()
            try:
                for batch in self.plan():
                    here = self._to_writers(batch)
                    inflight.append([pool.submit(self._fetch_pack, p, t, w) for (p, t), w in here.items()])
                    del batch, here
                    while len(inflight) > 2:
                        for f in inflight.popleft():
                            f.result()
                while inflight:
                    for f in inflight.popleft():
                        f.result()
                if self._writers is not None:
                    self._writers.close()
            finally:
                if self._writers is not None:
                    self._writers.terminate()
        for first, dest, _node in self._deferred_links:
            try:
                os.link(first, dest)
            except OSError as exc:
                self._error(dest, f"cannot create hard link: {exc.strerror}")
        for dest, node in reversed(self._dirs):
            if os.path.isdir(dest):
                self._apply(dest, node)
                self.result.dirs += 1
        return self.result


def restore_snapshot(repo: Repository, snap: Snapshot, target: str, *,
                     includes: list[str] | tuple[str, ...] | Matcher = (),
                     excludes: list[str] | tuple[str, ...] | Matcher = (), overwrite: bool = False,
                     workers: int = 4) -> RestoreResult:
    target = os.path.abspath(target)
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise RestoreTargetError(f"restore target {target} exists and is not a directory")
        if os.listdir(target) and not overwrite:
            raise RestoreTargetError(f"restore target {target} is not empty")
    os.makedirs(target, exist_ok=True)
    with fewer_collections():
        # a Matcher given by the caller records which of its patterns matched something
        return Restorer(repo, snap, target, includes=_matcher(includes), excludes=_matcher(excludes),
                        workers=workers, processes=worker_count("KEEPWELL_FILE_PROCESSES", reserve=1)).run()


def _matcher(patterns: list[str] | tuple[str, ...] | Matcher) -> Matcher:
    return patterns if isinstance(patterns, Matcher) else Matcher(patterns)


class PackWriter:
    """In a worker process: reads a pack's blobs (`keepwell.repository.packreader` ranges of
    nearby blobs in one request), checks each against its id, and writes the files of one blob
    they fill, with their metadata. The
    ranges of the requests waiting behind the current one are fetched meanwhile (`prefetch`),
    so a remote repository's latency is hidden behind the writing."""

    def __init__(self, init: dict[str, Any]) -> None:
        from keepwell.repository.repo import reopen_repository

        self.repo = reopen_repository(init["location"], init["options"], init["master"],
                                      init["config"], init["key_id"])
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="kw-fetch")
        self._fetched: dict[int, list[tuple[Range[_Unit], Future[memoryview]]]] = {}

    def prefetch(self, request: tuple[str, list[_Unit]]) -> None:
        name, units = request
        if id(units) not in self._fetched:
            self._fetched[id(units)] = [(r, self._pool.submit(read_range, self.repo.backend, name, r))
                                        for r in ranges(units, _unit_span, max_range=_MAX_RANGE)]

    def handle(self, request: tuple[str, list[_Unit]]) -> list[tuple[str, int, str | None]]:
        name, units = request
        self.prefetch(request)
        out: list[tuple[str, int, str | None]] = []
        for r, fetch in self._fetched.pop(id(units)):
            try:
                data = fetch.result()
            except KeepwellError as exc:
                out += [(d[0], 0, f"cannot read {name}: {exc}") for u in r.wants for d in u[5]]
                continue
            for (_offset, _length, raw_length, blob_id, btype, dests), stored in \
                    r.pieces(data, _unit_span):
                try:
                    plain = self.repo.open_blob(blob_id, btype, stored, raw_length)
                except KeepwellError as exc:
                    out += [(d[0], 0, str(exc)) for d in dests]
                    continue
                for dest in dests:
                    out.append(_write_whole(dest, plain))
        return out

    def finish(self) -> dict[str, Any]:
        self._pool.shutdown(wait=True)
        return {}


def _want_span(w: _Want) -> tuple[int, int]:
    return w.offset, w.length


def _unit_span(u: _Unit) -> tuple[int, int]:
    return u[0], u[1]


def _write_whole(dest: _Dest, data: bytes) -> tuple[str, int, str | None]:
    path, mode, mtime_ns, owner = dest
    try:
        fd = fileio.open_write(path, True)
    except OSError as exc:
        return path, 0, exc.strerror or str(exc)
    try:
        if _is_zero(data) and len(data) >= 4096:
            os.ftruncate(fd, len(data))  # a hole
        else:
            fileio.pwrite_all(fd, data, 0)
        try:
            fileio.set_meta(fd, mode, mtime_ns, owner)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP):
                return path, len(data), f"cannot set metadata: {exc.strerror}"
        return path, len(data), None
    except OSError as exc:
        return path, 0, exc.strerror or str(exc)
    finally:
        fileio.close(fd)
