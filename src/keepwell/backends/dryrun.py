"""A wrapper that writes nothing: what ``backup --dry-run`` runs on.

`DryRunBackend` reads through to the backend it wraps and drops every write: ``put`` records
only the name and size of what would have been stored, ``delete`` forgets such an object again
and refuses any other (a dry run never removes what is stored). Everything above it (packs,
index objects, the session, the snapshot) runs as in a real run, so the counts it leaves are the
real ones, and the repository is left as it was: not one object added, changed or removed.

It offers no ``open_spool``: packs are built in memory, never in a spool file inside a local
repository. It does not keep what it dropped, so reading such an object back fails as reading a
missing object does; no writer of a backup reads back what it wrote.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from keepwell.backends.base import Backend, ObjectInfo
from keepwell.backends.spool import Payload
from keepwell.errors import PermanentBackendError


class DryRunBackend:
    """Reads pass through; writes are counted and dropped (see the module doc)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.location = inner.location
        self._lock = threading.Lock()
        self.dropped: dict[str, int] = {}  # name -> size of what a real run would have stored

    def put(self, name: str, data: Payload, *, overwrite: bool = False) -> None:
        with self._lock:
            self.dropped[name] = len(data)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(name, offset, length)

    def stat(self, name: str) -> ObjectInfo:
        return self.inner.stat(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        with self._lock:
            if self.dropped.pop(name, None) is not None:
                return
        raise PermanentBackendError(f"a dry run removes nothing, but {name} was to be removed")

    def bind(self, key: str) -> None:
        """Narrow the local cache below (if any) to one repository (`CachedBackend.bind`)."""
        bind = getattr(self.inner, "bind", None)
        if bind is not None:
            bind(key)

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"DryRunBackend({self.inner!r})"
