"""A restore that cannot restore a file whole never leaves it half written under its name, and
does not count it as restored; what could be restored is."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from keepwell.backends.local import LocalBackend
from keepwell.repository import Repository, open_repository
from keepwell.repository.format import pack_object_name
from keepwell.sources.files import backup_paths, restore_snapshot


def _repo(tmp_path: Path) -> Repository:
    loc = str(tmp_path / "repo")
    Repository.init(LocalBackend(loc), "pw")
    return open_repository(loc, "pw")  # worker processes can open it again


def _flip(repo: Repository, root: Path, blob_id: bytes) -> None:
    """One flipped byte in the stored copy of ``blob_id``."""
    loc = repo.locate(blob_id)
    assert loc is not None
    path = root / pack_object_name(loc.pack_type, loc.pack.hex())
    data = bytearray(path.read_bytes())
    data[loc.offset + loc.length // 2] ^= 0x40
    os.chmod(path, 0o600)
    path.write_bytes(bytes(data))


def _leftovers(target: Path) -> list[str]:
    return [p.name for p in target.rglob(".keepwell-restore-*")]


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_a_file_of_several_blobs_that_cannot_be_read_whole_is_not_left_half_written(
        tmp_path: Path, overwrite: bool) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    (src / "big.bin").write_bytes(rng.randbytes(12 * 1024 * 1024))
    (src / "ok.txt").write_bytes(b"fine")
    repo = _repo(tmp_path)
    snap = backup_paths(repo, [str(src)]).snapshot
    big = repo.find_node(snap, str(src / "big.bin"))
    assert len(big.content) > 2
    _flip(repo, tmp_path / "repo", big.content[-2])

    target = tmp_path / "out"
    restored = target / str(src).lstrip("/")
    if overwrite:
        restored.mkdir(parents=True)
        (restored / "big.bin").write_bytes(b"what was there before")
    res = restore_snapshot(repo, snap, str(target), overwrite=overwrite)

    assert [p for p, _ in res.errors] == [str(restored / "big.bin")]
    assert res.files == 1  # ok.txt only
    assert (restored / "ok.txt").read_bytes() == b"fine"
    if overwrite:
        assert (restored / "big.bin").read_bytes() == b"what was there before"
    else:
        assert not (restored / "big.bin").exists()
    assert not _leftovers(target)


def test_files_of_one_blob_that_cannot_be_read_are_not_made_nor_counted(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(400):  # enough for the worker processes to write most of them
        (src / f"f{i:03d}").write_bytes(f"file {i} ".encode() * (i + 10))
    repo = _repo(tmp_path)
    snap = backup_paths(repo, [str(src)]).snapshot
    for i in (3, 350):
        (blob,) = repo.find_node(snap, str(src / f"f{i:03d}")).content
        _flip(repo, tmp_path / "repo", blob)

    target = tmp_path / "out"
    res = restore_snapshot(repo, snap, str(target))
    restored = target / str(src).lstrip("/")
    assert sorted(p for p, _ in res.errors) == [str(restored / "f003"), str(restored / "f350")]
    assert res.files == 398
    assert sorted(p.name for p in restored.iterdir()) == \
        [f"f{i:03d}" for i in range(400) if i not in (3, 350)]
    assert not _leftovers(target)
