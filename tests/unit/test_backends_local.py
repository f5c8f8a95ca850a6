from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepwell.backends.local import LocalBackend
from keepwell.backends.memory import MemoryBackend
from keepwell.backends.registry import open_backend
from keepwell.errors import ObjectExistsError, UsageError
from tests.backend_contract import BackendContract, SpoolContract, SpooledPuts


class TestLocalContract(BackendContract):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[LocalBackend]:
        yield LocalBackend(str(tmp_path / "repo"))


class TestSpooledLocalContract(SpoolContract):
    """Packs' path on a local repository: spools on its filesystem, linked into place."""

    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[SpooledPuts]:
        yield SpooledPuts(LocalBackend(str(tmp_path / "repo")))


class TestMemoryContract(BackendContract):
    @pytest.fixture
    def backend(self) -> Iterator[MemoryBackend]:
        yield MemoryBackend()


def test_local_leaves_no_temporary_files(tmp_path: Path) -> None:
    b = LocalBackend(str(tmp_path))
    b.put("data/00/x", b"1")
    try:
        b.put("data/00/x", b"2")
    except Exception:
        pass
    assert sorted(os.listdir(tmp_path / "data" / "00")) == ["x"]


def test_registry_picks_backend(tmp_path: Path) -> None:
    assert isinstance(open_backend(str(tmp_path)), LocalBackend)
    assert isinstance(open_backend(f"file://{tmp_path}"), LocalBackend)
    assert isinstance(open_backend("memory://x"), MemoryBackend)
    with pytest.raises(UsageError):
        open_backend("nope://x")


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named-temp-file"])
def test_local_spool_is_invisible_until_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  unnamed: bool) -> None:
    """A spooled object is written in pieces, seen by nobody until `commit` links it under its
    name (create-only, like `put`), and leaves no file behind when aborted or refused."""
    if not unnamed:
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    b = LocalBackend(str(tmp_path / "repo"))
    b.put("config", b"c")
    pieces = [os.urandom(n) for n in (10, 3 << 20, 5, 700_000, 600_000)]
    spool = b.open_spool()
    for p in pieces:
        spool.write(p)
    assert spool.size == sum(map(len, pieces))
    assert [i.name for i in b.list()] == ["config"]
    spool.commit("data/ab/abc")
    assert b.get("data/ab/abc") == b"".join(pieces)
    assert b.get("data/ab/abc", 3, 20) == b"".join(pieces)[3:23]

    again = b.open_spool()
    again.write(b"other bytes")
    with pytest.raises(ObjectExistsError):
        again.commit("data/ab/abc")
    assert b.get("data/ab/abc") == b"".join(pieces)

    dropped = b.open_spool()
    dropped.write(b"never stored")
    dropped.abort()
    replaced = b.open_spool()
    replaced.write(b"new")
    replaced.commit("data/ab/abc", overwrite=True)
    assert b.get("data/ab/abc") == b"new"
    assert sorted(os.listdir(tmp_path / "repo")) == ["config", "data"]
    assert os.listdir(tmp_path / "repo" / "data" / "ab") == ["abc"]


def test_packs_of_a_local_repository_are_spooled_not_held(tmp_path: Path) -> None:
    """A local repository's packs are written through the spool: a pack larger than the
    spool's buffer is stored whole and reads back, and no temporary file is left."""
    from keepwell.repository import Repository
    from keepwell.repository.check import check

    repo = Repository.init(LocalBackend(str(tmp_path / "repo")), "pw")
    data = os.urandom(3 << 20)
    with repo.new_snapshot("files", ["/x"]) as w:
        w.add_bytes("/x/f", data)
        snap = w.commit()
    assert b"".join(repo.iter_file(snap, "x/f")) == data
    assert check(repo, read_data_fraction=1.0).ok
    leftovers = [p for p in (tmp_path / "repo").rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []
