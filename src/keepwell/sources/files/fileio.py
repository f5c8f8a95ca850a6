"""Short system calls on many small files, made while holding the GIL.

A Python thread releases the GIL around every system call. With several threads restoring small
files, each release hands the GIL to another thread and the caller then waits to get it back:
on two cores those hand-overs (futex wake-ups and context switches) cost more than the calls
themselves. Calls that only touch the page cache take microseconds, so these keep the GIL:
libc is called through ``ctypes.PyDLL``, which does not release it. Writes of a megabyte or
more, and every call on a system without glibc, go through ``os``, which releases it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

_BIG_WRITE = 1 << 20
# a new file, never one already there, nor what a symbolic link there points to
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_REOPEN = os.O_WRONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_NOT_GIVEN = (errno.EPERM, errno.EINVAL)  # a chown refused: not permitted, or an unmapped id


def _bind() -> ctypes.PyDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.PyDLL(None, use_errno=True)
        sig = {
            "openat": ([ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint], ctypes.c_int),
            "pwrite64": ([ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int64],
                         ctypes.c_ssize_t),
            "close": ([ctypes.c_int], ctypes.c_int),
            "fchmod": ([ctypes.c_int, ctypes.c_uint], ctypes.c_int),
            "fchown": ([ctypes.c_int, ctypes.c_uint, ctypes.c_uint], ctypes.c_int),
            "futimens": ([ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
        }
        for name, (args, res) in sig.items():
            fn = getattr(libc, name)
            fn.argtypes, fn.restype = args, res
    except (OSError, AttributeError):
        return None
    return libc


_libc = _bind()


def _fail(what: str | bytes | None = None) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err), what)


if _libc is not None:
    _c_openat, _c_pwrite, _c_close = _libc.openat, _libc.pwrite64, _libc.close
    _c_fchmod, _c_fchown, _c_futimens = _libc.fchmod, _libc.fchown, _libc.futimens
    _Times = ctypes.c_long * 4

    def open_write(dir_fd: int, name: str, create: bool) -> int:
        """Open ``name`` in the directory ``dir_fd`` for writing: a new file with mode 0600 (an
        `FileExistsError` if anything has that name), or one this process created before; a
        symbolic link is never followed."""
        fd = int(_c_openat(dir_fd, os.fsencode(name), _CREATE if create else _REOPEN, 0o600))
        if fd < 0:
            raise _fail(name)
        return fd

    def pwrite_all(fd: int, data: bytes, offset: int) -> None:
        if len(data) >= _BIG_WRITE:
            _os_pwrite_all(fd, data, offset)
            return
        done = 0
        while done < len(data):
            n = int(_c_pwrite(fd, data[done:] if done else data, len(data) - done, offset + done))
            if n < 0:
                if ctypes.get_errno() == 4:  # EINTR
                    continue
                raise _fail()
            done += n

    def close(fd: int) -> None:
        if _c_close(fd) < 0:
            raise _fail()

    def set_meta(fd: int, mode: int, mtime_ns: int, owner: tuple[int, int] | None) -> bool:
        """Owner (when given), mode and times of an open file, in that order (chown clears
        set-id bits, so the mode comes after it). An owner that may not be given (EPERM; EINVAL:
        an id this user namespace does not map) does not stop the rest: False is returned."""
        given = True
        if owner is not None and _c_fchown(fd, owner[0], owner[1]) < 0:
            if ctypes.get_errno() not in _NOT_GIVEN:
                raise _fail()
            given = False
        if _c_fchmod(fd, mode) < 0:
            raise _fail()
        sec, nsec = divmod(mtime_ns, 1_000_000_000)
        if _c_futimens(fd, _Times(sec, nsec, sec, nsec)) < 0:
            raise _fail()
        return given
else:  # pragma: no cover - systems without glibc
    def open_write(dir_fd: int, name: str, create: bool) -> int:
        return os.open(name, _CREATE if create else _REOPEN, 0o600, dir_fd=dir_fd)

    def pwrite_all(fd: int, data: bytes, offset: int) -> None:
        _os_pwrite_all(fd, data, offset)

    def close(fd: int) -> None:
        os.close(fd)

    def set_meta(fd: int, mode: int, mtime_ns: int, owner: tuple[int, int] | None) -> bool:
        given = True
        if owner is not None:
            try:
                os.fchown(fd, owner[0], owner[1])
            except OSError as exc:
                if exc.errno not in _NOT_GIVEN:
                    raise
                given = False
        os.fchmod(fd, mode)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
        return given


def _os_pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
