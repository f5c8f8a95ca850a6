"""A repository on a real filesystem that fills up: a small ext4 made in a file and mounted
through a loop device (the tests run as root). A backup that meets the full disk fails with one
clear line and leaves a repository that passes `check --read-data`; once space is freed the next
backup stores again what the failed one lost, and every snapshot restores byte for byte. A prune
that meets the full disk leaves every snapshot whole too."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from tests.fault.support import Manifest, assert_one_line_error, audit, kw, kw_env, manifest

ROUNDS = int(os.environ.get("KEEPWELL_FAULT_DISK_ROUNDS", "6"))


def _fill(path: Path, rng: random.Random, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(rng.randbytes(size))


def _free(disk: Path) -> int:
    return shutil.disk_usage(disk).free


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(ROUNDS))
def test_backup_that_fills_the_disk(tmp_path: Path, small_disk: Path, seed: int) -> None:
    rng = random.Random(seed)
    src, repo = tmp_path / "src", small_disk / "repo"
    env = kw_env(repo)
    kw(env, "init")
    made: dict[str, Manifest] = {}
    for i in range(6):
        _fill(src / "small" / f"f{i}", rng, rng.randint(1_000, 300_000))
    made[json.loads(kw(env, "backup", "--json", str(src)).stdout)["snapshot"]["id"]] = manifest(src)
    ballast = small_disk / "ballast"
    _fill(ballast, rng, _free(small_disk) // 2)
    # more than is left, in files of every size: the disk fills up somewhere in the middle
    left = _free(small_disk)
    n = 0
    while left > -(8 << 20):
        size = rng.choice([rng.randint(1_000, 200_000), rng.randint(1 << 20, 6 << 20)])
        _fill(src / "new" / f"g{n}", rng, size)
        left -= size
        n += 1
    r = kw(env, "backup", "--json", str(src), check=False)
    assert r.returncode != 0, "the backup fitted: make the source larger"
    assert_one_line_error(r)
    assert "no space left on device" in r.stderr, r.stderr
    found = audit(repo, made, tmp_path / "out")
    assert found.ok, found.errors

    ballast.unlink()  # space again: the next backup succeeds and holds everything
    made[json.loads(kw(env, "backup", "--json", str(src)).stdout)["snapshot"]["id"]] = manifest(src)
    found = audit(repo, made, tmp_path / "out")
    assert found.ok, found.errors
    assert found.snapshots == 2


@pytest.mark.slow
def test_prune_on_a_full_disk(tmp_path: Path, small_disk: Path) -> None:
    rng = random.Random(11)
    src, repo = tmp_path / "src", small_disk / "repo"
    env = kw_env(repo)
    kw(env, "init")
    made: dict[str, Manifest] = {}
    for changed in (8, 4, 2):  # packs partly used at the end: prune must copy to repack them
        for i in range(changed):
            _fill(src / f"f{i}", rng, rng.randint(300_000, 900_000))
        r = kw(env, "backup", "--json", str(src))
        made[json.loads(r.stdout)["snapshot"]["id"]] = manifest(src)
    for sid in json.loads(kw(env, "forget", "--keep-last", "1", "--json").stdout)["remove"]:
        del made[sid]
    _fill(small_disk / "ballast", rng, _free(small_disk) - (512 << 10))
    r = kw(env, "prune", "--grace", "0", "--max-unused", "0%", "--repack-small", "--wait",
           check=False)
    assert r.returncode != 0, "the prune fitted: leave it less room"
    if r.returncode != 0:
        assert_one_line_error(r)
    found = audit(repo, made, tmp_path / "out")
    assert found.ok, found.errors
    (small_disk / "ballast").unlink()
    kw(env, "prune", "--grace", "0", "--max-unused", "0%", "--wait")
    found = audit(repo, made, tmp_path / "out")
    assert found.ok, found.errors
