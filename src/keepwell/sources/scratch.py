"""Scratch files: what a source writes aside while it works, never left behind by a killed run.

A *scratch file* belongs to one run. It is created already holding an ``flock`` lock that its
owner keeps until it closes the file, so a run killed with SIGKILL loses the lock with its last
descriptor. Where Linux allows it the file starts unnamed (``O_TMPFILE``) and gets its name only
once locked, so no other run ever sees it unlocked while its owner lives; elsewhere it is created
by name and locked at once. Every creation first *sweeps* its directory: a file with the same
prefix and suffix that no one holds locked is the remainder of a killed run, and is removed.

A scratch file may give up its name while open (`ScratchFile.unlink`): the space is then freed
when the owner closes it or dies, whatever happens. ``flock`` locks are apart from the POSIX
record locks SQLite uses, so holding one never disturbs SQLite on the same file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat

_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT, errno.EACCES}


class ScratchFile:
    """A locked file in ``directory`` named ``prefix + random + suffix``; `fd` is open read-write."""

    def __init__(self, fd: int, path: str | None) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def create(cls, directory: str, prefix: str, suffix: str = "", *,
               mode: int = 0o600) -> ScratchFile:
        sweep(directory, prefix, suffix)
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode)
        except (OSError, AttributeError) as exc:
            if isinstance(exc, OSError) and exc.errno not in _NO_TMPFILE:
                raise
            return cls._create_named(directory, prefix, suffix, mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            while True:
                path = os.path.join(directory, f"{prefix}{secrets.token_hex(8)}{suffix}")
                try:
                    os.link(f"/proc/self/fd/{fd}", path, follow_symlinks=True)
                    return cls(fd, path)
                except FileExistsError:
                    continue
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOENT, errno.EXDEV, errno.EPERM):  # no /proc, or no linkat
                return cls._create_named(directory, prefix, suffix, mode)
            raise

    @classmethod
    def _create_named(cls, directory: str, prefix: str, suffix: str, mode: int) -> ScratchFile:
        while True:
            path = os.path.join(directory, f"{prefix}{secrets.token_hex(8)}{suffix}")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            except FileExistsError:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            return cls(fd, path)

    def unlink(self) -> None:
        """Give up the name; the file stays open (and is freed when closed)."""
        if self.path is not None:
            path, self.path = self.path, None
            os.unlink(path)

    def renamed(self) -> None:
        """The owner has renamed the file away: its name is no longer ours to remove."""
        self.path = None

    def close(self) -> None:
        """Remove the name (if still ours) and close the file."""
        try:
            if self.path is not None:
                try:
                    self.unlink()
                except FileNotFoundError:
                    pass
        finally:
            if self.fd >= 0:
                fd, self.fd = self.fd, -1
                os.close(fd)

    def __enter__(self) -> ScratchFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sweep(directory: str, prefix: str, suffix: str = "") -> int:
    """Remove the scratch files of dead runs (unlocked, named ``prefix*suffix``); how many."""
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    removed = 0
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner is alive
            now = os.stat(path, follow_symlinks=False)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(path)
                removed += 1
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed
