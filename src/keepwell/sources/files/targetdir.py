"""The inside of a restore target, reached without following a link that restore did not make.

A restore writes under its target and nowhere else. The names in a snapshot are checked before
anything is made of them (keepwell.repository.tree.unusable_name: no ``..``, no ``/``), but the
target may already hold symbolic links, hard links to files elsewhere, or files where the
snapshot has directories, and a link may even be planted while the restore runs. So nothing under
the target is reached by a path:

- `TargetDirs` opens each directory one component at a time, relative to its parent's
  descriptor, with ``O_NOFOLLOW | O_DIRECTORY``. A symbolic link or any other non-directory
  where a directory must be is an error, or, when the restore may replace what is there, is
  removed (the link itself, never what it points to) and a directory made in its place. The
  target itself is opened as the user named it, link or not. The descriptors are kept in a small
  least-recently-used table, so a restore opens each directory about once.
- A file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` in its directory's descriptor
  (`new_file`). When something already has its name, the new file is made under a temporary
  name beside it and renamed over it once whole (`put_in_place`): an existing file is replaced,
  never written through (it may be a hard link to a file outside the target), and a link is
  replaced, never followed. Links, FIFOs and device nodes are made the same way (`make_node`).
- Metadata is set through an open descriptor, or by name in the directory's descriptor without
  following a link (keepwell.sources.files.restorer).

Words: *rel* is a directory's path relative to the target, ``""`` for the target itself, its
names joined by ``/``.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable

from keepwell.sources.files import fileio

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_CAPACITY = 64  # directory descriptors kept open by each thread (of each worker process)
_serial = itertools.count()


class TargetDirs:
    """Descriptors of the directories inside a restore target, by rel. Each thread has its own
    table (no lock on the way to a descriptor: threads that wait for one another's locks hand
    the GIL around at every call); a descriptor handed out by `acquire` stays open until the
    same thread's `release`."""

    def __init__(self, root: str, *, replace: bool, capacity: int = _CAPACITY) -> None:
        self.root = root
        self.replace = replace  # remove what is in the way of a directory (restore --overwrite)
        self._capacity = max(2, capacity)
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        self._local = threading.local()
        self._tables: list[OrderedDict[str, list[int]]] = []  # rel -> [descriptor, users]
        self._lock = threading.Lock()  # the list of tables

    def _table(self) -> OrderedDict[str, list[int]]:
        try:
            table: OrderedDict[str, list[int]] = self._local.table
        except AttributeError:
            table = self._local.table = OrderedDict()
            with self._lock:
                self._tables.append(table)
        return table

    def acquire(self, rel: str, *, create: bool = False) -> int:
        """The directory ``rel`` (``create``: made, with the directories above it, where missing);
        an `OSError` if a component is missing, a link or not a directory."""
        if not rel:
            return self._root_fd
        table = self._table()
        entry = table.get(rel)
        if entry is None:
            entry = self._open_dir(table, rel, create)
        else:
            table.move_to_end(rel)
        entry[1] += 1
        if len(table) > self._capacity:
            _evict(table, self._capacity)
        return entry[0]

    def release(self, rel: str) -> None:
        if rel:
            self._local.table[rel][1] -= 1

    def close(self) -> None:
        """Close every descriptor (once the threads that used them are done)."""
        with self._lock:
            for table in self._tables:
                for fd, _users in table.values():
                    os.close(fd)
                table.clear()
            os.close(self._root_fd)

    def _open_dir(self, table: OrderedDict[str, list[int]], rel: str, create: bool) -> list[int]:
        """Open ``rel`` below its parent (opened first if it is not open); nothing is closed
        meanwhile, so the parent's descriptor stays valid while it is used."""
        parent, _, name = rel.rpartition("/")
        if not parent:
            entry = [self._open_at(self._root_fd, name, rel, create), 0]
        else:
            up = table.get(parent)
            if up is None:
                up = self._open_dir(table, parent, create)
            entry = [self._open_at(up[0], name, rel, create), 0]
        table[rel] = entry
        return entry

    def _open_at(self, parent_fd: int, name: str, rel: str, create: bool) -> int:
        _check(name)
        try:
            return os.open(name, _DIR, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            if not (create and self.replace):
                raise OSError(errno.ENOTDIR, f"{rel} is a symbolic link or not a directory "
                                             "(not followed)") from None
            os.unlink(name, dir_fd=parent_fd)  # the link or file itself, never what it names
        try:
            os.mkdir(name, dir_fd=parent_fd)
        except FileExistsError:
            pass  # made meanwhile: opened as anything else, without following it
        return os.open(name, _DIR, dir_fd=parent_fd)


def _evict(table: OrderedDict[str, list[int]], capacity: int) -> None:
    """Close the least recently used descriptors no one holds, down to ``capacity``."""
    while len(table) > capacity:
        idle = next((rel for rel, (_fd, users) in table.items() if users == 0), None)
        if idle is None:
            return  # every one is held: closed once released and no longer needed
        os.close(table.pop(idle)[0])


def _check(name: str) -> None:
    """One entry of one directory, never a way to another (the walk refuses snapshots holding
    such names; this keeps every caller to that too)."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise OSError(errno.EINVAL, f"{name!r} cannot be the name of an entry of a directory")


def _temp_name() -> str:
    return f".keepwell-restore-{os.getpid()}-{next(_serial)}"


def new_file(dir_fd: int, name: str, replace: bool, *,
             staged: bool = False) -> tuple[int, str | None]:
    """A new, empty file for ``name`` (mode 0600, open for writing) and, when something already
    has that name (``replace`` only; else `FileExistsError`) or when ``staged`` (a file written
    in several steps, which must never be seen half written under its name), the temporary
    name it was created under, to be renamed over ``name`` once whole (`put_in_place`)."""
    _check(name)
    if not staged:
        try:
            return fileio.open_write(dir_fd, name, True), None
        except FileExistsError:
            if not replace:
                raise
    while True:
        temp = _temp_name()
        try:
            return fileio.open_write(dir_fd, temp, True), temp
        except FileExistsError:
            continue


def put_in_place(dir_fd: int, name: str, temp: str, replace: bool = True) -> None:
    """Rename ``temp`` over ``name``; remove ``temp`` if that fails (a directory has that
    name: it is not replaced by a file). Without ``replace``, something that got the name
    meanwhile is kept (`FileExistsError`): the file is linked to its name, then the temporary
    name removed."""
    try:
        if not replace:
            try:
                os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
            else:
                discard(dir_fd, temp)
                return
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        discard(dir_fd, temp)
        raise


def discard(dir_fd: int, temp: str) -> None:
    try:
        os.unlink(temp, dir_fd=dir_fd)
    except OSError:
        pass


def make_node(dir_fd: int, name: str, replace: bool, make: Callable[[str], None]) -> None:
    """Make a link, FIFO or device node with ``make(name)``; with ``replace``, one that finds
    something at ``name`` is made under a temporary name and renamed over it."""
    _check(name)
    try:
        make(name)
        return
    except FileExistsError:
        if not replace:
            raise
    while True:
        temp = _temp_name()
        try:
            make(temp)
            break
        except FileExistsError:
            continue
    put_in_place(dir_fd, name, temp)
