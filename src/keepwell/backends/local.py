"""The local filesystem backend.

Every object is written into an unnamed file on the repository's filesystem (``O_TMPFILE``; a
hidden temporary file where there is none), fsynced, and then linked into place (``link`` fails if
the name exists, which gives create-only semantics without a race), and the directory is
fsynced: after ``put`` returns, the object survives a power cut, and a crash at any moment
leaves either the whole object or nothing under its name.

`LocalBackend.open_spool` is that same path for an object written piece by piece whose name is
known only at the end (a pack, named by the hash of its bytes): the writer never holds the
object in memory, and the bytes are written once, not copied from a buffer into a file;
``put`` is one write into a spool. A spool hashes the bytes as the kernel accepts them, so the
name a pack gets is the hash of what is in its file; any failed write spoils the spool for good
(`commit` refuses it), and `commit` links the file only once its length is the count of bytes
written and ``fdatasync`` has succeeded: what gets a name is known to be whole.

Every write and data sync of the module goes through `_os_write` and `_fdatasync`. A test suite
may replace them (``KEEPWELL_TESTONLY_WRITE_HOOK=module:function``: the function gets this
module) to fail writes the way a full or failing disk does; nothing else sets them.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from collections.abc import Iterator

import blake3

from keepwell import tokens
from keepwell.backends.base import ObjectInfo, check_name
from keepwell.errors import (
    ObjectExistsError,
    ObjectNotFoundError,
    PermanentBackendError,
    TransientBackendError,
)

_TMP_PREFIX = ".tmp-"
_SPOOL_BUFFER = 1024 * 1024  # small pieces are gathered up to this much per write

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
}


def _classify(exc: OSError, what: str) -> Exception:
    if exc.errno == errno.ENOENT:
        return ObjectNotFoundError(f"{what}: not found")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermanentBackendError(f"{what}: {exc.strerror}")
    if exc.errno in _PERMANENT:
        message, hint = _PERMANENT[exc.errno]
        return PermanentBackendError(f"{what}: {message}", hint=hint)
    return TransientBackendError(f"{what}: {exc.strerror or exc}")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBackend:
    def __init__(self, path: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(path))
        self.location = self.root
        self._known_dirs: set[str] = set()

    def _path(self, name: str) -> str:
        return os.path.join(self.root, *check_name(name).split("/"))

    def _ensure_dir(self, directory: str) -> None:
        if directory in self._known_dirs:
            return
        if not os.path.isdir(directory):
            parent = os.path.dirname(directory)
            if parent != directory:
                self._ensure_dir(parent)
            try:
                os.mkdir(directory, 0o700)
                _fsync_dir(parent)
            except FileExistsError:
                pass
        self._known_dirs.add(directory)

    def open_spool(self) -> LocalSpool:
        """A new object to be written piece by piece and stored with `LocalSpool.commit`."""
        try:
            return LocalSpool(self)
        except OSError as exc:
            raise _classify(exc, f"writing in {self.location}") from exc

    def put(self, name: str, data: bytes | bytearray | memoryview, *, overwrite: bool = False) -> None:
        self._path(name)  # an invalid name is refused before anything is written
        spool = self.open_spool()
        try:
            spool.write(data)
        except BaseException:
            spool.abort()
            raise
        spool.commit(name, overwrite=overwrite)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            with open(self._path(name), "rb", buffering=0) as f:
                if length is None:
                    f.seek(offset)
                    return f.read()
                return os.pread(f.fileno(), length, offset)
        except OSError as exc:
            raise _classify(exc, f"reading {name} in {self.location}") from exc

    def stat(self, name: str) -> ObjectInfo:
        try:
            st = os.stat(self._path(name))
        except OSError as exc:
            raise _classify(exc, f"{name} in {self.location}") from exc
        return ObjectInfo(name, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Walk only the part of the tree the prefix can be in.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = os.path.join(self.root, *base.split("/")) if base else self.root
        if not os.path.isdir(start):
            return
        stack = [(start, base)]
        while stack:
            directory, rel = stack.pop()
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _classify(exc, f"listing {rel or '/'} in {self.location}") from exc
            subdirs = []
            for entry in entries:
                if entry.name.startswith(_TMP_PREFIX):
                    continue
                name = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    if name.startswith(prefix) or prefix.startswith(name + "/"):
                        subdirs.append((entry.path, name))
                elif name.startswith(prefix):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    yield ObjectInfo(name, st.st_size, st.st_mtime)
            stack.extend(reversed(subdirs))

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except OSError as exc:
            raise _classify(exc, f"deleting {name} in {self.location}") from exc

    def close(self) -> None:
        pass


class LocalSpool:
    """An object being written into a file of the repository's filesystem, invisible until
    `commit` links it under its name. Where the filesystem has no ``O_TMPFILE`` (or there is no
    /proc to link it from), the file is a hidden temporary one in the repository's top
    directory, which listings skip. A crash leaves nothing behind (``O_TMPFILE``) or that hidden
    file; `abort` removes what is left.

    ``size`` counts the bytes handed to `write`; `hexdigest` is the hash of the bytes the kernel
    accepted, in order. A write that fails (or stores nothing) spoils the spool: every later call
    but `abort` raises, so a caller can never name or store a file with a hole in it."""

    def __init__(self, backend: LocalBackend) -> None:
        self._backend = backend
        self._buf = bytearray()
        self.size = 0
        self._written = 0
        self._hash = blake3.blake3()
        self._failed: BaseException | None = None
        self._tmp: str | None = None
        backend._ensure_dir(backend.root)
        flag = getattr(os, "O_TMPFILE", 0)
        self._fd = -1
        if flag and os.path.isdir("/proc/self/fd"):
            try:
                self._fd = os.open(backend.root, flag | os.O_WRONLY, 0o600)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
        if self._fd < 0:
            self._tmp = os.path.join(backend.root, f"{_TMP_PREFIX}{tokens.token_hex(8)}")
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._usable()
        self.size += len(data)
        try:
            if len(self._buf) + len(data) > _SPOOL_BUFFER:
                self._flush()
            if len(data) >= _SPOOL_BUFFER:
                self._write_all(data)
            else:
                self._buf += data
        except OSError as exc:
            self._failed = _classify(exc, f"writing in {self._backend.location}")
            raise self._failed from exc
        except BaseException as exc:
            self._failed = exc
            raise

    def _usable(self) -> None:
        if self._failed is not None:
            raise PermanentBackendError(
                f"writing in {self._backend.location}: an earlier write of this object failed "
                f"({self._failed})", hint="the object is not stored; run the command again")
        if self._fd < 0:
            raise ValueError("the spool was committed or aborted")

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
        self._usable()
        try:
            self._flush()
        except OSError as exc:
            self._failed = _classify(exc, f"writing in {self._backend.location}")
            raise self._failed from exc
        return self._hash.hexdigest()

    def _check_whole(self) -> None:
        """Raise unless the file holds exactly the bytes written, durably."""
        _fdatasync(self._fd)
        length = os.fstat(self._fd).st_size
        if self._written != self.size or length != self.size:
            raise PermanentBackendError(
                f"writing in {self._backend.location}: the file holds {length} of the "
                f"{self.size} bytes written", hint="the object is not stored; run the command again")

    def commit(self, name: str, *, overwrite: bool = False) -> None:
        """Store what was written as object ``name`` (durably, as `LocalBackend.put` does), or
        raise `ObjectExistsError` if it exists and ``overwrite`` is not set. The spool is spent
        either way."""
        b = self._backend
        final = b._path(name)
        directory, base = os.path.split(final)
        dfd = -1
        try:
            self._usable()
            self._flush()
            self._check_whole()
            b._ensure_dir(directory)
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            if self._tmp is None:
                # linkat(AT_SYMLINK_FOLLOW) of the /proc link gives the unnamed file a name;
                # a dir fd makes os.link call linkat (plain link() would not follow the link)
                source = f"/proc/self/fd/{self._fd}"
                if overwrite:  # an unnamed file cannot be renamed: name it beside, then rename
                    self._tmp = os.path.join(directory, f"{_TMP_PREFIX}{tokens.token_hex(8)}")
                    os.link(source, self._tmp, src_dir_fd=dfd, follow_symlinks=True)
                    source = self._tmp
            else:
                source = self._tmp
            if overwrite:
                os.replace(source, final)
                self._tmp = None
            else:
                try:
                    os.link(source, base, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=True)
                except FileExistsError:
                    raise ObjectExistsError(f"{name} already exists in {b.location}") from None
            os.fsync(dfd)
        except OSError as exc:
            raise _classify(exc, f"writing {name} in {b.location}") from exc
        finally:
            if dfd >= 0:
                os.close(dfd)
            self.abort()

    def abort(self) -> None:
        """Drop what was written (nothing stays on disk)."""
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


def _install_test_hook() -> None:
    spec = os.environ.get("KEEPWELL_TESTONLY_WRITE_HOOK")
    if spec:
        module, _, function = spec.partition(":")
        getattr(importlib.import_module(module), function)(sys.modules[__name__])


def from_url(url: str, **options: object) -> LocalBackend:
    return LocalBackend(url[len("file://") :] if url.startswith("file://") else url)


_install_test_hook()
