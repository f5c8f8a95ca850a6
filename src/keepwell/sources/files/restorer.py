"""Restoring file trees.

The tree is walked once to create directories, links and empty files and to plan every blob's
destinations, a batch of files at a time; each batch's blobs are fetched pack by pack, in
parallel, with nearby blobs of a pack read in one ranged request, while the next batch is planned. Every blob is decrypted and checked against its id before a
byte of it is written. Large files are written from many packs at once (``pwrite`` at their
offsets), and runs of zeros are left as holes, so sparse files stay sparse. Metadata (owner,
mode, times, extended attributes: keepwell.sources.files.metadata) is applied to each file when
its last blob lands and to directories at the end, deepest first; what could not be applied for
want of privilege or support is counted and said once (`RestoreResult.metadata`).

Files of one blob (most files of most trees) are written by worker processes once a restore has
enough of them (keepwell.sources.files.workers): each gets whole packs' worth of such files, reads
and checks the blobs and writes the files with their metadata, single-threaded, so the many
small system calls do not hand the GIL around. Files of several blobs are written here.

Nothing is written outside the target: the snapshot's names are checked as its trees are read
(`Repository.walk` with ``checked``), and every directory, file and link under the target is
reached through directory descriptors, never following a link restore did not make, and an
existing file is replaced by a new one, never written through (keepwell.sources.files.targetdir).
Both hold in this process and in the worker processes alike.
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
from functools import partial
from typing import TYPE_CHECKING, Any

from keepwell.errors import IntegrityError, KeepwellError, RestoreTargetError, UsageError
from keepwell.memory import fewer_collections
from keepwell.repository import Repository, Snapshot
from keepwell.repository.format import pack_object_name
from keepwell.repository.packreader import Range, open_range, ranges, read_range
from keepwell.repository.tree import BLOCKDEV, CHARDEV, DIR, FIFO, FILE, SOCKET, SYMLINK, Node
from keepwell.sources.files import fileio, metadata, targetdir
from keepwell.sources.files.select import Matcher
from keepwell.sources.files.workers import Workers, can_reopen, repository_init, worker_count

if TYPE_CHECKING:
    from keepwell.sources.files.verify import VerifyResult

_MAX_RANGE = 8 * 1024 * 1024  # one ranged read of nearby blobs, in a worker process
# the same in this process, whose threads each hold a range and its blobs at once (files of
# several blobs are large: their blobs are rarely near each other's anyway)
_MAX_RANGE_HERE = 2 * 1024 * 1024
BATCH_FILES = 4096  # files planned (and their blob locations held) at a time
WRITERS_AFTER = 256  # files of one blob in the first batch before worker processes start
_UNIT_FILES = 256  # files of one blob per request to a worker

# one file of one blob for a worker: its directory (relative to the target), name, mode,
# mtime_ns, uid, gid, xattrs
_Dest = tuple[str, str, int, int, int, int, metadata.Xattrs | None]
# a blob for a worker: offset, stored length, raw length, id, type, files it fills
_Unit = tuple[int, int, int, bytes, int, list[_Dest]]


@dataclass
class RestoreResult:
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    processes: int = 0  # worker processes that wrote files of one blob
    metadata: metadata.MetadataReport = field(
        default_factory=lambda: metadata.MetadataReport(os.geteuid() == 0))
    verified: VerifyResult | None = None  # what reading the files back found (--verify)


@dataclass(slots=True)
class _Target:
    path: str  # for messages
    dir: str  # its directory, relative to the target
    name: str
    node: Node
    remaining: int
    created: bool = False
    temp: str | None = None  # the name it is written under until whole: something had its name
    ino: int = 0  # the file created (a file of several blobs), checked whenever it is reopened
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(slots=True)
class _Want:
    offset: int
    length: int
    raw_length: int
    blob_id: bytes
    type: int
    dests: list[tuple[_Target, int]]


def _is_zero(data: bytes) -> bool:
    # the ends first: almost every blob fails there, without a pass over all of it
    return bool(data) and data[0] == 0 and data[-1] == 0 and data.count(0) == len(data)


class Restorer:
    def __init__(self, repo: Repository, snap: Snapshot, target: str, *, includes: Matcher,
                 excludes: Matcher, workers: int, processes: int = 0, overwrite: bool = False) -> None:
        self.repo = repo
        self.processes = processes if can_reopen(repo) else 0
        self._writers: Workers | None = None
        self.snap = snap
        self.target = target
        self.includes = includes
        self.excludes = excludes
        self.workers = workers
        self.overwrite = overwrite
        self.result = RestoreResult()
        self._lock = threading.Lock()
        self._is_root = os.geteuid() == 0
        self._dirs: list[tuple[str, Node]] = []  # rel, node
        self._made_dirs: set[str] = set()
        self._links: dict[tuple[int, int], tuple[str, str]] = {}  # the first path of an inode
        self._deferred_links: list[tuple[tuple[str, str], tuple[str, str], str]] = []
        # the owner a file created here has without a chown; unknown (so every file is chowned)
        # when restoring over existing files, or into a set-group-id directory (it passes its
        # group on)
        fresh = os.path.isdir(target) and not os.listdir(target)
        setgid = fresh and os.stat(target).st_mode & stat.S_ISGID
        self._creator = (os.geteuid(), os.getegid()) if fresh and not setgid else None
        self._fds = targetdir.TargetDirs(target, replace=overwrite)
        self._policy = metadata.Policy(self._is_root, self._creator, (os.geteuid(), os.getegid()))

    # -- metadata -----------------------------------------------------------------------------
    def _apply(self, dir_fd: int, name: str, path: str, node: Node) -> None:
        """Owner, mode, times and xattrs of a link, FIFO or device node, by its name in its
        directory (a link is never followed; a link has no mode of its own)."""
        try:
            self.result.metadata.add(metadata.apply(
                self._policy, node.type, node.mode, node.uid, node.gid, node.mtime_ns,
                node.xattrs, dir_fd=dir_fd, name=name))
        except OSError as exc:
            self._error(path, f"cannot set metadata: {exc.strerror}")
        except (ValueError, NotImplementedError):  # it was replaced by a link meanwhile
            self._error(path, "cannot set metadata: it was replaced during the restore")

    def _error(self, path: str, msg: str) -> None:
        with self._lock:
            self.result.errors.append((path, msg))
        self.repo.events.emit("error", path=path, message=msg)

    def _ensure_dir(self, rel: str) -> None:
        """The directory ``rel`` and those above it exist (made where missing)."""
        if rel not in self._made_dirs:
            self._fds.acquire(rel, create=True)
            self._fds.release(rel)
            self._made_dirs.add(rel)

    def _apply_open(self, fd: int, path: str, node: Node) -> None:
        """`_apply` for a file or directory this restore holds open."""
        try:
            self.result.metadata.add(metadata.apply(
                self._policy, node.type, node.mode, node.uid, node.gid, node.mtime_ns,
                node.xattrs, fd=fd))
        except OSError as exc:
            self._error(path, f"cannot set metadata: {exc.strerror}")

    # -- planning -----------------------------------------------------------------------------
    def _selected(self, spath: str, node: Node | None) -> bool:
        return selected(self.includes, self.excludes, spath)

    def plan(self) -> Iterator[dict[tuple[bytes, int], list[_Want]]]:
        """Walk the snapshot, make directories, links and empty files, and yield the blobs to
        fetch, grouped by pack, for one batch of files at a time (so memory stays flat)."""
        unplaced: list[_Target] = []
        total_files = total_bytes = planned = 0
        s = self.snap.summary
        if not self.includes and not self.excludes and "bytes_processed" in s:
            self.repo.events.emit("total", bytes=s["bytes_processed"], final=True, files=sum(
                s.get(k, 0) for k in ("files_new", "files_changed", "files_unmodified")))
        for rel, node in self.repo.walk(self.snap, checked=True):
            spath = "/" + rel
            dest = os.path.join(self.target, rel)
            parent, _, name = rel.rpartition("/")
            if node.type == DIR:
                if self._selected(spath, node) or (self.includes and not self.excludes.matches_within(spath)):
                    self._dirs.append((rel, node))
                    if self._selected(spath, node):
                        try:
                            self._ensure_dir(rel)
                        except OSError as exc:
                            self._error(dest, exc.strerror or str(exc))
                continue
            if not self._selected(spath, node):
                continue
            try:
                self._ensure_dir(parent)
                if node.type == FILE:
                    total_files += 1
                    total_bytes += node.size
                    planned += 1
                    self._plan_file(parent, name, dest, node, unplaced)
                    if planned >= BATCH_FILES:
                        yield self._place(unplaced)
                        unplaced, planned = [], 0
                elif node.type in (SYMLINK, FIFO, CHARDEV, BLOCKDEV):
                    self._make_special(parent, name, dest, node)
                elif node.type == SOCKET:  # older versions stored them: nothing can restore one
                    self.result.metadata.count("sockets")
            except OSError as exc:
                self._error(dest, exc.strerror or str(exc))
        self.repo.events.emit("total", files=total_files, bytes=total_bytes, final=True)
        yield self._place(unplaced)

    def _make_special(self, parent: str, name: str, dest: str, node: Node) -> None:
        """A symbolic link (made as it was saved, wherever it points: restore never follows
        it), a FIFO or a device node."""
        dir_fd = self._fds.acquire(parent)
        try:
            if node.type == SYMLINK:
                target = node.target or ""
                targetdir.make_node(dir_fd, name, self.overwrite,
                                    lambda n: os.symlink(target, n, dir_fd=dir_fd))
            elif node.type == FIFO:
                targetdir.make_node(dir_fd, name, self.overwrite,
                                    lambda n: os.mkfifo(n, node.mode & 0o7777, dir_fd=dir_fd))
            else:
                kind = stat.S_IFCHR if node.type == CHARDEV else stat.S_IFBLK
                try:
                    targetdir.make_node(dir_fd, name, self.overwrite, lambda n: os.mknod(
                        n, (node.mode & 0o7777) | kind, node.rdev, dir_fd=dir_fd))
                except PermissionError:  # making device nodes needs privilege
                    self.result.metadata.count("devices")
                    return
            self._apply(dir_fd, name, dest, node)
        finally:
            self._fds.release(parent)

    def _plan_file(self, parent: str, name: str, dest: str, node: Node, unplaced: list[_Target]) -> None:
        if node.nlink > 1:
            key = (node.dev, node.inode)
            first = self._links.get(key)
            if first is not None:
                self._deferred_links.append((first, (parent, name), dest))
                return
            self._links[key] = (parent, name)
        with self._lock:
            self.result.files += 1
        target = _Target(dest, parent, name, node, len(node.content))
        if len(node.content) == 1:
            unplaced.append(target)  # created when its blob is written
            return
        dir_fd = self._fds.acquire(parent)
        try:
            # a file of several blobs is written under a temporary name and renamed once whole:
            # one that cannot be restored whole is never left half written under its name
            fd, temp = targetdir.new_file(dir_fd, name, self.overwrite,
                                          staged=len(node.content) > 1)
            try:
                if not node.content:
                    self._apply_open(fd, dest, node)
                else:
                    os.ftruncate(fd, node.size)
                    target.ino = os.fstat(fd).st_ino
            except BaseException:
                if temp is not None:
                    targetdir.discard(dir_fd, temp)
                raise
            finally:
                os.close(fd)
            if not node.content:
                if temp is not None:
                    targetdir.put_in_place(dir_fd, name, temp, self.overwrite)
                return
        finally:
            self._fds.release(parent)
        target.created, target.temp = True, temp
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
                    self._drop_temp(target)
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
            dir_fd = self._fds.acquire(target.dir)
            try:
                if target.created:
                    fd = fileio.open_write(dir_fd, target.temp or target.name, False)
                    if os.fstat(fd).st_ino != target.ino:
                        fileio.close(fd)
                        raise OSError(errno.EEXIST, "it was replaced during the restore")
                else:
                    fd, target.temp = targetdir.new_file(dir_fd, target.name, self.overwrite,
                                                         staged=True)
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
                if done and target.temp is not None:
                    targetdir.put_in_place(dir_fd, target.name, target.temp, self.overwrite)
                    target.temp = None
            finally:
                self._fds.release(target.dir)
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
            init = {**repository_init(self.repo), "target": self.target, "replace": self.overwrite,
                    "policy": self._policy}
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
                mine = [(t.dir, t.name, t.node.mode, t.node.mtime_ns, t.node.uid, t.node.gid,
                         t.node.xattrs) for t, _ in w.dests if len(t.node.content) == 1]
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

    def _send_unit(self, writers: Workers, name: str, units: list[_Unit]) -> None:
        writers.send(writers.least_busy(), (name, units), self._written)

    def _written(self, results: list[tuple[str, int, str | None, int]]) -> None:
        """A worker's answer: each file's path, bytes written, error, metadata not restored
        (`metadata.apply`'s bits)."""
        for path, n, err, missed in results:
            if err is not None:
                self._error(path, err)
                if n == 0:  # not written: not restored (its metadata alone failed otherwise)
                    with self._lock:
                        self.result.files -= 1
                continue
            self.result.metadata.add(missed)
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
                    self._drop_temp(target)

    def _drop_temp(self, target: _Target) -> None:
        """A file that cannot be restored whole: it is not counted as restored, and what had
        its name stays as it was."""
        with self._lock:
            self.result.files -= 1
        if target.temp is not None:
            try:
                targetdir.discard(self._fds.acquire(target.dir), target.temp)
                self._fds.release(target.dir)
            except OSError:
                pass
            target.temp = None

    def _fetch_pack(self, pack: bytes, pack_type: int, wants: list[_Want]) -> None:
        name = pack_object_name(pack_type, pack.hex())
        sender = self.repo.sender_of(pack)
        def open_one(w: _Want, stored: memoryview) -> bytes:
            return self.repo.open_blob(w.blob_id, w.type, stored, w.raw_length, sender)

        for r in ranges(wants, _want_span, max_range=_MAX_RANGE_HERE):
            for w, plain in open_range(self.repo.backend, name, r, _want_span, open_one):
                if isinstance(plain, KeepwellError):
                    self._fail_dests(w, _unreadable(name, plain))
                    continue
                for target, offset in w.dests:
                    try:
                        self._write(target, offset, plain)
                    except OSError as exc:
                        self._fail_dests(w, exc.strerror or str(exc))

    def run(self) -> RestoreResult:
        try:
            self._restore()
            self._finish()
        finally:
            self._fds.close()
        return self.result

    def _restore(self) -> None:
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

    def _finish(self) -> None:
        """Hard links to the files restored, then the directories' metadata, deepest first."""
        fds = self._fds
        for first, (parent, name), dest in self._deferred_links:
            try:
                self._link(first, parent, name)
            except OSError as exc:
                self._error(dest, f"cannot create hard link: {exc.strerror}")
        for rel, node in reversed(self._dirs):
            try:
                fd = fds.acquire(rel)
            except OSError:
                continue  # not restored (an error said why), or not selected
            try:
                self._apply_open(fd, os.path.join(self.target, rel), node)
            finally:
                fds.release(rel)
            self.result.dirs += 1


    def _link(self, first: tuple[str, str], parent: str, name: str) -> None:
        first_dir, first_name = first
        src_fd = self._fds.acquire(first_dir)
        try:
            dst_fd = self._fds.acquire(parent)
            try:
                targetdir.make_node(dst_fd, name, self.overwrite, lambda n: os.link(
                    first_name, n, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False))
            finally:
                self._fds.release(parent)
        finally:
            self._fds.release(first_dir)


def _checked_target(target: str, overwrite: bool) -> str:
    """The target's absolute path, once it is known to be a directory (or nothing yet) that a
    restore may write into."""
    if not target:  # an empty or unset variable: never the current directory
        raise UsageError("an empty restore target names no directory",
                         hint="give the directory to restore into; '.' is the current directory")
    target = os.path.abspath(target)
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise RestoreTargetError(f"restore target {target} exists and is not a directory",
                                     hint="choose a directory, or a path where one can be made")
        if os.listdir(target) and not overwrite:
            raise RestoreTargetError(f"restore target {target} is not empty")
    return target


def restore_snapshot(repo: Repository, snap: Snapshot, target: str, *,
                     includes: list[str] | tuple[str, ...] | Matcher = (),
                     excludes: list[str] | tuple[str, ...] | Matcher = (), overwrite: bool = False,
                     workers: int = 4, verify: bool = False) -> RestoreResult:
    """Restore ``snap`` under ``target`` (made if missing; it must be empty unless ``overwrite``).
    The target is used as named, even if it is a symbolic link; nothing under it is reached
    through a link, and nothing outside it is written (see the module's docstring).
    ``verify``: then read every restored file back and compare it with the snapshot
    (`RestoreResult.verified`, keepwell.sources.files.verify)."""
    target = _checked_target(target, overwrite)
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as exc:
        raise RestoreTargetError(f"restore target {target} cannot be made: "
                                 f"{exc.strerror or exc}",
                                 hint="choose a directory, or a path where one can be made") from None
    with fewer_collections():
        # a Matcher given by the caller records which of its patterns matched something
        restorer = Restorer(repo, snap, target, includes=_matcher(includes),
                            excludes=_matcher(excludes), workers=workers,
                            processes=worker_count("KEEPWELL_FILE_PROCESSES"), overwrite=overwrite)
        result = restorer.run()
        if verify:
            from keepwell.sources.files.verify import verify_restored

            result.verified = verify_restored(
                repo, snap, target, selected=partial(selected, restorer.includes, restorer.excludes),
                skip={path for path, _ in result.errors})
        return result


def selected(includes: Matcher, excludes: Matcher, spath: str) -> bool:
    """Whether a restore with these patterns restores the snapshot's path ``spath``."""
    if excludes and excludes.matches_within(spath):
        return False
    return not (includes and not includes.matches_within(spath))


@dataclass
class RestorePlan:
    """What a restore would write (``restore --dry-run``)."""

    files: int = 0
    dirs: int = 0
    bytes: int = 0
    links: int = 0  # symbolic links
    other: int = 0  # FIFOs and device nodes


def plan_restore(repo: Repository, snap: Snapshot, target: str, *,
                 includes: list[str] | tuple[str, ...] | Matcher = (),
                 excludes: list[str] | tuple[str, ...] | Matcher = (),
                 overwrite: bool = False) -> RestorePlan:
    """What `restore_snapshot` would write under ``target``, and nothing written: the target is
    checked as a restore checks it, the snapshot's trees are read (and their names checked)."""
    _checked_target(target, overwrite)
    inc, exc = _matcher(includes), _matcher(excludes)
    plan = RestorePlan()
    dirs: set[str] = set()  # made: the selected ones, and those above anything selected
    for rel, node in repo.walk(snap, checked=True):
        if not selected(inc, exc, "/" + rel):
            continue
        up = rel if node.type == DIR else rel.rpartition("/")[0]
        while up and up not in dirs:
            dirs.add(up)
            up = up.rpartition("/")[0]
        if node.type == FILE:
            plan.files += 1
            plan.bytes += node.size
        elif node.type == SYMLINK:
            plan.links += 1
        elif node.type in (FIFO, CHARDEV, BLOCKDEV):
            plan.other += 1
    plan.dirs = len(dirs)
    return plan


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
        self.repo.senders.update(init.get("senders", {}))  # its index is empty
        self._root: str = init["target"]
        self._replace: bool = init["replace"]
        self._fds = targetdir.TargetDirs(self._root, replace=self._replace)
        self.policy: metadata.Policy = init["policy"]
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="kw-fetch")
        self._fetched: dict[int, list[tuple[Range[_Unit], Future[memoryview]]]] = {}

    def prefetch(self, request: tuple[str, list[_Unit]]) -> None:
        name, units = request
        if id(units) not in self._fetched:
            self._fetched[id(units)] = [(r, self._pool.submit(read_range, self.repo.backend, name, r))
                                        for r in ranges(units, _unit_span, max_range=_MAX_RANGE)]

    def handle(self, request: tuple[str, list[_Unit]]) -> list[tuple[str, int, str | None, int]]:
        name, units = request
        self.prefetch(request)
        sender = self.repo.senders.get(bytes.fromhex(name.rsplit("/", 1)[1]))
        out: list[tuple[str, int, str | None, int]] = []

        def open_one(u: _Unit, stored: memoryview) -> bytes:
            return self.repo.open_blob(u[3], u[4], stored, u[2], sender)

        for r, fetch in self._fetched.pop(id(units)):
            for unit, plain in open_range(self.repo.backend, name, r, _unit_span, open_one,
                                          first=fetch.result):
                if isinstance(plain, KeepwellError):
                    out += [(self._path(d), 0, _unreadable(name, plain), 0) for d in unit[5]]
                    continue
                for dest in unit[5]:
                    out.append(self._write_whole(dest, plain))
        return out

    def _path(self, dest: _Dest) -> str:
        return os.path.join(self._root, dest[0], dest[1])

    def _write_whole(self, dest: _Dest, data: bytes) -> tuple[str, int, str | None, int]:
        """Write one file of one blob as a new file (renamed over what had its name, if
        anything did), with its metadata: (its path, bytes written, error, metadata not
        restored: `metadata.apply`'s bits)."""
        rel, name, mode, mtime_ns, uid, gid, xattrs = dest
        try:
            dir_fd = self._fds.acquire(rel)
        except OSError as exc:
            return self._path(dest), 0, exc.strerror or str(exc), 0
        try:
            fd, temp = targetdir.new_file(dir_fd, name, self._replace)
        except OSError as exc:
            self._fds.release(rel)
            return self._path(dest), 0, exc.strerror or str(exc), 0
        try:
            missed = 0
            try:
                if _is_zero(data) and len(data) >= 4096:
                    os.ftruncate(fd, len(data))  # a hole
                else:
                    fileio.pwrite_all(fd, data, 0)
                problem = None
                try:
                    missed = metadata.apply(self.policy, FILE, mode, uid, gid, mtime_ns, xattrs,
                                            fd=fd)
                except OSError as exc:
                    problem = f"cannot set metadata: {exc.strerror}"
            finally:
                fileio.close(fd)
            if temp is not None:
                targetdir.put_in_place(dir_fd, name, temp)
            return self._path(dest), len(data), problem, missed
        except OSError as exc:  # never left half written: made here, so removed here
            targetdir.discard(dir_fd, temp if temp is not None else name)
            return self._path(dest), 0, exc.strerror or str(exc), 0
        finally:
            self._fds.release(rel)

    def finish(self) -> dict[str, Any]:
        self._pool.shutdown(wait=True)
        self._fds.close()
        return {}



def _unreadable(name: str, exc: KeepwellError) -> str:
    """Why a blob of pack ``name`` was not restored: damage says what is damaged (a blob that
    fails its check, a pack shorter than its index says); a pack that cannot be read is named."""
    return str(exc) if isinstance(exc, IntegrityError) else f"cannot read {name}: {exc}"


def _want_span(w: _Want) -> tuple[int, int]:
    return w.offset, w.length


def _unit_span(u: _Unit) -> tuple[int, int]:
    return u[0], u[1]
