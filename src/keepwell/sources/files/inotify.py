"""The kernel's change notifications for directory trees (Linux inotify), through ctypes.

Words:
    watch       one inotify watch: a directory whose entries' changes the kernel reports, named
                by a watch descriptor (``wd``)
    event       what `Inotify.read` returns: the watch's directory, the entry's name (empty for
                the directory itself) and the kernel's mask
    overflow    the kernel dropped events (``IN_Q_OVERFLOW``, past ``max_queued_events``): whoever
                reads must rescan, since which changes were lost is unknown
    remote      a filesystem whose other clients' writes produce no inotify events here (NFS, SMB,
                Ceph, 9p, FUSE...), recognised by the ``f_type`` of statfs(2)

One read takes at most `_BUFFER` bytes of events, so memory stays bounded however fast the tree
changes; what the kernel cannot queue is reported as an overflow, never silently lost.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
from dataclasses import dataclass

IN_ACCESS = 0x001
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# what changes a snapshot: contents, entries, metadata (IN_MODIFY too, so a file held open and
# written to for a long time is seen before it is closed)
TREE_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
             | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW
             | IN_EXCL_UNLINK)

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)
_BUFFER = 256 * 1024  # room for at least 4,000 events per read

MAX_WATCHES_FILE = "/proc/sys/fs/inotify/max_user_watches"

# statfs(2) f_type of filesystems whose changes made elsewhere raise no event here
REMOTE_TYPES = {
    0x6969: "nfs", 0x517B: "smb", 0xFF534D42: "cifs", 0xFE534D42: "smb2", 0x00C36400: "ceph",
    0x01021997: "9p", 0x65735546: "fuse", 0x73757245: "coda", 0x5346414F: "afs",
    0x01161970: "gfs2", 0x7461636F: "ocfs2", 0x0BD00BD0: "lustre", 0x47504653: "gpfs",
    0x013111A8: "ibrix", 0x564C: "ncp", 0x6B414653: "afs",
}


class WatchLimitError(OSError):
    """inotify_add_watch failed with ENOSPC: the user's watch limit is reached."""


@dataclass(frozen=True, slots=True)
class Event:
    directory: str  # the watched directory's path ("" for an overflow)
    name: str  # the entry's name; "" for the directory itself
    mask: int

    @property
    def path(self) -> str:
        return f"{self.directory}/{self.name}" if self.name else self.directory

    @property
    def is_dir(self) -> bool:
        return bool(self.mask & IN_ISDIR)


def read_ready(fd: int, timeout: float | None, size: int) -> bytes:
    """Up to ``size`` bytes from the non-blocking ``fd``, waiting up to ``timeout`` seconds for
    them (None: no limit; 0: not at all); empty if nothing came."""
    if timeout is None or timeout > 0:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return b""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return b""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class Inotify:
    """One inotify instance and the directories it watches (by path and by wd)."""

    per_directory = True  # each directory needs its own watch, added as it appears

    def __init__(self) -> None:
        self._c = _libc()
        self._c.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._c.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = self._c.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_init1: {os.strerror(e)}")
        self.fd: int = fd
        self._paths: dict[int, str] = {}
        self._wds: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._wds)

    def watches(self, path: str) -> bool:
        return path in self._wds

    def add(self, path: str) -> bool:
        """Watch one directory; False if it is gone or not a directory (any more)."""
        wd = self._c.inotify_add_watch(self.fd, os.fsencode(path), TREE_MASK)
        if wd < 0:
            e = ctypes.get_errno()
            if e == errno.ENOSPC:
                raise WatchLimitError(e, "the inotify watch limit is reached")
            if e in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.ELOOP):
                return False
            raise OSError(e, f"inotify_add_watch {path}: {os.strerror(e)}")
        old = self._paths.get(wd)
        if old is not None and old != path:  # the same directory, known under a former name
            self._wds.pop(old, None)
        self._paths[wd] = path
        self._wds[path] = wd
        return True

    def remove_under(self, path: str) -> None:
        """Stop watching ``path`` and every directory below it (moved away or deleted)."""
        prefix = path + "/"
        for p in [p for p in self._wds if p == path or p.startswith(prefix)]:
            wd = self._wds.pop(p)
            self._paths.pop(wd, None)
            self._c.inotify_rm_watch(self.fd, wd)  # fails harmlessly if already gone

    def _forget(self, wd: int) -> None:
        path = self._paths.pop(wd, None)
        if path is not None and self._wds.get(path) == wd:
            del self._wds[path]

    def read(self, timeout: float | None) -> list[Event]:
        """The events ready now, waiting up to ``timeout`` seconds for the first one (None: no
        limit). An overflow is returned as an event with ``IN_Q_OVERFLOW`` and no directory."""
        buf = read_ready(self.fd, timeout, _BUFFER)
        out: list[Event] = []
        pos, size = 0, len(buf)
        while pos + _HEADER.size <= size:
            wd, mask, _cookie, length = _HEADER.unpack_from(buf, pos)
            pos += _HEADER.size
            name = os.fsdecode(buf[pos:pos + length].rstrip(b"\0"))
            pos += length
            if mask & IN_Q_OVERFLOW:
                out.append(Event("", "", mask))
                continue
            directory = self._paths.get(wd)
            if mask & IN_IGNORED:
                self._forget(wd)
                continue
            if directory is not None:
                out.append(Event(directory, name, mask))
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def max_user_watches() -> int | None:
    try:
        with open(MAX_WATCHES_FILE) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux: f_type comes first (a word); the rest is not read here
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def filesystem_type(path: str) -> int | None:
    """statfs(2)'s ``f_type`` for ``path``; None if it cannot be read."""
    buf = _Statfs()
    c = _libc()
    c.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]
    if c.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF


def remote_filesystem(path: str) -> str | None:
    """The name of the remote filesystem ``path`` is on (whose other clients' writes raise no
    events here), or None for a local one."""
    kind = filesystem_type(path)
    return None if kind is None else REMOTE_TYPES.get(kind)
