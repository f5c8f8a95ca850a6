"""Failed writes (a full disk, a quota, a bad sector, short writes, a failed data sync) at every
write of a backup and of a prune, injected where the kernel answers (tests/fault/write_faults.py).

After each fault: the command failed with one clear line (or succeeded, and then its snapshot
restores), the repository passes `check --read-data`, every snapshot restores byte for byte,
and once the fault is gone a backup succeeds and stores again whatever the failed run lost.

By default every write of the run is failed for the main kinds (the disk fills up, a write
fails once) and a sample of writes for the others (and for a copy); ``KEEPWELL_FAULT_WRITES=all``
fails every write for every kind."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from tests.fault.support import (
    PASSWORD,
    Manifest,
    assert_one_line_error,
    audit,
    kw,
    kw_env,
    manifest,
)
from tests.fault.write_faults import KINDS, counts, plan_env

EVERY_WRITE = ("short-enospc", "eio")
SAMPLED = 2  # writes failed per run for the other kinds, by default


def _make_tree(src: Path, rng: random.Random, small: int) -> None:
    for i in range(small):
        p = src / f"d{i % 3}" / f"f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(rng.randint(100, 40_000)))
    (src / "big").write_bytes(rng.randbytes(2_500_000))


def _change(src: Path, rng: random.Random) -> None:
    """New data for the next backup: the big file and a third of the small ones."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for p in [src / "big"] + rng.sample(files, k=len(files) // 3):
        p.write_bytes(rng.randbytes(p.stat().st_size))


def _which(total: int, kind: str, rng: random.Random, sample: int = SAMPLED) -> list[int]:
    """The writes to fail: every one, or a sample (``sample``: how many)."""
    every = list(range(1, total + 1))
    if kind in EVERY_WRITE and sample == SAMPLED or os.environ.get("KEEPWELL_FAULT_WRITES") == "all":
        return every
    return sorted(rng.sample(every, k=min(sample, total)))


class Scenario:
    """A prepared repository (copied afresh for each trial) and the command to fail."""

    def __init__(self, tmp: Path, *, small: int, workers: int, seed: int) -> None:
        self.tmp = tmp
        self.rng = random.Random(seed)
        self.src = tmp / "src"
        _make_tree(self.src, self.rng, small)
        self.base = tmp / "base"
        self.extra = {"KEEPWELL_FILE_PROCESSES": str(workers)}
        env = kw_env(self.base, **self.extra)
        kw(env, "init")
        self.made: dict[str, Manifest] = {}
        self.backup(env)
        self.trial = 0

    def backup(self, env: dict[str, str]) -> None:
        r = kw(env, "backup", "--json", str(self.src))
        self.made[json.loads(r.stdout)["snapshot"]["id"]] = manifest(self.src)

    def fresh(self) -> tuple[Path, dict[str, str], Path]:
        self.trial += 1
        repo = self.tmp / f"repo{self.trial}"
        shutil.copytree(self.base, repo)
        return repo, kw_env(repo, **self.extra), self.tmp / f"counter{self.trial}"

    def writes(self, args: list[str]) -> int:
        """How many writes the command makes on a fresh copy, with nothing failing."""
        repo, env, counter = self.fresh()
        kw({**env, **plan_env(counter, 0, "count")}, *args)
        shutil.rmtree(repo)
        return counts(counter)[0]

    def check(self, repo: Path, made: dict[str, Manifest], what: str) -> None:
        found = audit(repo, made, self.tmp / "out")
        assert found.ok, f"{what}: {found.errors}"

    # the runs after the fault is gone, in this process (no hook here)
    def clean_backup(self, repo_path: Path, made: dict[str, Manifest]) -> None:
        from keepwell.repository import open_repository
        from keepwell.sources.files import backup_paths

        with open_repository(str(repo_path), PASSWORD) as repo:
            made[backup_paths(repo, [str(self.src)]).snapshot.id] = manifest(self.src)

    def clean_prune(self, repo_path: Path) -> None:
        from keepwell.repository import open_repository
        from keepwell.repository.prune import PruneOptions, UnusedLimit, prune

        with open_repository(str(repo_path), PASSWORD) as repo:
            prune(repo, PruneOptions(max_unused=UnusedLimit(percent=0), grace=0, wait=True))


