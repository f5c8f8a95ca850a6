"""Reading a restored tree back (``restore --verify``).

A restore checks every blob against its id before it writes a byte of it; this checks what the
disk holds afterwards. Each regular file of the snapshot that the restore selected is opened
through the target's directory descriptors (keepwell.sources.files.targetdir: no link is
followed, so a file outside the target is never read as if it were the restored one), must be a
regular file of the snapshot's size, and is read in pieces of its blobs' lengths, each piece's
keyed id compared with the snapshot's. Files are read a few at a time on threads (hashing
releases the GIL); memory is one blob per thread.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from keepwell.cpus import pool_threads
from keepwell.crypto import keyed_id
from keepwell.repository import Repository, Snapshot
from keepwell.repository.tree import FILE, Node
from keepwell.sources.files import targetdir

_OPEN = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


@dataclass
class VerifyResult:
    files: int = 0
    bytes: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # path, what differs


def verify_restored(repo: Repository, snap: Snapshot, target: str, *,
                    selected: Callable[[str], bool], skip: set[str] | frozenset[str] = frozenset(),
                    threads: int | None = None) -> VerifyResult:
    """Compare the files under ``target`` with those of ``snap`` that ``selected`` (given the
    path in the snapshot) keeps; ``skip``: paths under the target the restore already reported
    as failed."""
    result = VerifyResult()
    lock = threading.Lock()
    dirs = targetdir.TargetDirs(target, replace=False)
    workers = threads or pool_threads()
    slots = threading.BoundedSemaphore(2 * workers)

    def check(rel: str, node: Node) -> None:
        path = os.path.join(target, rel)
        try:
            problem, size = _check_file(repo, dirs, rel, node)
        except OSError as exc:
            problem, size = f"cannot be read back: {exc.strerror or exc}", 0
        with lock:
            result.files += 1
            result.bytes += size
            if problem is not None:
                result.errors.append((path, problem))
        if problem is not None:
            repo.events.emit("error", path=path, message=problem)

    def done(fut: Future[None]) -> None:
        slots.release()

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="kw-verify") as pool:
            for rel, node in repo.walk(snap, checked=True):
                if node.type != FILE or not selected("/" + rel) \
                        or os.path.join(target, rel) in skip:
                    continue
                slots.acquire()
                pool.submit(check, rel, node).add_done_callback(done)
    finally:
        dirs.close()
    result.errors.sort()
    return result


def _check_file(repo: Repository, dirs: targetdir.TargetDirs, rel: str,
                node: Node) -> tuple[str | None, int]:
    """What differs between the file at ``rel`` and ``node`` (None: nothing), and the bytes
    read."""
    parent, _, name = rel.rpartition("/")
    dir_fd = dirs.acquire(parent)
    try:
        try:
            fd = os.open(name, _OPEN, dir_fd=dir_fd)
        except FileNotFoundError:
            return "is missing", 0
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "is a symbolic link, not the restored file", 0
            raise
    finally:
        dirs.release(parent)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file", 0
        if st.st_size != node.size:
            return f"is {st.st_size} bytes, the snapshot's file {node.size}", 0
        read = 0
        locations = repo.index.lookup_many(list(node.content))
        for blob_id, where in zip(node.content, locations, strict=True):
            if where is None:
                return f"cannot be compared: blob {blob_id.hex()[:16]} is not in the index", read
            data = _read_exactly(fd, where.raw_length)
            if len(data) != where.raw_length or keyed_id(repo.id_key, data) != blob_id:
                return f"differs from the snapshot in bytes {read}-{read + where.raw_length - 1}", read
            read += len(data)
        return None, read
    finally:
        os.close(fd)


def _read_exactly(fd: int, size: int) -> bytes:
    parts = []
    while size > 0:
        chunk = os.read(fd, min(size, 8 * 1024 * 1024))
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)
