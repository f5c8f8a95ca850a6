"""Writing a data directory from stored tar streams, optionally as a delta.

`extract_tar` unpacks one tar stream under a root directory and never writes outside it. The
member names come from a snapshot that any host writing to the repository could have forged, and
the root may already hold links (a ``--delta`` restore): a member whose name is absolute or has a
``..`` component, or that lies behind a symbolic link the stream itself created, is refused; every
directory is reached one component at a time without following a link
(`keepwell.sources.files.targetdir.TargetDirs`), and a link or file found where the stream has a
directory (``pg_wal`` linked to another disk, say) is removed, the link itself, never followed, and
a directory made in its place. The stream's own symbolic links (``pg_tblspc/<oid>``) are made as
links and never written through. A file is written in place only when it is a plain file of the
target with no other name (a delta); else a new file is made and renamed over what was there, so a
hard link to a file elsewhere is never written through. In *delta* mode it compares each file
with what is already on disk block by block and writes only from the first differing block on,
and it lists what the stream did not contain so that stale files can be removed afterwards.

Each file is handed to a pool of fsync threads as soon as it is written, so the disk writes it
back while the next files are decoded (the filesystem groups the journal commits of fsyncs in
flight together). A large file (a 1 GiB relation segment) would otherwise sit dirty in the page
cache until its fsync: the kernel starts writing back on its own only past a share of memory, so
its write-out is started every `KICK` bytes as it is written (``sync_file_range``, as PostgreSQL
flushes its own writes), and its fsync finds little left to do. `make_durable` then fsyncs the directories and anything not yet synced. Not ``syncfs``: it flushes whatever else is dirty on the filesystem too, so a
restore on a busy host (a running database, another restore) would wait for all of that:
measured with 800 MB written by another process, a 755 MB restore took 2.6 s with syncfs and
2.5 s with fsyncs; with nothing else dirty, 1.9 s and 1.7 s.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from keepwell.errors import IntegrityError, RestoreTargetError
from keepwell.sources.files.targetdir import TargetDirs, discard, make_node, new_file

BLOCK = 1024 * 1024
SMALL = 8 * 1024 * 1024  # files up to this size are written by the writer threads
WRITERS = 4
IN_FLIGHT = 256 * 1024 * 1024
KICK = 16 * 1024 * 1024  # a large file's write-out is started every this many bytes written


@dataclass
class ExtractStats:
    files: int = 0
    bytes: int = 0
    written_files: int = 0
    written_bytes: int = 0
    removed: int = 0
    seen: set[str] = field(default_factory=set)
    synced: set[str] = field(default_factory=set)  # files already fsynced
    links: set[str] = field(default_factory=set)  # symbolic links the streams created


def member_rel(name: str) -> str:
    """A member's place under the root, its names joined by ``/`` (``""``: the root itself);
    a `RestoreTargetError` for a name that is absolute or has an empty, ``.`` or ``..``
    component (a leading ``./`` and a directory's trailing ``/`` are how tar writes names)."""
    rel = name
    while rel.startswith("./"):
        rel = rel[2:]
    rel = rel.rstrip("/") if rel not in ("", "/") else rel
    if rel in ("", "."):
        return ""
    parts = rel.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise RestoreTargetError(f"refusing tar member {name!r}: an absolute name or one with a"
                                 " '..' or empty component would write outside the target")
    return rel


class _Syncer:
    """fsyncs written files on many threads while the extraction goes on."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(SYNCERS, thread_name_prefix="kw-pg-sync")
        self.futures: list[Future[None]] = []
        self.paths: list[str] = []

    def add(self, path: str) -> None:
        self.futures.append(self.pool.submit(_fsync_path, path, False))
        self.paths.append(path)

    def close(self, into: set[str]) -> None:
        try:
            for f in self.futures:
                f.result()
            into.update(self.paths)
        finally:
            self.pool.shutdown(wait=True)


class _Writers:
    """Writes small files on a few threads: creating files costs a syscall round trip each,
    and a data directory has thousands. In-flight bytes are bounded."""

    def __init__(self, dirs: TargetDirs, syncer: _Syncer | None = None) -> None:
        self.pool = ThreadPoolExecutor(WRITERS, thread_name_prefix="kw-pg-write")
        self.budget = threading.BoundedSemaphore(IN_FLIGHT // BLOCK)
        self.futures: list[Future[None]] = []
        self.dirs = dirs
        self.syncer = syncer

    def submit(self, parent: str, name: str, data: bytes | memoryview, mode: int,
               mtime: float) -> None:
        """Write the file ``name`` of the directory ``parent`` (a rel of `dirs`)."""
        units = max(1, len(data) // BLOCK)
        for _ in range(units):
            self.budget.acquire()
        self.futures.append(self.pool.submit(self._write, parent, name, data, mode, mtime,
                                             units))
        if len(self.futures) > 512:
            self._collect(done_only=True)

    def _write(self, parent: str, name: str, data: bytes | memoryview, mode: int, mtime: float,
               units: int) -> None:
        try:
            dir_fd = self.dirs.acquire(parent)
            try:
                fd, temp = new_file(dir_fd, name, True)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fchmod(fd, mode)
                    os.utime(fd, (mtime, mtime))
                finally:
                    os.close(fd)
                if temp is not None:
                    _put_in_place(dir_fd, name, temp)
            finally:
                self.dirs.release(parent)
            if self.syncer is not None:
                self.syncer.add(_path(self.dirs.root, parent, name))
        finally:
            for _ in range(units):
                self.budget.release()

    def _collect(self, done_only: bool = False) -> None:
        keep = []
        for f in self.futures:
            if done_only and not f.done():
                keep.append(f)
            else:
                f.result()
        self.futures = keep

    def close(self) -> None:
        try:
            self._collect()
        finally:
            self.pool.shutdown(wait=True)


class _Stream:
    """The bytes of a tar stream as they arrive, handed out as slices of the arriving blocks
    (a member's data is never joined or copied on its way to the file)."""

    def __init__(self, blocks: Iterable[bytes]) -> None:
        self._blocks = iter(blocks)
        self._view = memoryview(b"")

    def take(self, n: int) -> Iterator[memoryview]:
        """The next `n` bytes, in pieces; the caller consumes them before taking more."""
        while n:
            if not self._view:
                nxt = next(self._blocks, None)
                if nxt is None:
                    raise IntegrityError("the stored tar stream ends inside a member")
                self._view = memoryview(nxt).cast("B")
            piece = self._view[:n]
            self._view = self._view[len(piece):]
            n -= len(piece)
            yield piece

    def read(self, n: int) -> bytes:
        return b"".join(self.take(n))

    def at_end(self) -> bool:
        while not self._view:
            nxt = next(self._blocks, None)
            if nxt is None:
                return True
            self._view = memoryview(nxt).cast("B")
        return False


def _pax_records(data: bytes) -> dict[str, str]:
    """``"LEN key=value\n"`` records of a POSIX extended header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def tar_members(blocks: Iterable[bytes]) -> Iterator[tuple[tarfile.TarInfo, Iterator[memoryview]]]:
    """Members of a tar stream with their data as pieces of the stream's own blocks. GNU long
    names and POSIX extended headers are applied to the member they describe; whatever of a
    member's data the caller leaves unread is skipped."""
    stream = _Stream(blocks)
    long_name = long_link = None
    pax: dict[str, str] = {}
    while not stream.at_end():
        head = stream.read(512)
        if head.count(0) == 512:
            return  # end-of-archive
        try:
            info = tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise IntegrityError(f"the stored tar stream has a bad header: {exc}") from None
        padded = info.size + (-info.size % 512)
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            text = stream.read(padded)[: info.size].split(b"\0", 1)[0]
            value = text.decode("utf-8", "surrogateescape")
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = value
            else:
                long_link = value
            continue
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
            records = _pax_records(stream.read(padded)[: info.size])
            if info.type != tarfile.XGLTYPE:
                pax = records
            continue
        if long_name is not None:
            info.name = long_name
        if long_link is not None:
            info.linkname = long_link
        if "path" in pax:
            info.name = pax["path"]
        if "linkpath" in pax:
            info.linkname = pax["linkpath"]
        if "size" in pax:
            info.size = int(pax["size"])
            padded = info.size + (-info.size % 512)
        long_name = long_link = None
        pax = {}
        size = info.size if info.isfile() else 0
        data = stream.take(size)
        yield info, data
        for _ in data:  # what the caller did not read
            pass
        for _ in stream.take(padded - size if info.isfile() else padded):
            pass


def extract_tar(blocks: Iterable[bytes], root: str, *, delta: bool,
                stats: ExtractStats | None = None) -> ExtractStats:
    """Unpack a tar stream (its bytes in blocks) under `root` (not yet durable: see
    `make_durable`); `root` itself is opened as named, link or not."""
    stats = stats or ExtractStats()
    root = os.path.abspath(root)
    os.makedirs(root, 0o700, exist_ok=True)
    dirs = TargetDirs(root, replace=True)
    try:
        syncer = _Syncer()
        try:
            writers = _Writers(dirs, syncer)
            links: set[str] = set()  # rels of the links this stream made
            try:
                for member, data in tar_members(blocks):
                    _extract_member(member, data, dirs, delta, stats, writers, links)
            finally:
                writers.close()
        finally:
            syncer.close(stats.synced)
    finally:
        dirs.close()
    return stats


def _path(root: str, parent: str, name: str) -> str:
    return os.path.join(root, parent, name) if parent else os.path.join(root, name)


def _behind_link(member: tarfile.TarInfo, rel: str, links: set[str]) -> None:
    """Refuse a member at or behind a symbolic link the same stream made (a link is only ever
    replaced by another link)."""
    p = rel if member.isdir() else rel.rpartition("/")[0]
    while p:
        if p in links:
            raise RestoreTargetError(f"refusing tar member {member.name!r}: it would be written"
                                     f" through the symbolic link {p} of the same backup")
        p = p.rpartition("/")[0]


def _extract_member(member: tarfile.TarInfo, data: Iterator[memoryview], dirs: TargetDirs,
                    delta: bool, stats: ExtractStats, writers: _Writers, links: set[str]) -> None:
    rel = member_rel(member.name)
    if not rel:
        if member.isdir():
            return  # the root: made by the restore
        raise RestoreTargetError(f"refusing tar member {member.name!r}: not a directory, yet"
                                 " it names the target itself")
    path = os.path.join(dirs.root, rel)
    if member.isdir() or member.issym() or member.isfile():
        _behind_link(member, rel, links)
    stats.seen.add(path)
    if member.isdir():
        fd = dirs.acquire(rel, create=True)
        try:
            os.fchmod(fd, member.mode & 0o7777 or 0o700)
        finally:
            dirs.release(rel)
        return
    parent, _, name = rel.rpartition("/")
    if not (member.issym() or member.isfile()):
        return
    dir_fd = dirs.acquire(parent, create=True)
    try:
        if member.issym():
            _make_link(dir_fd, name, member.linkname)
            links.add(rel)
            stats.links.add(path)
            return
        stats.files += 1
        stats.bytes += member.size
        mode = member.mode & 0o7777 or 0o600
        if not delta and member.size <= SMALL:
            pieces = list(data)
            if len(pieces) == 1 and len(pieces[0]) * 2 >= len(pieces[0].obj):  # type: ignore[arg-type]
                body: bytes | memoryview = pieces[0]  # most of a stored block: written from it
            else:  # copied, so a queued small file never holds on to a whole block
                body = b"".join(pieces)
            writers.submit(parent, name, body, mode, float(member.mtime))
            stats.written_files += 1
            stats.written_bytes += member.size
            return
        written = _write_file(data, dir_fd, name, member.size, delta, mode, member.mtime)
    finally:
        dirs.release(parent)
    if written:
        stats.written_files += 1
        stats.written_bytes += written
        if writers.syncer is not None:
            writers.syncer.add(path)


def _write_all(fd: int, piece: memoryview) -> None:
    while piece:
        piece = piece[os.write(fd, piece):]


def _put_in_place(dir_fd: int, name: str, temp: str) -> None:
    """Rename ``temp`` over ``name``; a directory there (a delta restore where the backup has a
    file) is removed first."""
    try:
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    except OSError as exc:
        if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
            discard(dir_fd, temp)
            raise
    try:
        shutil.rmtree(name, dir_fd=dir_fd)
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        discard(dir_fd, temp)
        raise


def _make_link(dir_fd: int, name: str, target: str) -> None:
    """The stream's symbolic link ``name`` -> ``target``: one already there stays, anything
    else with that name is replaced (a directory removed first)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=dir_fd) == target:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
    make_node(dir_fd, name, True, lambda n: os.symlink(target, n, dir_fd=dir_fd))


def _open_in_place(dir_fd: int, name: str) -> int | None:
    """The file ``name`` opened for a delta, when it is a plain file with no other name (never a
    link, never a hard link to a file that may lie outside the target); else None."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                     dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES):
            return None
        raise
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        return fd
    os.close(fd)
    return None


def _write_file(data: Iterator[memoryview], dir_fd: int, name: str, size: int, delta: bool,
                mode: int, mtime: float) -> int:
    """Write a member's `size` bytes to ``name`` in ``dir_fd`` and set its mode and time; in
    delta mode only from the first difference with the file already there."""
    fd = _open_in_place(dir_fd, name) if delta else None
    if fd is not None:
        try:
            offset = written = 0
            differs = False
            for piece in data:
                if not differs:
                    if os.pread(fd, len(piece), offset) == piece:
                        offset += len(piece)
                        continue
                    differs = True
                os.lseek(fd, offset, os.SEEK_SET)
                _write_all(fd, piece)
                offset += len(piece)
                written += len(piece)
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
                written = written or 1
            os.fchmod(fd, mode)
            os.utime(fd, (mtime, mtime))
            return written
        finally:
            os.close(fd)
    written = kicked = 0
    fd, temp = new_file(dir_fd, name, True)
    try:
        for piece in data:
            _write_all(fd, piece)
            written += len(piece)
            if written - kicked >= KICK:
                start_writeback(fd, kicked, written - kicked)
                kicked = written
        os.fchmod(fd, mode)
        os.utime(fd, (mtime, mtime))
    except BaseException:
        os.close(fd)
        if temp is not None:
            discard(dir_fd, temp)
        raise
    os.close(fd)
    if temp is not None:
        _put_in_place(dir_fd, name, temp)
    return written


def _bind_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_sync_file_range = _bind_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start write-out of dirty pages, do not wait


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing a range of a file to disk, without waiting for it (a hint:
    durability still comes from fsync). False where the kernel cannot be asked."""
    return _sync_file_range is not None and _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0


def own_file(path: str) -> str:
    """`path`, made safe to write: a symbolic link there (restored or left by anyone), or a file
    with another name (a hard link), is removed first, so keepwell's own files in a data
    directory never write through one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if stat.S_ISLNK(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink > 1):
        os.unlink(path)
    return path


def remove_unlisted(root: str, seen: set[str], keep: frozenset[str] | set[str] = frozenset()
                    ) -> int:
    """Delete files under `root` that the restored streams did not contain (delta mode)."""
    removed = 0
    root = os.path.abspath(root)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if path not in seen and rel not in keep:
                os.unlink(path)
                removed += 1
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) and path not in seen:
                os.unlink(path)
                removed += 1
            elif path not in seen and not os.listdir(path):
                os.rmdir(path)
                removed += 1
    return removed


SYNCERS = 16  # fsyncs in flight at once: the filesystem commits them together


def sync_tree(root: str, files: bool = False, skip: set[str] | frozenset[str] = frozenset()) -> None:
    """fsync the directories under `root`, and every file too if asked (but those in `skip`)."""
    paths: list[tuple[str, bool]] = []
    for dirpath, _dirs, names in os.walk(root):
        paths.append((dirpath, True))
        if files:
            paths.extend((p, False) for p in (os.path.join(dirpath, n) for n in names) if p not in skip)
    with ThreadPoolExecutor(SYNCERS, thread_name_prefix="kw-pg-sync") as pool:
        for _ in pool.map(lambda p: _fsync_path(*p), paths):
            pass


def _fsync_path(path: str, is_dir: bool) -> None:
    if not is_dir and os.path.islink(path):
        return
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if is_dir else os.O_NOFOLLOW))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_durable(roots: list[str], synced: set[str] | frozenset[str] = frozenset()) -> None:
    """Flush every file and directory under `roots` to stable storage (files in `synced` were
    fsynced already, after their last write)."""
    for root in roots:
        sync_tree(root, files=True, skip=synced)
