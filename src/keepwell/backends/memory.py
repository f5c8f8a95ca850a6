"""An in-memory backend: fast unit tests and a reference for the contract suite."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from keepwell.backends.base import ObjectInfo, check_name
from keepwell.backends.spool import Payload, payload_bytes
from keepwell.errors import ObjectExistsError, ObjectNotFoundError


class MemoryBackend:
    def __init__(self, location: str = "memory://") -> None:
        self.location = location
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, name: str, data: Payload, *, overwrite: bool = False) -> None:
        check_name(name)
        data = bytes(payload_bytes(data))
        with self._lock:
            if not overwrite and name in self._objects:
                raise ObjectExistsError(f"{name} already exists in {self.location}")
            self._objects[name] = data

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        with self._lock:
            try:
                data = self._objects[name]
            except KeyError:
                raise ObjectNotFoundError(f"{name} not found in {self.location}") from None
        end = len(data) if length is None else offset + length
        return data[offset:end]

    def stat(self, name: str) -> ObjectInfo:
        with self._lock:
            if name not in self._objects:
                raise ObjectNotFoundError(f"{name} not found in {self.location}")
            return ObjectInfo(name, len(self._objects[name]))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            items = [ObjectInfo(n, len(d)) for n, d in self._objects.items() if n.startswith(prefix)]
        return iter(sorted(items, key=lambda i: i.name))

    def delete(self, name: str) -> None:
        with self._lock:
            if self._objects.pop(name, None) is None:
                raise ObjectNotFoundError(f"{name} not found in {self.location}")

    def close(self) -> None:
        pass
