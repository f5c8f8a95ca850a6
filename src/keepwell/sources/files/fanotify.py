"""Change notifications for whole filesystems (Linux fanotify with directory and name
reporting), through ctypes: one mark per filesystem instead of one inotify watch per directory.

inotify needs a watch on every directory of a tree (kernel memory for each, a per-user limit,
and a walk of the tree to add them); fanotify's ``FAN_MARK_FILESYSTEM`` reports every change on
a filesystem through one mark, each event naming its directory by a file handle and the entry
by its name (``FAN_REPORT_DFID_NAME``, Linux 5.9). It needs ``CAP_SYS_ADMIN`` (and
``CAP_DAC_READ_SEARCH`` to turn handles into paths), and a filesystem that can hand out file
handles (ext4, XFS, btrfs' top volume and the like).

`Fanotify` speaks as `keepwell.sources.files.inotify.Inotify` does: `read` returns the same
`Event` objects with inotify's mask bits (fanotify's have the same values), for the entries
under the watched roots only (a filesystem mark sees the whole filesystem). Words:

    mark        a ``FAN_MARK_FILESYSTEM`` mark: one for the filesystem of each root, and one
                for each filesystem mounted below a root (unless ``one_file_system``); a
                filesystem mounted below a root after the start is not seen
    handle      the kernel's file handle of an event's directory; turned into the directory's
                path of now through ``open_by_handle_at`` on a descriptor of that filesystem
                (found by the event's filesystem id) and ``/proc/self/fd``. A handle of a
                directory that is gone (``ESTALE``) names nothing that a snapshot could hold:
                the event is dropped, and the directory's removal is reported by its parent.
                The handles of the roots are known from the start, so a root's own removal
                is reported even when it cannot be opened any more.
    cache       handles turned into paths, kept until a directory is renamed or removed
                anywhere on a marked filesystem (then every path may be stale)

Memory stays bounded: one read takes at most `_BUFFER` bytes, the cache at most `_CACHE`
entries; what the kernel cannot queue is an overflow event (``IN_Q_OVERFLOW``), never silent.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import struct

from keepwell.sources.files.inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    Event,
    _libc,
    read_ready,
)

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_REPORT_DFID_NAME = 0x0C00  # FAN_REPORT_DIR_FID | FAN_REPORT_NAME
FAN_MARK_ADD = 0x1
FAN_MARK_FILESYSTEM = 0x100
FAN_ONDIR = IN_ISDIR
AT_FDCWD = -100
O_PATH = getattr(os, "O_PATH", 0o10000000)

# fanotify's event bits are inotify's: the same mask serves both
_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
         | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | FAN_ONDIR)
_DIR_GONE = IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF

_METADATA = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata
_INFO = struct.Struct("=BBH")  # struct fanotify_event_info_header
_FID = struct.Struct("=iiIi")  # fsid (two ints), then struct file_handle: bytes, type
_INFO_DFID_NAME, _INFO_DFID = 2, 3
_BUFFER = 256 * 1024
_CACHE = 65536  # handles turned into paths, at most


class FanotifyUnavailable(OSError):
    """fanotify cannot watch these roots here (no privilege, an old kernel, a filesystem
    without file handles): the caller watches with inotify instead."""


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux, up to the filesystem id
    _fields_ = [("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long),
                ("counts", ctypes.c_uint64 * 5), ("f_fsid", ctypes.c_int32 * 2),
                ("rest", ctypes.c_byte * 64)]


def _fsid(c: ctypes.CDLL, path: str) -> tuple[int, int]:
    buf = _Statfs()
    if c.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        e = ctypes.get_errno()
        raise FanotifyUnavailable(e, f"statfs {path}: {os.strerror(e)}")
    return buf.f_fsid[0], buf.f_fsid[1]


def mount_points() -> set[str]:
    """Every mount point of this process's mount namespace (from /proc/self/mountinfo)."""
    found: set[str] = set()
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split(b" ")
        if len(fields) >= 5:  # the mount point, with space, tab, newline and \ as octal escapes
            found.add(os.fsdecode(re.sub(rb"\\([0-7]{3})",
                                         lambda m: bytes([int(m.group(1), 8)]), fields[4])))
    return found


def mounts_below(roots: list[str]) -> list[str]:
    """The mount points strictly below any of ``roots``."""
    return sorted(p for p in mount_points()
                  if any(p.startswith(r.rstrip("/") + "/") for r in roots))


