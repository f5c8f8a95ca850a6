"""The one contract every backend must pass.

A test module subclasses `BackendContract` and provides a ``backend`` fixture yielding a fresh,
empty backend; every test here then runs against it (local, memory, S3, SFTP, wrappers).
"""

from __future__ import annotations

import os
import threading

import pytest

from keepwell.backends.base import Backend, ObjectInfo
from keepwell.errors import ObjectExistsError, ObjectNotFoundError


class BackendContract:
    def test_put_get_roundtrip(self, backend: Backend) -> None:
        data = os.urandom(100_000)
        backend.put("data/ab/abcdef", data)
        assert backend.get("data/ab/abcdef") == data

    def test_empty_object(self, backend: Backend) -> None:
        backend.put("snapshots/empty", b"")
        assert backend.get("snapshots/empty") == b""
        assert backend.stat("snapshots/empty") == ObjectInfo("snapshots/empty", 0)

    def test_ranged_get(self, backend: Backend) -> None:
        data = bytes(range(256)) * 40
        backend.put("data/00/ranged", data)
        assert backend.get("data/00/ranged", 10, 20) == data[10:30]
        assert backend.get("data/00/ranged", 5000) == data[5000:]
        assert backend.get("data/00/ranged", len(data) - 3, 3) == data[-3:]

    def test_create_only(self, backend: Backend) -> None:
        backend.put("index/one", b"first")
        with pytest.raises(ObjectExistsError):
            backend.put("index/one", b"second")
        assert backend.get("index/one") == b"first"

    def test_overwrite_when_asked(self, backend: Backend) -> None:
        backend.put("sessions/s1", b"a")
        backend.put("sessions/s1", b"bb", overwrite=True)
        assert backend.get("sessions/s1") == b"bb"

    def test_not_found(self, backend: Backend) -> None:
        with pytest.raises(ObjectNotFoundError):
            backend.get("data/ff/missing")
        with pytest.raises(ObjectNotFoundError):
            backend.stat("data/ff/missing")
        with pytest.raises(ObjectNotFoundError):
            backend.delete("data/ff/missing")

    def test_stat_size(self, backend: Backend) -> None:
        backend.put("keys/k1", b"x" * 1234)
        assert backend.stat("keys/k1").size == 1234

    def test_list_prefix(self, backend: Backend) -> None:
        for name in ["data/00/a", "data/01/b", "data/01/c", "index/x", "snapshots/y", "config"]:
            backend.put(name, name.encode())
        assert sorted(i.name for i in backend.list("data/")) == ["data/00/a", "data/01/b", "data/01/c"]
        assert [i.name for i in backend.list("index/")] == ["index/x"]
        assert sorted(i.name for i in backend.list("data/01/")) == ["data/01/b", "data/01/c"]
        assert {i.name: i.size for i in backend.list("")}["config"] == len(b"config")
        assert list(backend.list("locks/")) == []

    def test_delete(self, backend: Backend) -> None:
        backend.put("data/aa/del", b"1")
        backend.delete("data/aa/del")
        with pytest.raises(ObjectNotFoundError):
            backend.get("data/aa/del")
        assert [i.name for i in backend.list("data/")] == []

    def test_concurrent_create_only_one_wins(self, backend: Backend) -> None:
        winners: list[int] = []
        errors: list[BaseException] = []

        def attempt(i: int) -> None:
            try:
                backend.put("config", str(i).encode())
                winners.append(i)
            except ObjectExistsError:
                pass
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(winners) == 1
        assert backend.get("config") == str(winners[0]).encode()

    def test_large_object(self, backend: Backend) -> None:
        data = os.urandom(9 * 1024 * 1024)
        backend.put("data/bb/large", data)
        assert backend.get("data/bb/large") == data
        assert backend.get("data/bb/large", 8 * 1024 * 1024, 1024) == data[8 * 1024 * 1024 :][:1024]

    def test_invalid_names_rejected(self, backend: Backend) -> None:
        for bad in ["../escape", "/abs", "data//x", "data/./x"]:
            with pytest.raises(ValueError):
                backend.put(bad, b"x")
