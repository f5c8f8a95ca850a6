from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepwell.backends.local import LocalBackend
from keepwell.backends.memory import MemoryBackend
from keepwell.backends.registry import open_backend
from keepwell.errors import UsageError
from tests.backend_contract import BackendContract


class TestLocalContract(BackendContract):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[LocalBackend]:
        yield LocalBackend(str(tmp_path / "repo"))


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