class Fanotify:
    """One fanotify group marking the filesystems of ``roots`` (and those mounted below them
    unless ``one_file_system``); raises `FanotifyUnavailable` where that cannot be done."""

    per_directory = False  # nothing to add for a new directory: the filesystem mark covers it

    def __init__(self, roots: list[str], *, one_file_system: bool = False) -> None:
        self._c = _libc()
        self._c.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        self._c.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64,
                                          ctypes.c_int, ctypes.c_char_p]
        self._c.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._c.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                                              ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        self._c.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]
        self.roots = [r.rstrip("/") for r in roots]  # never / itself (watched_roots)
        # a handle turns into the directory's real path: a root reached through a symbolic
        # link is matched by its real path, and the events name it as given
        self._real = [(os.path.realpath(r), r) for r in self.roots]
        fd = self._c.fanotify_init(FAN_CLASS_NOTIF | FAN_REPORT_DFID_NAME | FAN_CLOEXEC
                                   | FAN_NONBLOCK, os.O_RDONLY | os.O_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            why = ("needs CAP_SYS_ADMIN" if e == errno.EPERM
                   else "this kernel lacks directory and name reporting (Linux 5.9)"
                   if e == errno.EINVAL else os.strerror(e))
            raise FanotifyUnavailable(e, f"fanotify: {why}")
        self.fd: int = fd
        self._mounts: dict[tuple[int, int], int] = {}  # fsid -> a descriptor on it
        self._roots_by_handle: dict[tuple[tuple[int, int], bytes], str] = {}
        self._cache: dict[tuple[tuple[int, int], bytes], str | None] = {}
        try:
            places = list(self.roots)
            if not one_file_system:
                places += mounts_below(self.roots)
            for place in places:
                self._mark(place)
            for real, _given in self._real:
                self._roots_by_handle[(_fsid(self._c, real), self._handle(real))] = real
        except BaseException:
            self.close()
            raise

    def _mark(self, place: str) -> None:
        fsid = _fsid(self._c, place)
        if fsid in self._mounts:
            return
        if self._c.fanotify_mark(self.fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, _MASK, AT_FDCWD,
                                 os.fsencode(place)) != 0:
            e = ctypes.get_errno()
            raise FanotifyUnavailable(e, f"fanotify cannot mark the filesystem of {place}: "
                                      f"{os.strerror(e)}")
        try:
            self._mounts[fsid] = os.open(place, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise FanotifyUnavailable(exc.errno or 0, f"{place}: {exc.strerror}") from None

    def _handle(self, path: str) -> bytes:
        """The file handle of ``path`` as fanotify reports it (type and bytes)."""
        size = 128
        buf = ctypes.create_string_buffer(struct.pack("=Ii", size, 0) + bytes(size))
        mount_id = ctypes.c_int()
        if self._c.name_to_handle_at(AT_FDCWD, os.fsencode(path), buf, ctypes.byref(mount_id),
                                     0) != 0:
            e = ctypes.get_errno()
            raise FanotifyUnavailable(e, f"{path}: no file handle ({os.strerror(e)})")
        length, kind = struct.unpack_from("=Ii", buf.raw)
        return struct.pack("=i", kind) + buf.raw[8:8 + length]

    def __len__(self) -> int:
        """The number of marks (filesystems)."""
        return len(self._mounts)

    def add(self, path: str) -> bool:
        return True

    def remove_under(self, path: str) -> None:
        pass

    def _path(self, fsid: tuple[int, int], handle: bytes) -> str | None:
        """The path of now of the directory with ``handle``; None if it is gone."""
        key = (fsid, handle)
        if key in self._cache:
            return self._cache[key]
        mount = self._mounts.get(fsid)
        path: str | None = None
        if mount is not None:
            (kind,) = struct.unpack_from("=i", handle)
            fh = struct.pack("=Ii", len(handle) - 4, kind) + handle[4:]
            fd = self._c.open_by_handle_at(mount, fh, O_PATH | os.O_CLOEXEC)
            if fd >= 0:
                try:
                    path = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    path = None
                finally:
                    os.close(fd)
                if path is not None and (path.endswith(" (deleted)") or not path.startswith("/")):
                    path = None
        if path is None:
            path = self._roots_by_handle.get(key)
        if len(self._cache) >= _CACHE:
            self._cache.clear()
        self._cache[key] = path
        return path

    def _as_given(self, path: str) -> str | None:
        """``path`` (a real one) under the root it lies in, as that root was given; None if it
        lies in none."""
        for real, given in self._real:
            if path == real or path.startswith(real + "/"):
                return given + path[len(real):]
        return None

    def read(self, timeout: float | None) -> list[Event]:
        """The events ready now under the roots, waiting up to ``timeout`` seconds for the
        first (None: no limit). An overflow is an event with ``IN_Q_OVERFLOW`` and no path."""
        buf = read_ready(self.fd, timeout, _BUFFER)
        out: list[Event] = []
        pos, size = 0, len(buf)
        while pos + _METADATA.size <= size:
            length, _vers, _res, meta_len, mask, fd, _pid = _METADATA.unpack_from(buf, pos)
            if length < meta_len or pos + length > size:
                break
            end = pos + length
            if fd >= 0:  # not asked for; never left open
                os.close(fd)
            if mask & IN_Q_OVERFLOW:
                out.append(Event("", "", IN_Q_OVERFLOW))
                pos = end
                continue
            at = pos + meta_len
            while at + _INFO.size <= end:
                info_type, _pad, info_len = _INFO.unpack_from(buf, at)
                if info_len < _INFO.size:
                    break
                if info_type in (_INFO_DFID_NAME, _INFO_DFID):
                    self._event(buf, at, info_type, info_len, mask, out)
                    break
                at += info_len
            pos = end
        return out

    def _event(self, buf: bytes, at: int, info_type: int, info_len: int, mask: int,
               out: list[Event]) -> None:
        f0, f1, hlen, kind = _FID.unpack_from(buf, at + _INFO.size)
        start = at + _INFO.size + _FID.size
        handle = struct.pack("=i", kind) + buf[start:start + hlen]
        name = ""
        if info_type == _INFO_DFID_NAME:
            raw = buf[start + hlen:at + info_len].split(b"\0", 1)[0]
            name = "" if raw == b"." else os.fsdecode(raw)
        if mask & FAN_ONDIR and mask & _DIR_GONE:
            self._cache.clear()  # a directory renamed or removed: paths below it moved
        directory = self._path((f0, f1), handle)
        if directory is None:
            return
        path = self._as_given(f"{directory}/{name}" if name else directory)
        if path is None:
            return
        if path in self.roots and not name:
            out.append(Event(path, "", mask))
        else:
            parent, _, leaf = path.rpartition("/")
            out.append(Event(parent or "/", leaf, mask))

    def close(self) -> None:
        for fd in self._mounts.values():
            os.close(fd)
        self._mounts.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
