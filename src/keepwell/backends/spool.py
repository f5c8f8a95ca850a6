"""Spools: objects written piece by piece into an unnamed local file, then stored from it.

Words:
    spool      an object being written into a file no other process can see (``O_TMPFILE``;
               where a filesystem has none, a hidden temporary file), hashed as the kernel
               accepts its bytes, so that it is named by what its file holds. A pack is built in
               one: the writer never holds the pack in memory.
    payload    what `Backend.put` stores: bytes, or a `Spool`, whose bytes the backend reads
               from its file (`Spool.pieces`, `Spool.mapped`), from the start, as many times as
               it tries; a spool's owner closes it once ``put`` has returned or finally failed.
    spoiled    a spool one of whose writes failed: every later call but `Spool.close` raises,
               so a file with a hole in it can be neither named nor stored.

Where a spool lives is the backend's business: the local backend keeps it on the repository's
filesystem and links it into place (keepwell.backends.local.LocalSpool); a remote backend keeps
it in the cache directory, else ``$TMPDIR`` (`open_spool`), and uploads from it. A crash leaves
nothing behind: the file has no name (a hidden temporary file of a remote backend's spool is
unlinked as soon as it is made).

Every write and data sync of a spool goes through `_os_write` and `_fdatasync`. A test suite may
replace them (through the local backend's test hook, ``KEEPWELL_TESTONLY_WRITE_HOOK``) to fail
writes the way a full or failing disk does; nothing else sets them.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import tempfile
import time
from collections.abc import Iterator

import blake3

from keepwell import tokens
from keepwell.errors import (
    KeepwellError,
    ObjectNotFoundError,
    PermanentBackendError,
    TransientBackendError,
)

TMP_PREFIX = ".tmp-"
_BUFFER = 1024 * 1024  # small pieces are gathered up to this much per write
READ_PIECE = 1024 * 1024  # what `Spool.pieces` reads at a time

_os_write = os.write
_fdatasync = os.fdatasync

# errors of a local disk that no retry cures, with what to do about each
_PERMANENT = {
    errno.ENOSPC: ("no space left on device", "free some space, then run the command again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or raise the quota, then run the "
                                          "command again"),
    errno.EFBIG: ("file too large for the filesystem", "use a filesystem that holds larger files"),
    errno.EIO: ("input/output error", "the disk failed a write; check it (dmesg, smartctl) "
                                      "before trusting it with backups"),
    errno.ENOTDIR: ("not a directory", "a file stands where the repository or one of its "
                                       "folders should be: check --repo / KEEPWELL_REPOSITORY"),
}


def classify(exc: OSError, what: str) -> KeepwellError:
    """The keepwell error an error of a local disk means."""
    if exc.errno == errno.ENOENT:
        return ObjectNotFoundError(f"{what}: not found")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermanentBackendError(f"{what}: {exc.strerror}")
    if exc.errno in _PERMANENT:
        message, hint = _PERMANENT[exc.errno]
        return PermanentBackendError(f"{what}: {message}", hint=hint)
    return TransientBackendError(f"{what}: {exc.strerror or exc}")


def open_upload_spool(directory: str | None, location: str) -> Spool:
    """A remote backend's spool (its ``open_spool``), for an object going to ``location``: in
    ``directory`` (the cache directory), else in the system's temporary directory
    (``$TMPDIR``, else /tmp)."""
    where = directory or tempfile.gettempdir()
    try:
        return Spool(where, location)
    except OSError as exc:
        raise classify(exc, f"making a spool file in {where}") from exc


class Spool:
    """An object being written into an unnamed file in ``directory`` (see the module doc).

    ``linkable``: the file must be able to get a name later (the local backend links it into
    the repository): an ``O_TMPFILE`` is used only where /proc can name it, and the fallback is
    a hidden temporary file left in place (`close` removes it). Otherwise the fallback file is
    unlinked at once.

    ``size`` counts the bytes handed to `write`; `hexdigest` is the hash of the bytes the kernel
    accepted, in order."""

    def __init__(self, directory: str, location: str, *, linkable: bool = False) -> None:
        self.directory = directory
        self.location = location  # for messages: where the spooled object is going
        self._buf = bytearray()
        self.size = 0
        self._written = 0
        self._hash = blake3.blake3()
        self._failed: BaseException | None = None
        self._tmp: str | None = None  # the hidden file's path while it has a name
        self._fd = -1
        flag = getattr(os, "O_TMPFILE", 0)
        if flag and (not linkable or os.path.isdir("/proc/self/fd")):
            try:
                self._fd = os.open(directory, flag | os.O_RDWR, 0o600)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
        if self._fd < 0:
            self._tmp = os.path.join(directory, f"{TMP_PREFIX}{tokens.token_hex(8)}")
            self._fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            if not linkable:
                os.unlink(self._tmp)
                self._tmp = None

    def __len__(self) -> int:
        return self.size

    # -- writing ------------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._usable()
        self.size += len(data)
        try:
            if len(self._buf) + len(data) > _BUFFER:
                self._flush()
            if len(data) >= _BUFFER:
                self._write_all(data)
            else:
                self._buf += data
        except OSError as exc:
            self._failed = classify(exc, f"writing a spool file in {self.directory}")
            raise self._failed from exc
        except BaseException as exc:
            self._failed = exc
            raise

    def _usable(self) -> None:
        if self._failed is not None:
            raise PermanentBackendError(
                f"writing in {self.location}: an earlier write of this object failed "
                f"({self._failed})", hint="the object is not stored; run the command again")
        if self._fd < 0:
            raise ValueError("the spool was stored or closed")

    def _flush(self) -> None:
        if self._buf:
            self._write_all(self._buf)
            self._buf.clear()

    def _write_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = _os_write(self._fd, view)
            if n <= 0:  # a regular file takes nothing only when the filesystem has no room
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._hash.update(view[:n])
            self._written += n
            view = view[n:]

    def hexdigest(self) -> str:
        """The hash of everything written so far (gathered pieces are written out first)."""
        self.seal()
        return self._hash.hexdigest()

    def seal(self, *, durable: bool = False) -> None:
        """Write out what is gathered and raise unless the file holds exactly the bytes
        written (``durable``: and they are on the disk)."""
        self._usable()
        try:
            self._flush()
            if durable:
                _fdatasync(self._fd)
            length = os.fstat(self._fd).st_size
        except OSError as exc:
            self._failed = classify(exc, f"writing a spool file in {self.directory}")
            raise self._failed from exc
        if self._written != self.size or length != self.size:
            self._failed = PermanentBackendError(
                f"writing in {self.location}: the spool file holds {length} of the "
                f"{self.size} bytes written", hint="the object is not stored; run the command again")
            raise self._failed

    # -- reading back (as often as a backend tries to store it) --------------------------------
    @contextlib.contextmanager
    def mapped(self) -> Iterator[memoryview | bytes]:
        """The spool's bytes as a read-only map of its file: an upload reads them from the page
        cache without a copy in this process's heap (each attempt maps the file anew)."""
        self.seal()
        if self.size == 0:  # nothing to map
            yield b""
            return
        m = mmap.mmap(self._fd, self.size, prot=mmap.PROT_READ)
        view = memoryview(m)
        try:
            yield view
        finally:
            # A request that failed may still hold the buffer in a task of the HTTP client,
            # which lets go once it runs again (it needs this thread to yield the interpreter):
            # wait for that, a bounded time, so that a failed run frees its spool files when it
            # ends. A client that holds on longer (a connection stuck in the kernel) keeps the
            # map, and its descriptor, until it lets go; no frame of an error's traceback may
            # keep it longer, and the error of the request is what the caller must see.
            _unmap(view, m)
            del view, m

    def pieces(self, piece: int = READ_PIECE) -> Iterator[bytes]:
        """The spool's bytes, from the start, ``piece`` bytes at a time."""
        self.seal()
        for offset in range(0, self.size, piece):
            data = os.pread(self._fd, min(piece, self.size - offset), offset)
            if not data:
                raise PermanentBackendError(f"reading the spool of an object for {self.location}: "
                                            f"it ends at {offset} of {self.size} bytes")
            yield data

    def read_all(self) -> bytes:
        """All of the spool's bytes (for comparisons; uploads read `pieces` or a `reader`)."""
        return b"".join(self.pieces())

    def fileno(self) -> int:
        self._usable()
        return self._fd

    # -- the end ------------------------------------------------------------------------------
    def close(self) -> None:
        """Drop what was written (nothing stays on disk). Idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
            self._tmp = None
        self._buf = bytearray()

    abort = close


Payload = bytes | bytearray | memoryview | Spool


def payload_bytes(data: Payload) -> bytes | bytearray | memoryview:
    """The bytes of a payload, in memory (for backends that keep objects in memory)."""
    return data.read_all() if isinstance(data, Spool) else data


def payload_pieces(data: Payload, piece: int = READ_PIECE) -> Iterator[bytes | memoryview]:
    """A payload's bytes from the start, at most ``piece`` at a time."""
    if isinstance(data, Spool):
        yield from data.pieces(piece)
        return
    view = memoryview(data).cast("B")
    for start in range(0, len(view), piece):
        yield view[start:start + piece]


def same_bytes(stored: bytes, data: Payload) -> bool:
    """Whether ``stored`` is exactly the payload."""
    if isinstance(data, Spool):
        return len(stored) == data.size and blake3.blake3(stored).hexdigest() == data.hexdigest()
    return stored == data


_LET_GO = 5.0  # seconds the end of a failed upload waits for the HTTP client to drop its map


def _unmap(view: memoryview, m: mmap.mmap) -> None:
    """Release ``view`` and close ``m`` once nothing else holds a buffer of them, waiting up to
    `_LET_GO` seconds (with the interpreter yielded, as the holder needs it to let go)."""
    deadline = time.monotonic() + _LET_GO
    pause = 0.0005
    while True:
        try:
            view.release()
            m.close()
            return
        except BufferError:
            if time.monotonic() >= deadline:
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

