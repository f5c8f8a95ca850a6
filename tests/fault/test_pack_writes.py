"""A pack is indexed only once it is known whole, whatever the storage under it does.

The engine's own guard (keepwell.repository.packer) is tested here on a storage that does not
guard itself: its spool takes half of a failing write and would go on taking more, as a naive
file wrapper would. The spool's guard (a failed write spoils it) is tested through the
real filesystem code with a write that fails at the system call."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest

from keepwell.backends import spool as spool_module
from keepwell.backends.local import LocalBackend
from keepwell.backends.memory import MemoryBackend
from keepwell.backends.spool import Spool
from keepwell.crypto import content_name, keyed_id
from keepwell.errors import KeepwellError, PermanentBackendError
from keepwell.repository import Repository
from keepwell.repository.check import check


class _HalfWritingSpool(Spool):
    """Keeps half of its ``fail_at``-th write, raises, and would then carry on as if whole."""

    def __init__(self, backend: _HalfWritingBackend) -> None:
        super().__init__(tempfile.gettempdir(), backend.location)
        self.backend = backend

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.backend.writes += 1
        if self.backend.writes == self.backend.fail_at:
            super().write(data[: len(data) // 2])
            raise OSError(errno.EIO, "input/output error")
        super().write(data)


class _HalfWritingBackend(MemoryBackend):
    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.writes = 0

    def open_spool(self, directory: str | None = None) -> _HalfWritingSpool:
        return _HalfWritingSpool(self)


@pytest.mark.parametrize("fail_at", [1, 2, 5, 9])
def test_a_pack_with_a_failed_write_is_never_stored_nor_indexed(fail_at: int) -> None:
    backend = _HalfWritingBackend(fail_at)
    repo = Repository.init(backend, "pw")
    pieces = [os.urandom(300_000) for _ in range(12)]
    with pytest.raises(OSError), repo.new_snapshot("stdin", ["x"]) as w:
        for i, piece in enumerate(pieces):
            w.add_bytes(f"f{i}", piece)
        w.commit()
    report = check(repo, read_data_fraction=1.0)
    assert report.ok, report.errors
    assert not list(backend.list("snapshots/"))
    again = Repository.open(backend, "pw")
    for piece in pieces:  # nothing indexed claims a blob the repository does not hold whole
        blob_id = keyed_id(again.id_key, piece)
        if again.index.has(blob_id):
            assert again.load_blob(blob_id) == piece


def test_a_failed_system_write_spoils_the_local_spool(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    backend = LocalBackend(str(tmp_path / "repo"))
    real = spool_module._os_write
    calls = []

    def write(fd: int, data: memoryview) -> int:
        calls.append(len(data))
        if len(calls) == 2:  # half of it lands, then the disk is full
            real(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "no space left on device")
        return int(real(fd, data))

    monkeypatch.setattr(spool_module, "_os_write", write)
    spool = backend.open_spool()
    spool.write(os.urandom(2 << 20))
    with pytest.raises(PermanentBackendError, match="no space left"):
        spool.write(os.urandom(2 << 20))
    with pytest.raises(KeepwellError, match="an earlier write of this object failed"):
        spool.write(b"more")
    with pytest.raises(KeepwellError, match="an earlier write of this object failed"):
        spool.commit("data/ab/abcd")
    assert not (tmp_path / "repo" / "data").exists()


def test_a_write_that_stores_nothing_is_a_full_disk(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that returns 0 would loop forever; it is the filesystem saying it has no room."""
    monkeypatch.setattr(spool_module, "_os_write", lambda fd, data: 0)
    spool = LocalBackend(str(tmp_path / "repo")).open_spool()
    with pytest.raises(PermanentBackendError, match="no space left"):
        spool.write(os.urandom(2 << 20))
    spool.abort()


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = spool_module._os_write
    monkeypatch.setattr(spool_module, "_os_write", lambda fd, data: real(fd, data[:4097]))
    backend = LocalBackend(str(tmp_path / "repo"))
    data = os.urandom(3 << 20)
    spool = backend.open_spool()
    spool.write(data)
    assert spool.hexdigest() == content_name(data)
    spool.commit("data/ab/abcd")
    assert backend.get("data/ab/abcd") == data