def _fail_backups(tmp_path: Path, *, small: int, workers: int, kinds: tuple[str, ...]) -> int:
    sc = Scenario(tmp_path, small=small, workers=workers, seed=small)
    _change(sc.src, sc.rng)
    args = ["backup", "--json", str(sc.src)]
    total = sc.writes(args)
    assert total >= 4, total
    trials = 0
    for kind in kinds:
        for n in _which(total, kind, sc.rng):
            repo, env, counter = sc.fresh()
            made = dict(sc.made)
            what = f"backup, {kind} at write {n} of {total}"
            r = kw({**env, **plan_env(counter, n, kind)}, *args, check=False)
            if r.returncode == 0:
                made[json.loads(r.stdout)["snapshot"]["id"]] = manifest(sc.src)
            else:
                assert_one_line_error(r)
            sc.check(repo, made, what)
            sc.clean_backup(repo, made)  # the fault is gone: what was lost is stored again
            sc.check(repo, made, f"{what}, then a backup")
            shutil.rmtree(repo)
            trials += 1
    print(f"backup ({workers} worker processes): {total} writes, {trials} faults injected")
    return trials


@pytest.mark.slow
def test_backup_survives_a_failed_write_anywhere(tmp_path: Path) -> None:
    assert _fail_backups(tmp_path, small=20, workers=0, kinds=KINDS) > 0


@pytest.mark.slow
def test_backup_in_worker_processes_survives_a_full_disk(tmp_path: Path) -> None:
    """Worker processes write packs and index objects of their own: a full disk met there."""
    assert _fail_backups(tmp_path, small=300, workers=1, kinds=("short-enospc",)) > 0


@pytest.mark.slow
def test_prune_survives_a_failed_write_anywhere(tmp_path: Path) -> None:
    sc = Scenario(tmp_path, small=20, workers=0, seed=3)
    env = kw_env(sc.base)
    for _ in range(3):
        _change(sc.src, sc.rng)
        sc.backup(env)
    forgotten = kw(env, "forget", "--keep-last", "2", "--json")
    for sid in json.loads(forgotten.stdout)["remove"]:
        del sc.made[sid]
    args = ["prune", "--grace", "0", "--max-unused", "0%", "--wait"]
    total = sc.writes(args)
    assert total >= 3, total
    trials = 0
    for kind in KINDS:
        for n in _which(total, kind, sc.rng):
            trials += 1
            repo, env, counter = sc.fresh()
            what = f"prune, {kind} at write {n} of {total}"
            r = kw({**env, **plan_env(counter, n, kind)}, *args, check=False)
            if r.returncode != 0:
                assert_one_line_error(r)
            sc.check(repo, sc.made, what)
            sc.clean_prune(repo)  # the fault is gone: a prune finishes the work
            sc.clean_prune(repo)
            sc.check(repo, sc.made, f"{what}, then a prune")
            made = dict(sc.made)
            _change(sc.src, sc.rng)
            sc.clean_backup(repo, made)
            sc.check(repo, made, f"{what}, then a prune and a backup")
            shutil.rmtree(repo)
    print(f"prune: {total} writes, {trials} faults injected")


@pytest.mark.slow
def test_copy_survives_a_failed_write_anywhere(tmp_path: Path) -> None:
    """Failed writes in the destination of `keepwell copy`: the snapshots it did copy restore,
    and a copy after the fault completes the rest."""
    sc = Scenario(tmp_path / "source", small=20, workers=0, seed=5)
    _change(sc.src, sc.rng)
    sc.backup(kw_env(sc.base))
    source = sc.base
    sc.base = tmp_path / "empty"  # the repository copied afresh for each trial: the destination
    kw(kw_env(sc.base), "init")
    args = ["copy", "--from-repo", str(source)]
    extra = {"KEEPWELL_FROM_PASSWORD": PASSWORD}
    sc.extra.update(extra)
    total = sc.writes(args)
    assert total >= 4, total

    def copies(repo: Path) -> dict[str, Manifest]:
        from keepwell.repository import open_repository

        with open_repository(str(repo), PASSWORD) as r:
            return {s.id: sc.made[s.source["copied_from"]] for s in r.list_snapshots()}

    trials = 0
    for kind in EVERY_WRITE:  # a sample: the writes of a copy are those of a backup
        for n in _which(total, kind, sc.rng, sample=4):
            trials += 1
            repo, env, counter = sc.fresh()
            what = f"copy, {kind} at write {n} of {total}"
            r = kw({**env, **plan_env(counter, n, kind)}, *args, check=False)
            if r.returncode != 0:
                assert_one_line_error(r)
            sc.check(repo, copies(repo), what)
            kw(env, *args)  # the fault is gone: the copy completes
            made = copies(repo)
            assert len(made) == len(sc.made), what
            sc.check(repo, made, f"{what}, then a copy")
            shutil.rmtree(repo)
    print(f"copy: {total} writes, {trials} faults injected")
