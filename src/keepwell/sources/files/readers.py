"""Reading, chunking and storing small files in worker processes.

A tree of many small files costs a backup more in Python than in native code: each file means
an open, a read, a close, a hash, a compression and an encryption, and in one process every
one of those hands the GIL to another thread and waits to get it back. On two cores the
hand-overs (futex wake-ups, context switches) cost more than the work (a 50,000-file tree: 9 s
of system time, most of it in futex). So the archiver of a large tree keeps the walk, the
metadata and the trees, and sends the files below the largest chunk size to worker processes,
in batches:

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

A worker whose parent dies reads end-of-file on its pipe and exits; what it stored stays
reusable, as after any interrupted backup.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from keepwell.errors import KeepwellError

# ids in file order, bytes read, error text, ids assumed known from the index's keys
Done = Callable[[list[bytes], int, str | None, list[bytes]], None]

BATCH_FILES = 64
BATCH_BYTES = 4 << 20
IN_FLIGHT = 3  # batches sent to one worker and not yet answered
FLUSH_AFTER = 0.03  # seconds a partial batch may wait for more files
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
class _Worker:
    process: subprocess.Popen[bytes]
    conn: Connection  # to the worker
    answers: Connection  # from the worker
    slots: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(IN_FLIGHT))
    lock: threading.Lock = field(default_factory=threading.Lock)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    batch: list[tuple[str, int]] = field(default_factory=list)
    dones: list[Done] = field(default_factory=list)
    bytes: int = 0
    since: float = 0.0
    next_id: int = 0
    waiting: dict[int, list[Done]] = field(default_factory=dict)
    stats: dict[str, int] | None = None
    receiver: threading.Thread | None = None


class ReaderPool:
    """Worker processes that store small files of one backup; see the module docstring."""

    def __init__(self, repo: Any, processes: int, kind: str, on_error: Callable[[BaseException], None]) -> None:
        assert repo.opened_as is not None
        location, options = repo.opened_as
        self._on_error = on_error
        self._error: BaseException | None = None
        self._closed = threading.Event()
        keys = repo.index.key_array()
        self._keyfile: str | None = None
        if len(keys):
            fd, self._keyfile = tempfile.mkstemp(prefix="keepwell-keys-", dir=_shm_dir())
            with os.fdopen(fd, "wb") as f:
                f.write(keys.tobytes())
        init = {"location": location, "options": options, "master": repo.master.raw,
                "config": repo.config, "key_id": repo.key_id, "kind": kind, "keys": self._keyfile}
        self._workers: list[_Worker] = []
        try:
            for _ in range(processes):
                self._workers.append(_start(init))
        except BaseException:
            self.terminate()
            raise
        for w in self._workers:
            w.receiver = threading.Thread(target=self._receive, args=(w,), daemon=True,
                                          name="kw-reader-results")
            w.receiver.start()
        self._flusher = threading.Thread(target=self._flush_stale, daemon=True, name="kw-reader-flush")
        self._flusher.start()

    # -- the main process's side --------------------------------------------------------------
    def submit(self, path: str, size: int, done: Done) -> None:
        """Have ``done`` called (in another thread) once the file is stored."""
        w = self._workers[((size * 0x9E3779B1) >> 20) % len(self._workers)]
        with w.lock:
            if not w.batch:
                w.since = time.monotonic()
            w.batch.append((path, size))
            w.dones.append(done)
            w.bytes += size
            full = len(w.batch) >= BATCH_FILES or w.bytes >= BATCH_BYTES
        if full:
            self._send(w)

    def flush(self) -> None:
        """Send every partial batch (the walk has found every file there is)."""
        for w in self._workers:
            self._send(w)

    def _send(self, w: _Worker) -> None:
        with w.send_lock:  # batches leave in the order their slots were taken
            while not w.slots.acquire(timeout=0.5):
                if self._error is not None:
                    raise self._error
            with w.lock:
                batch, dones = w.batch, w.dones
                w.batch, w.dones, w.bytes = [], [], 0
                if not batch:
                    w.slots.release()
                    return
                bid = w.next_id
                w.next_id += 1
                w.waiting[bid] = dones
            try:
                w.conn.send(("read", bid, batch))
            except (OSError, ValueError) as exc:
                raise self._fail(KeepwellError(f"a file reader process is gone: {exc}")) from None

    def _flush_stale(self) -> None:
        while not self._closed.wait(FLUSH_AFTER):
            now = time.monotonic()
            for w in self._workers:
                if w.batch and now - w.since >= FLUSH_AFTER:
                    try:
                        self._send(w)
                    except BaseException:
                        return

    def _receive(self, w: _Worker) -> None:
        try:
            while True:
                msg = w.answers.recv()
                if msg[0] == "done":
                    _, bid, results = msg
                    with w.lock:
                        dones = w.waiting.pop(bid)
                    w.slots.release()
                    for done, (ids, size, err, assumed) in zip(dones, results, strict=True):
                        done(ids, size, err, assumed)
                elif msg[0] == "closed":
                    w.stats = msg[1]
                    return
                elif msg[0] == "failed":
                    self._fail(msg[1])
                    return
        except (EOFError, OSError):
            if not self._closed.is_set() or w.stats is None:
                self._fail(KeepwellError("a file reader process ended unexpectedly",
                                         hint="see its message above; the next backup reuses what was stored"))
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> BaseException:
        if self._error is None:
            self._error = exc
            self._on_error(exc)
        for w in self._workers:
            w.slots.release()  # wake a sender waiting for a slot: it sees the error
        return self._error

    def close(self) -> dict[str, int]:
        """Flush, let every worker store its last packs and index, and return their totals."""
        try:
            if self._error is None:
                self.flush()
                for w in self._workers:
                    with w.send_lock:
                        w.conn.send(("close",))
                for w in self._workers:
                    assert w.receiver is not None
                    w.receiver.join()
            if self._error is not None:
                raise self._error
            totals: dict[str, int] = {}
            for w in self._workers:
                for k, v in (w.stats or {}).items():
                    totals[k] = totals.get(k, 0) + v
            return totals
        finally:
            self._closed.set()
            self.terminate()

    def terminate(self) -> None:
        self._closed.set()
        for w in self._workers:
            if self._error is not None and w.process.poll() is None:
                w.process.terminate()
            try:
                w.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait()
            w.conn.close()
            w.answers.close()
        if self._keyfile:
            try:
                os.unlink(self._keyfile)
            except OSError:
                pass
            self._keyfile = None


_MAIN = ("import sys; from multiprocessing.connection import Connection as C; "
         "from keepwell.sources.files.readers import worker_main; "
         "worker_main(C(int(sys.argv[1]), writable=False), C(int(sys.argv[2]), readable=False))")


def _start(init: dict[str, Any]) -> _Worker:
    """A worker: a fresh interpreter running this module, talking over two pipes (not
    multiprocessing's spawn, which would run the caller's main script again in the child)."""
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    try:
        p = subprocess.Popen([sys.executable, "-c", _MAIN, str(down_r), str(up_w)],
                             pass_fds=(down_r, up_w), stdin=subprocess.DEVNULL, close_fds=True)
    except BaseException:
        for fd in (down_r, down_w, up_r, up_w):
            os.close(fd)
        raise
    os.close(down_r)
    os.close(up_w)
    w = _Worker(p, Connection(down_w, readable=False), Connection(up_r, writable=False))
    w.conn.send(init)
    return w


def _shm_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


# -- the worker process ---------------------------------------------------------------------------
def worker_main(requests: Connection, answers: Connection) -> None:
    try:
        init = requests.recv()
    except EOFError:
        return
    try:
        _serve(requests, answers, init)
    except (EOFError, BrokenPipeError):
        return  # the main process is gone
    except BaseException as exc:
        try:
            answers.send(("failed", _portable(exc)))
        except BaseException:
            pass


def _serve(requests: Connection, answers: Connection, init: dict[str, Any]) -> None:
    from keepwell.process import tune_malloc

    tune_malloc()
    from keepwell.crypto import keyed_id
    from keepwell.repository.format import DATA
    from keepwell.repository.packer import BlobSink
    from keepwell.repository.repo import reopen_repository

    repo = reopen_repository(init["location"], init["options"], init["master"], init["config"],
                             init["key_id"])
    keys = np.fromfile(init["keys"], dtype=np.uint64) if init["keys"] else np.zeros(0, np.uint64)
    sink = BlobSink(repo, upload_workers=2, levels=repo.levels(init["kind"]))
    min_size = repo.chunker_params.min_size
    id_key = repo.id_key

    def known(blob_id: bytes) -> bool:
        if not len(keys):
            return False
        key = np.uint64(int.from_bytes(blob_id[:8], "big"))
        i = int(np.searchsorted(keys, key))
        return i < len(keys) and keys[i] == key

    def opened(path: str) -> int | OSError:
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

    def store(fd: int | OSError, size: int) -> tuple[list[bytes], int, str | None, list[bytes]]:
        try:
            if isinstance(fd, OSError):
                raise fd
            try:
                data = read_whole(fd, size)
            finally:
                os.close(fd)
        except OSError as exc:
            return [], 0, exc.strerror or str(exc), []
        ids: list[bytes] = []
        assumed: list[bytes] = []
        pieces = [data] if len(data) <= min_size else repo.chunker.chunks_of(data)
        for piece in pieces:
            if not piece:
                continue
            blob_id = keyed_id(id_key, piece)
            if known(blob_id):
                assumed.append(blob_id)
            else:
                sink.save(DATA, piece, blob_id)
            ids.append(blob_id)
        return ids, len(data), None, assumed

    try:
        while True:
            msg = requests.recv()
            if msg[0] == "close":
                break
            _, bid, files = msg
            # every file of the batch opened first, with the kernel told to read them ahead:
            # a cold disk then serves the batch's reads at once, not one after another
            fds = [opened(path) for path, _ in files]
            answers.send(("done", bid, [store(fd, size) for fd, (_, size) in zip(fds, files, strict=True)]))
        sink.flush()
    finally:
        sink.close()
    st = sink.stats
    answers.send(("closed", {"blobs_new": st.blobs_new, "blobs_known": st.blobs_known,
                          "bytes_raw_new": st.bytes_raw_new, "bytes_stored": st.bytes_stored,
                          "packs": st.packs}))


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it crosses a pipe intact, else one that says the same."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return KeepwellError(f"file reader: {exc}")
