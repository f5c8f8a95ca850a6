"""Reading, chunking and storing small files in worker processes.

A tree of many small files costs a backup more in Python than in native code: each file means
an open, a read, a close, a hash, a compression and an encryption, and in one process every
one of those hands the GIL to another thread and waits to get it back. On two cores the
hand-overs (futex wake-ups, context switches) cost more than the work (a 50,000-file tree: 9 s
of system time, most of it in futex). So the archiver of a large tree keeps the walk, the
metadata and the trees, streams the large files (2 MiB and more), and sends the others to worker
processes, in batches:

- each worker opens the repository again from its location and the master key (no password,
  no key derivation), reads its files, cuts and hashes them, and stores the new blobs in packs
  and index objects of its own, as a writer in the main process would;
- a file goes to the worker picked by its size, so copies of one file (same size) meet in the
  same worker and are stored once;
- blobs the repository held when the run began are known to the workers by the 8-byte keys of
  the index (a shared temporary file); the main process confirms every such blob against the
  full index and, in the one-in-2^64 case of a match on the key alone, stores the file itself;
- batches in flight are bounded per worker, so memory stays flat;
- the main process's session covers the workers' uploads (keepwell.repository.sessions), and
  the snapshot is written only after every worker has stored its packs and their index.

The processes are `keepwell.sources.files.workers.Workers`. A worker whose parent dies reads
end-of-file on its pipe and exits; what it stored stays reusable, as after any interrupted
backup.
"""

from __future__ import annotations

import bisect
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from keepwell.crypto import keyed_id
from keepwell.memory import trim_heap
from keepwell.repository.format import DATA
from keepwell.sources.files.metadata import Xattrs, read_fd
from keepwell.sources.files.workers import Workers, repository_init

# ids in file order, bytes read, error text, ids assumed known from the index's keys, the file's
# extended attributes (read through the descriptor it was read with)
Done = Callable[[list[bytes], int, str | None, list[bytes], Xattrs], None]
Answer = tuple[list[bytes], int, str | None, list[bytes], Xattrs]

BATCH_FILES = 64
BATCH_BYTES = 4 << 20
FLUSH_AFTER = 0.03  # seconds a partial batch may wait for more files
TRIM_EVERY = 0.5  # seconds between two returns of the main process's free heap pages
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)
_OPEN_FLAGS = os.O_RDONLY | (getattr(os, "O_NOATIME", 0) if os.geteuid() == 0 else 0)


def read_whole(fd: int, size: int) -> bytes:
    """A file expected to hold ``size`` bytes, in one read; one byte more is asked for, so a
    short read is the end of the file, and a file that grew since it was stat'ed is read on."""
    want = size + 1
    data = os.read(fd, want)
    if len(data) == want:
        parts = [data]
        while part := os.read(fd, 1 << 20):
            parts.append(part)
        data = b"".join(parts)
    return data


@dataclass
class _Batch:
    lock: threading.Lock = field(default_factory=threading.Lock)
    files: list[tuple[str, int]] = field(default_factory=list)
    dones: list[Done] = field(default_factory=list)
    bytes: int = 0
    since: float = 0.0


class ReaderPool:
    """Worker processes that store small files of one backup; see the module docstring."""

    def __init__(self, repo: Any, processes: int, kind: str, on_error: Callable[[BaseException], None]) -> None:
        keys = repo.index.key_array()
        self._keyfile: str | None = None
        if len(keys):
            fd, self._keyfile = tempfile.mkstemp(prefix="keepwell-keys-", dir=_shm_dir())
            with os.fdopen(fd, "wb") as f:
                f.write(keys.tobytes())
        try:
            self._workers = Workers("keepwell.sources.files.readers:Reader",
                                    {**repository_init(repo), "kind": kind, "keys": self._keyfile},
                                    processes, on_error, "file reader")
        except BaseException:
            self._drop_keys()
            raise
        self._batches = [_Batch() for _ in range(processes)]
        self._closed = threading.Event()
        self._flusher = threading.Thread(target=self._flush_stale, daemon=True, name="kw-reader-flush")
        self._flusher.start()

    def submit(self, path: str, size: int, done: Done) -> None:
        """Have ``done`` called (in another thread) once the file is stored."""
        i = ((size * 0x9E3779B1) >> 20) % len(self._batches)
        b = self._batches[i]
        with b.lock:
            if not b.files:
                b.since = time.monotonic()
            b.files.append((path, size))
            b.dones.append(done)
            b.bytes += size
            full = len(b.files) >= BATCH_FILES or b.bytes >= BATCH_BYTES
        if full:
            self._send(i)

    def flush(self) -> None:
        """Send every partial batch (the walk has found every file there is)."""
        for i in range(len(self._batches)):
            self._send(i)

    def _send(self, i: int) -> None:
        b = self._batches[i]
        with b.lock:
            files, dones = b.files, b.dones
            b.files, b.dones, b.bytes = [], [], 0
        if files:
            self._workers.send(i, files, lambda answers: _deliver(dones, answers))

    def _flush_stale(self) -> None:
        trimmed = time.monotonic()
        while not self._closed.wait(FLUSH_AFTER):
            now = time.monotonic()
            if now - trimmed >= TRIM_EVERY:  # this process's heap too (see trim_heap)
                trim_heap()
                trimmed = now
            for i, b in enumerate(self._batches):
                if b.files and now - b.since >= FLUSH_AFTER:
                    try:
                        self._send(i)
                    except BaseException:
                        return

    def close(self) -> dict[str, int]:
        """Flush, let every worker store its last packs and index, and return their totals."""
        try:
            if self._workers.error is None:
                self.flush()
            totals: dict[str, int] = {}
            for t in self._workers.close():
                for k, v in t.items():
                    totals[k] = totals.get(k, 0) + v
            return totals
        finally:
            self._closed.set()
            self._drop_keys()

    def _drop_keys(self) -> None:
        if self._keyfile:
            try:
                os.unlink(self._keyfile)
            except OSError:
                pass
            self._keyfile = None


