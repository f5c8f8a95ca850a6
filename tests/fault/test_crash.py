"""kill -9 of backup and prune at random moments never leaves a repository that fails
`check --read-data`, and the next backup completes reusing what was uploaded."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keepwell.backends.local import _TMP_PREFIX

KW = [sys.executable, "-m", "keepwell.cli.main"]


def _env(repo: Path) -> dict[str, str]:
    return {**os.environ, "KEEPWELL_PASSWORD": "pw", "KEEPWELL_REPOSITORY": str(repo),
            "KEEPWELL_TESTONLY_WEAK_KDF": "1", "KEEPWELL_SESSION_STALE": "1.5",
            "KEEPWELL_SESSION_HEARTBEAT": "0.3"}


def _kw(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(KW + list(args), env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr + r.stdout
    return r


def _make_tree(root: Path, rng: random.Random) -> None:
    for d in range(6):
        sub = root / f"d{d}"
        sub.mkdir(parents=True, exist_ok=True)
        for f in range(50):  # 300 small files: enough for the worker processes to start
            (sub / f"f{f}").write_bytes(rng.randbytes(rng.randint(10, 200_000)))
        (sub / "big").write_bytes(rng.randbytes(6_000_000))


def _kill_at_random(env: dict[str, str], args: list[str], rng: random.Random) -> None:
    p = subprocess.Popen(KW + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.3, 1.6))
    p.send_signal(signal.SIGKILL)
    p.wait()


@pytest.mark.slow
def test_kill_backup_and_prune(tmp_path: Path) -> None:
    seed = int(os.environ.get("KEEPWELL_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"seed {seed}")
    src = tmp_path / "src"
    _make_tree(src, rng)
    repo = tmp_path / "repo"
    env = _env(repo)
    _kw(env, "init")
    trials = int(os.environ.get("KEEPWELL_CRASH_TRIALS", "10"))
    for _ in range(trials):
        victim = src / f"d{rng.randrange(6)}" / "big"
        victim.write_bytes(rng.randbytes(6_000_000))
        _kill_at_random(env, ["backup", str(src)], rng)
        time.sleep(1.6)  # the killed session goes stale
        assert "no errors were found" in _kw(env, "check", "--read-data").stdout
        _kw(env, "backup", str(src))
    for _ in range(trials):
        _kw(env, "forget", "--keep-last", str(rng.randint(1, 3)))
        _kill_at_random(env, ["prune"], rng)
        assert "no errors were found" in _kw(env, "check", "--read-data").stdout
        _kw(env, "backup", str(src))
    _kw(env, "prune")
    _kw(env, "check", "--read-data")
    out = tmp_path / "out"
    _kw(env, "restore", "latest", "--target", str(out))
    r = subprocess.run(["diff", "-r", str(src), str(out / str(src).lstrip("/"))], capture_output=True)
    assert r.returncode == 0


def test_next_backup_reuses_killed_uploads(tmp_path: Path) -> None:
    rng = random.Random(7)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"big{i}").write_bytes(rng.randbytes(8_000_000))
    repo = tmp_path / "repo"
    env = _env(repo)
    _kw(env, "init")
    p = subprocess.Popen(KW + ["backup", str(src)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    index = repo / "index"
    deadline = time.time() + 60

    def checkpointed() -> bool:  # a finished index object, not the temporary file of one
        return index.exists() and any(not f.name.startswith(_TMP_PREFIX) for f in index.iterdir())

    while time.time() < deadline and not checkpointed():
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert checkpointed(), "no index checkpoint was written"
    r = _kw(env, "backup", "--json", str(src))
    import json

    summary = json.loads(r.stdout)["snapshot"]["summary"]
    assert summary["blobs_known"] > 0
    assert summary["bytes_added"] < 96_000_000
