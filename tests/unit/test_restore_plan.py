"""Restore planning across batches: every file restores, and a file whose blob is gone is
reported (the others still restore), never written with a hole in it."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from keepwell.backends.local import LocalBackend
from keepwell.repository import Repository
from keepwell.sources.files import backup_paths, restore_snapshot
from keepwell.sources.files import restorer as restorer_module

os.environ.setdefault("KEEPWELL_TESTONLY_WEAK_KDF", "1")


def _tree(root: Path, n: int) -> dict[str, bytes]:
    rng = random.Random(11)
    files = {}
    for i in range(n):
        data = rng.randbytes(rng.choice([0, 10, 5000, 700_000]))
        p = root / f"d{i % 7}" / f"f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        files[str(p.relative_to(root))] = data
    return files


def test_batches_restore_every_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(restorer_module, "BATCH_FILES", 5)  # many batches, packs shared between them
    files = _tree(tmp_path / "src", 60)
    repo = Repository.init(LocalBackend(str(tmp_path / "repo")), "pw")
    snap = backup_paths(repo, [str(tmp_path / "src")]).snapshot
    res = restore_snapshot(repo, snap, str(tmp_path / "out"))
    assert not res.errors
    base = tmp_path / "out" / str(tmp_path / "src").lstrip("/")
    for rel, data in files.items():
        assert (base / rel).read_bytes() == data


def test_lost_pack_is_reported_and_the_rest_restores(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep").write_bytes(b"kept" * 100)
    repo = Repository.init(LocalBackend(str(tmp_path / "repo")), "pw")
    backup_paths(repo, [str(src)])
    before = {i.name for i in repo.backend.list("data/")}
    (src / "lost").write_bytes(os.urandom(200_000))
    snap = backup_paths(repo, [str(src)]).snapshot
    for name in {i.name for i in repo.backend.list("data/")} - before:
        repo.backend.delete(name)  # the pack holding "lost" is gone
    fresh = Repository.open(LocalBackend(str(tmp_path / "repo")), "pw")
    res = restore_snapshot(fresh, snap, str(tmp_path / "out"))
    assert [p for p, _ in res.errors] == [str(tmp_path / "out" / str(src / "lost").lstrip("/"))]
    out = tmp_path / "out" / str(src).lstrip("/")
    assert (out / "keep").read_bytes() == b"kept" * 100
