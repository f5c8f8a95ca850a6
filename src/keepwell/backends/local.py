"""The local filesystem backend.

Every object is written to a temporary file beside its final place, fsynced, and then linked into
place (``link`` fails if the name exists, which gives create-only semantics without a race), and
the directory is fsynced: after ``put`` returns, the object survives a power cut, and a crash at
any moment leaves either the whole object or nothing under its name.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator

from keepwell.backends.base import ObjectInfo, check_name
from keepwell.errors import (
    ObjectExistsError,
    ObjectNotFoundError,
    PermanentBackendError,
    TransientBackendError,
)

_TMP_PREFIX = ".tmp-"


def _classify(exc: OSError, what: str) -> Exception:
    if exc.errno == errno.ENOENT:
        return ObjectNotFoundError(f"{what}: not found")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermanentBackendError(f"{what}: {exc.strerror}")
    if exc.errno == errno.ENOSPC:
        return PermanentBackendError(f"{what}: no space left on device", hint="free some space")
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

    def put(self, name: str, data: bytes | bytearray | memoryview, *, overwrite: bool = False) -> None:
        final = self._path(name)
        directory = os.path.dirname(final)
        tmp = os.path.join(directory, f"{_TMP_PREFIX}{secrets.token_hex(8)}")
        try:
            self._ensure_dir(directory)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if overwrite:
                os.replace(tmp, final)
            else:
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    raise ObjectExistsError(f"{name} already exists in {self.location}") from None
                finally:
                    os.unlink(tmp)
            _fsync_dir(directory)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise _classify(exc, f"writing {name} in {self.location}") from exc

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
        return ObjectInfo(name, st.st_size)

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
                        size = entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
                    yield ObjectInfo(name, size)
            stack.extend(reversed(subdirs))

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except OSError as exc:
            raise _classify(exc, f"deleting {name} in {self.location}") from exc

    def close(self) -> None:
        pass


def from_url(url: str, **options: object) -> LocalBackend:
    return LocalBackend(url[len("file://") :] if url.startswith("file://") else url)
