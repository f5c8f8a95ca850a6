"""The storage interface: a dumb key/value store of immutable objects.

A backend knows nothing of the repository format. Names are relative, slash-separated keys such
as ``data/ab/ab12…`` or ``snapshots/9f…``. Every backend gives the same guarantees:

* ``put`` is atomic (a reader sees the whole object or none) and durable when it returns; with
  ``overwrite=False`` (the default) it never replaces an existing object and raises
  `ObjectExistsError` instead.
* ``get`` reads the whole object or a byte range of it.
* errors are classified: `ObjectNotFoundError`, `TransientBackendError` (worth a retry) and
  `PermanentBackendError`; nothing else escapes.

A payload of ``put`` is bytes or a `keepwell.backends.spool.Spool`, an object written into a
local file beforehand, which ``put`` reads from the start as often as it tries. A backend that
offers ``open_spool(directory=None)`` (the local and the remote ones; wrappers pass it on) gives
out spools for it: a writer of large objects (packs) builds them there instead of in memory.

Retries, rate limits, circuit breaking and caching are wrappers (`keepwell.backends.wrappers`)
that any backend can wear; they are never written into a backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from keepwell.backends.spool import Payload


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    name: str
    size: int
    # when the object was last written (seconds since the epoch), where the backend tells
    mtime: float | None = field(default=None, compare=False)


@runtime_checkable
class Backend(Protocol):
    """What every storage backend implements."""

    location: str

    def put(self, name: str, data: Payload, *, overwrite: bool = False) -> None: ...

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes: ...

    def stat(self, name: str) -> ObjectInfo: ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    def delete(self, name: str) -> None: ...

    def close(self) -> None: ...


def check_name(name: str) -> str:
    """Reject names that could escape the store or alias another object."""
    if not name or name.startswith("/") or name.endswith("/"):
        raise ValueError(f"invalid object name {name!r}")
    for part in name.split("/"):
        if part in ("", ".", "..") or "\\" in part or "\0" in part:
            raise ValueError(f"invalid object name {name!r}")
    return name
