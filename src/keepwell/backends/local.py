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
written and ``fdatasync`` has succeeded: what gets a name is known to be whole. The spool itself
is keepwell.backends.spool's; ``put`` of a spool of this backend is its `LocalSpool.commit`.

A test suite may change the module's behaviour (``KEEPWELL_TESTONLY_WRITE_HOOK=module:function``:
the function gets this module, and may replace the spool module's ``_os_write`` and
``_fdatasync``, through which every write and data sync goes) to fail writes the way a full or
failing disk does; nothing else sets it.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator

from keepwell import tokens
from keepwell.backends.base import ObjectInfo, check_name
from keepwell.backends.spool import TMP_PREFIX, Payload, Spool, classify, payload_pieces
from keepwell.errors import ObjectExistsError, ObjectNotFoundError

_classify = classify


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

    def open_spool(self, directory: str | None = None) -> LocalSpool:
        """A new object to be written piece by piece and stored with ``put`` (or
        `LocalSpool.commit`). ``directory`` is not used: a local spool lives on the
        repository's filesystem, to be linked into place."""
        try:
            return LocalSpool(self)
        except OSError as exc:
            raise _classify(exc, f"writing in {self.location}") from exc

    def put(self, name: str, data: Payload, *, overwrite: bool = False) -> None:
        self._path(name)  # an invalid name is refused before anything is written
        if isinstance(data, LocalSpool) and data.backend is self:
            data.commit(name, overwrite=overwrite)
            return
        spool = self.open_spool()
        try:
            if isinstance(data, Spool):
                for piece in payload_pieces(data):
                    spool.write(piece)
            else:
                spool.write(data)
        except BaseException:
            spool.close()
            raise
        spool.commit(name, overwrite=overwrite)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            with open(self._path(name), "rb", buffering=0) as f:
                if length is None:
                    f.seek(offset)
                    return f.read()
                return os.pread(f.fileno(), length, offset)
        except NotADirectoryError:  # a file where a folder on the way should be: no object
            raise ObjectNotFoundError(f"reading {name} in {self.location}: not found") from None
        except OSError as exc:
            raise _classify(exc, f"reading {name} in {self.location}") from exc

    def stat(self, name: str) -> ObjectInfo:
        try:
            st = os.stat(self._path(name))
        except NotADirectoryError:
            raise ObjectNotFoundError(f"{name} in {self.location}: not found") from None
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
                if entry.name.startswith(TMP_PREFIX):
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


class LocalSpool(Spool):
    """A spool (keepwell.backends.spool) on the repository's filesystem, invisible until
    `commit` links it under its name. Where the filesystem has no ``O_TMPFILE`` (or there is no
    /proc to link it from), the file is a hidden temporary one in the repository's top
    directory, which listings skip. A crash leaves nothing behind (``O_TMPFILE``) or that hidden
    file; `close` removes what is left."""

    def __init__(self, backend: LocalBackend) -> None:
        backend._ensure_dir(backend.root)
        super().__init__(backend.root, backend.location, linkable=True)
        self.backend = backend

    def commit(self, name: str, *, overwrite: bool = False) -> None:
        """Store what was written as object ``name`` (durably, as `LocalBackend.put` does), or
        raise `ObjectExistsError` if it exists and ``overwrite`` is not set. The spool is spent
        either way."""
        b = self.backend
        final = b._path(name)
        directory, base = os.path.split(final)
        dfd = -1
        try:
            self.seal(durable=True)  # what gets a name is known to be whole
            b._ensure_dir(directory)
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            fd = self.fileno()
            if self._tmp is None:
                # linkat(AT_SYMLINK_FOLLOW) of the /proc link gives the unnamed file a name;
                # a dir fd makes os.link call linkat (plain link() would not follow the link)
                source = f"/proc/self/fd/{fd}"
                if overwrite:  # an unnamed file cannot be renamed: name it beside, then rename
                    self._tmp = os.path.join(directory, f"{TMP_PREFIX}{tokens.token_hex(8)}")
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
            self.close()


def from_url(url: str, **options: object) -> LocalBackend:
    return LocalBackend(url[len("file://") :] if url.startswith("file://") else url)


def _install_test_hook() -> None:
    spec = os.environ.get("KEEPWELL_TESTONLY_WRITE_HOOK")
    if spec:
        module, _, function = spec.partition(":")
        getattr(importlib.import_module(module), function)(sys.modules[__name__])


_install_test_hook()