def _deliver(dones: list[Done], answers: list[Answer]) -> None:
    for done, answer in zip(dones, answers, strict=True):
        done(*answer)


def _shm_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


# -- in the worker process ------------------------------------------------------------------------
class Reader:
    """Reads batches of files and stores their blobs in packs of its own."""

    def __init__(self, init: dict[str, Any]) -> None:
        from keepwell.repository.packer import BlobSink
        from keepwell.repository.repo import reopen_repository

        self.repo = repo = reopen_repository(init["location"], init["options"], init["master"],
                                             init["config"], init["key_id"])
        # the sorted keys, as the main process's index wrote them (native-endian 64-bit): a
        # binary search on a memoryview needs no NumPy in this process
        keys = b""
        if init["keys"]:
            with open(init["keys"], "rb") as f:
                keys = f.read()
        self.keys = memoryview(keys).cast("Q")
        self.sink = BlobSink(repo, upload_workers=2, levels=repo.levels(init["kind"]))
        self.min_size = repo.chunker_params.min_size
        # batches waiting behind the current one, opened (and their reads started) by one thread
        # while this one compresses: a cold disk then reads the next batch during the work
        self._opener = ThreadPoolExecutor(1, thread_name_prefix="kw-open")
        self._ahead: dict[int, tuple[list[tuple[str, int]], Future[list[int | OSError]]]] = {}

    def _known(self, blob_id: bytes) -> bool:
        keys = self.keys
        key = int.from_bytes(blob_id[:8], "big")
        i = bisect.bisect_left(keys, key)
        return i < len(keys) and keys[i] == key

    def prefetch(self, files: list[tuple[str, int]]) -> None:
        """Open a batch that waits behind the current one (once; see `handle`)."""
        if id(files) not in self._ahead:
            self._ahead[id(files)] = (files, self._opener.submit(_open_all, files))

    def handle(self, files: list[tuple[str, int]]) -> list[Answer]:
        # every file of the batch opened first, with the kernel told to read them ahead: a cold
        # disk then serves the batch's reads at once, not one after another
        ahead = self._ahead.pop(id(files), None)
        fds = ahead[1].result() if ahead is not None else _open_all(files)
        answers = [self._store(fd, size) for fd, (_, size) in zip(fds, files, strict=True)]
        trim_heap()
        return answers

    def _store(self, fd: int | OSError, size: int) -> Answer:
        try:
            if isinstance(fd, OSError):
                raise fd
            try:
                data = read_whole(fd, size)
                xattrs = read_fd(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            return [], 0, exc.strerror or str(exc), [], ()
        ids: list[bytes] = []
        assumed: list[bytes] = []
        pieces = [data] if len(data) <= self.min_size else self.repo.chunker.chunks_of(data)
        for piece in pieces:
            if not piece:
                continue
            blob_id = keyed_id(self.repo.id_key, piece)
            if self._known(blob_id):
                assumed.append(blob_id)  # the main process confirms it against the full id
            else:
                self.sink.save(DATA, piece, blob_id)
            ids.append(blob_id)
        return ids, len(data), None, assumed, xattrs

    def finish(self) -> dict[str, int]:
        for _, opening in self._ahead.values():  # none are left after a whole run
            for fd in opening.result():
                if isinstance(fd, int):
                    os.close(fd)
        self._ahead.clear()
        self._opener.shutdown()
        try:
            self.sink.flush()
        finally:
            self.sink.close()
        return self.sink.stats.totals()


def _open_all(files: list[tuple[str, int]]) -> list[int | OSError]:
    return [_opened(path) for path, _ in files]


def _opened(path: str) -> int | OSError:
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        return exc
    if _WILLNEED is not None:
        try:
            os.posix_fadvise(fd, 0, 0, _WILLNEED)
        except OSError:
            pass
    return fd
