"""kill -9 of prune in each of its steps (repacking, index rewrite, marking, restoring, deleting)
and at random moments beside a running backup: the repository stays valid (`check --read-data`
passes, every snapshot restores byte for byte) and a later prune finishes the work."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

KW = [sys.executable, "-m", "keepwell.cli.main"]
STALE = 2.0

# Runs prune in-process and SIGKILLs itself when prune reports the chosen step (the n-th time).
DRIVER = """
import os, signal, sys
from keepwell.repository import open_repository
from keepwell.repository.prune import PruneOptions, UnusedLimit, prune
step, nth = sys.argv[1], int(sys.argv[2])
repo = open_repository(os.environ["KEEPWELL_REPOSITORY"], "pw")
seen = []
def on(name, fields):
    if step in (name, fields.get("step")):
        seen.append(1)
        if len(seen) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
repo.events.subscribe(on)
prune(repo, PruneOptions(grace=0, max_unused=UnusedLimit(percent=0)))
"""


def _env(repo: Path) -> dict[str, str]:
    return {**os.environ, "KEEPWELL_PASSWORD": "pw", "KEEPWELL_REPOSITORY": str(repo),
            "KEEPWELL_TESTONLY_WEAK_KDF": "1", "KEEPWELL_SESSION_STALE": str(STALE),
            "KEEPWELL_SESSION_HEARTBEAT": "0.2"}


def _kw(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(KW + list(args), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"keepwell {' '.join(args)}: {r.stderr}{r.stdout}"
    return r


def _manifest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _change(src: Path, rng: random.Random, share: float) -> None:
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for p in rng.sample(files, k=max(1, int(len(files) * share))):
        p.write_bytes(rng.randbytes(p.stat().st_size))


def _make(src: Path, rng: random.Random) -> None:
    for d in range(4):
        sub = src / f"d{d}"
        sub.mkdir(parents=True)
        for f in range(12):
            (sub / f"f{f}").write_bytes(rng.randbytes(rng.randint(10_000, 300_000)))
        (sub / "big").write_bytes(rng.randbytes(2_500_000))


def _backup(env: dict[str, str], src: Path, made: dict[str, dict[str, str]]) -> None:
    r = _kw(env, "backup", "--json", str(src))
    made[json.loads(r.stdout)["snapshot"]["id"]] = _manifest(src)


def _assert_valid(env: dict[str, str], made: dict[str, dict[str, str]], out: Path) -> None:
    check = _kw(env, "check", "--read-data")
    assert "no errors were found" in check.stdout, check.stdout
    for snap in json.loads(_kw(env, "snapshots", "--json").stdout):
        target = out / f"{snap['id']}-{time.monotonic_ns()}"
        _kw(env, "restore", snap["id"], "--target", str(target))
        restored = target / snap["paths"][0].lstrip("/")
        assert _manifest(restored) == made[snap["id"]], f"snapshot {snap['short_id']} differs"


def _packs(repo: Path) -> set[str]:
    return {str(p.relative_to(repo)) for d in ("data", "tree") if (repo / d).exists()
            for p in (repo / d).rglob("*") if p.is_file()}


def _setup(tmp_path: Path, seed: int) -> tuple[dict[str, str], Path, dict[str, dict[str, str]]]:
    rng = random.Random(seed)
    src = tmp_path / "src"
    _make(src, rng)
    env = _env(tmp_path / "repo")
    _kw(env, "init")
    made: dict[str, dict[str, str]] = {}
    for _ in range(3):
        _backup(env, src, made)
        _change(src, rng, 0.4)
    _backup(env, src, made)
    _kw(env, "forget", "--keep-last", "2")
    return env, src, made


def _kill_at(env: dict[str, str], step: str, nth: int = 1) -> None:
    r = subprocess.run([sys.executable, "-c", DRIVER, step, str(nth)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, f"prune never reached {step}: {r.stderr}"
    time.sleep(STALE + 0.2)  # its prune lock goes stale


# the steps of phase 1 (repack, index rewrite, marking) are reached by a prune of the
# forgotten snapshots; those of phase 2 by the prune after it
PHASE_1 = [("pack_stored", 1), ("repacked", 1), ("index_written", 1), ("index_superseded", 1),
           ("marked", 1)]
PHASE_2 = [("pack_deleted", 1), ("pack_deleted", 3), ("packs_deleted", 1)]


@pytest.mark.slow
@pytest.mark.parametrize(("step", "nth"), PHASE_1 + PHASE_2)
def test_kill_prune_at_each_step(tmp_path: Path, step: str, nth: int) -> None:
    env, _src, made = _setup(tmp_path, seed=zlib.crc32(f"{step}{nth}".encode()))
    repo = tmp_path / "repo"
    before = _packs(repo)
    if (step, nth) in PHASE_2:
        _kw(env, "prune", "--grace", "0", "--max-unused", "0%")  # marks; the next run deletes
    _kill_at(env, step, nth)
    _assert_valid(env, made, tmp_path / "out")
    final = json.loads(_kw(env, "prune", "--grace", "0", "--max-unused", "0%", "--wait",
                           "--json").stdout)
    assert final["packs_pending"] == 0 and not final["warnings"], final
    _kw(env, "prune", "--grace", "0", "--max-unused", "0%", "--wait")  # orphans of the kill
    _assert_valid(env, made, tmp_path / "out")
    assert not list((repo / "pending").glob("*"))
    after = _packs(repo)
    assert len(after - before) <= 2 and len(before - after) >= 4, "space was not given back"


@pytest.mark.slow
def test_kill_prune_at_random_moments_beside_a_backup(tmp_path: Path) -> None:
    seed = int(os.environ.get("KEEPWELL_CRASH_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    env, src, made = _setup(tmp_path, seed)
    for _ in range(int(os.environ.get("KEEPWELL_CRASH_TRIALS", "6"))):
        _change(src, rng, 0.3)
        backup = subprocess.Popen(KW + ["backup", "--json", str(src)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        pruner = subprocess.Popen(KW + ["prune", "--grace", "0", "--max-unused", "0%"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 2.0))
        pruner.send_signal(signal.SIGKILL)
        pruner.wait()
        out, err = backup.communicate(timeout=300)
        assert backup.returncode == 0, err
        made[json.loads(out)["snapshot"]["id"]] = _manifest(src)
        time.sleep(STALE + 0.2)
        _assert_valid(env, made, tmp_path / "out")
        _kw(env, "forget", "--keep-last", "2")
    _kw(env, "prune", "--grace", "0", "--max-unused", "0%", "--wait")
    _kw(env, "prune", "--grace", "0", "--max-unused", "0%", "--wait")
    _assert_valid(env, made, tmp_path / "out")
    assert not list((tmp_path / "repo" / "pending").glob("*"))
