"""The one contract every backend must pass.

A test module subclasses `BackendContract` and provides a ``backend`` fixture yielding a fresh,
empty backend; every test here then runs against it (local, memory, S3, SFTP, wrappers).

`SpooledPuts` runs the same contract over the path packs take: each object is first written
into a spool of the backend (keepwell.backends.spool), in pieces, and ``put`` stores it from
there; `SpoolContract` and `RemoteSpoolContract` add what only spools have. `open_spool_files` tells which spool files a
process still holds open (an unnamed file is freed when its last descriptor is closed).
"""

from __future__ import annotations

import os
import threading

import pytest

from keepwell.backends.base import Backend, ObjectInfo
from keepwell.backends.spool import Payload, Spool, payload_pieces
from keepwell.backends.wrappers import _Wrapper
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


def open_spool_files(directory: str | os.PathLike[str]) -> list[str]:
    """The files in ``directory`` (named, or unnamed and not yet freed) this process holds open."""
    where = os.path.realpath(directory) + "/"
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(where):
            found.append(target)
    return found


class SpooledPuts(_Wrapper):
    """A backend whose every ``put`` goes through a spool of ``inner`` (in ``directory``),
    written in uneven pieces, as a pack is; the spool is closed once ``put`` has returned or
    failed, as the pack writer does. Everything else is ``inner``'s own."""

    def __init__(self, inner: Backend, directory: str | None = None) -> None:
        super().__init__(inner)
        self.directory = directory
        self.spooled = 0
        self.last_directory = ""  # where the last spool was

    def put(self, name: str, data: Payload, *, overwrite: bool = False) -> None:
        spool = self.open_spool(self.directory)
        assert isinstance(spool, Spool)
        self.last_directory = spool.directory
        try:
            sizes = iter([1, 7, 100_000, 1 << 20, 3 << 20] * 1000)
            for piece in payload_pieces(data, 1 << 20):
                view = memoryview(piece)
                while view:
                    n = next(sizes)
                    spool.write(view[:n])
                    view = view[n:]
            self.inner.put(name, spool, overwrite=overwrite)
            self.spooled += 1
        finally:
            spool.close()


class SpoolContract(BackendContract):
    """The contract over `SpooledPuts` (the ``backend`` fixture yields one), and what spools
    add to it."""

    def test_spool_files_are_freed_when_closed(self, backend: Backend) -> None:
        backend.put("data/dd/x", os.urandom(2 * 1024 * 1024))
        with pytest.raises(ObjectExistsError):
            backend.put("data/dd/x", b"other")
        assert backend.spooled == 1  # type: ignore[attr-defined]
        directory = backend.last_directory  # type: ignore[attr-defined]
        assert open_spool_files(directory) == []
        assert [n for n in os.listdir(directory) if n.startswith(".tmp-")] == []


class RemoteSpoolContract(SpoolContract):
    """A remote backend uploads a spool from its file, which stays whole until its owner closes
    it: a retry reads it again from the start. (A local spool is spent by the ``put`` that
    links it into place.)"""

    def test_a_spool_is_stored_from_its_file_as_often_as_asked(self, backend: Backend) -> None:
        inner = backend.inner  # type: ignore[attr-defined]
        spool = inner.open_spool(backend.directory)  # type: ignore[attr-defined]
        data = os.urandom(5 * 1024 * 1024 + 3)
        try:
            spool.write(data)
            inner.put("data/cc/first", spool)
            # a failed put leaves the spool whole: the caller may try again, from the start
            with pytest.raises(ObjectExistsError):
                inner.put("data/cc/first", spool)
            inner.put("data/cc/second", spool)
        finally:
            spool.close()
        assert backend.get("data/cc/first") == data
        assert backend.get("data/cc/second") == data
