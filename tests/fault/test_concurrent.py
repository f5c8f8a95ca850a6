"""Two `keepwell backup` processes write into one repository, round after round, while a third
process runs `forget --keep-last 2 --prune` and `prune` over and over. At the end every snapshot
left restores byte for byte and `check --read-data` passes; prune's own figures show that the
races were run (it repacked, and it deleted packs while a backup was running)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

KW = [sys.executable, "-m", "keepwell.cli.main"]
ROUNDS = int(os.environ.get("KEEPWELL_CONCURRENT_ROUNDS", "10"))


def _env(repo: Path) -> dict[str, str]:
    return {**os.environ, "KEEPWELL_PASSWORD": "pw", "KEEPWELL_REPOSITORY": str(repo),
            "KEEPWELL_TESTONLY_WEAK_KDF": "1", "KEEPWELL_SESSION_HEARTBEAT": "0.5",
            "KEEPWELL_SESSION_STALE": "120"}


def _kw(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(KW + list(args), env=env, capture_output=True, text=True, timeout=600)


def _manifest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


class Tree:
    """A source tree that changes every round; now and then a file goes back to an older
    content, so a backup meets blobs that only forgotten snapshots (and doomed packs) hold."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.history: dict[str, list[bytes]] = {}
        for d in range(3):
            for f in range(7):
                self._write(f"d{d}/f{f}", rng.randbytes(rng.randint(20_000, 400_000)))
        for b in range(2):
            self._write(f"big{b}", rng.randbytes(1_500_000))

    def _write(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.history.setdefault(rel, []).append(data)

    def change(self) -> None:
        rng = self.rng
        names = sorted(self.history)
        for rel in rng.sample(names, k=len(names) // 3):
            old = self.history[rel]
            if len(old) > 2 and rng.random() < 0.35:
                self._write(rel, old[rng.randrange(len(old) - 2)])  # back to a forgotten version
            else:
                self._write(rel, rng.randbytes(rng.randint(20_000, 400_000) if "/" in rel
                                               else 1_500_000))


@pytest.mark.slow
def test_two_backups_and_prune_at_once(tmp_path: Path) -> None:
    seed = int(os.environ.get("KEEPWELL_CONCURRENT_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    repo = tmp_path / "repo"
    env = _env(repo)
    assert _kw(env, "init").returncode == 0
    made: dict[str, dict[str, str]] = {}  # snapshot id -> manifest of what it saved
    reports: list[dict[str, int]] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def exercised() -> bool:
        with lock:
            return (any(r["packs_repacked"] for r in reports)
                    and any(r["packs_deleted"] and r["live_sessions_at_delete"] for r in reports))

    def backups(name: str) -> None:
        rng = random.Random(f"{seed}-{name}")
        tree = Tree(tmp_path / name, rng)
        rounds = 0
        # at least ROUNDS rounds, and on until prune has repacked and has deleted beside a
        # running backup (the interleaving depends on timing; the cap keeps a bound)
        while rounds < ROUNDS or (not exercised() and rounds < 4 * ROUNDS):
            rounds += 1
            tree.change()
            manifest = _manifest(tree.root)
            # a slow upload keeps each backup's session live longer, so prune meets it often
            r = _kw(env, "--limit-upload", "3000", "backup", "--json", "--host", name,
                    str(tree.root))
            if r.returncode != 0:
                with lock:
                    failures.append(f"backup {name}: {r.stderr.strip()}")
                return
            with lock:
                made[json.loads(r.stdout)["snapshot"]["id"]] = manifest

    def prunes() -> None:
        n = 0
        while not stop.is_set() or n < 2:
            common = ["--grace", "0", "--max-unused", "0%", "--json"]
            if n % 2 == 0:
                r = _kw(env, "forget", "--keep-last", "2", "--prune", *common)
            else:
                r = _kw(env, "prune", *common)
            n += 1
            if r.returncode != 0:
                with lock:
                    failures.append(f"prune: {r.stderr.strip()}")
                return
            doc = json.loads(r.stdout)
            with lock:
                reports.append(doc.get("prune", doc))

    threads = [threading.Thread(target=backups, args=(n,)) for n in ("alpha", "beta")]
    pruner = threading.Thread(target=prunes)
    for t in threads + [pruner]:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    pruner.join()
    assert not failures, failures

    assert _kw(env, "forget", "--keep-last", "2").returncode == 0
    final = _kw(env, "prune", "--grace", "0", "--max-unused", "0%", "--wait", "--json")
    assert final.returncode == 0, final.stderr
    reports.append(json.loads(final.stdout))
    total = {k: sum(int(r[k]) for r in reports) for k in
             ("packs_repacked", "packs_marked", "packs_deleted", "packs_restored", "packs_deferred")}
    print(f"{len(reports)} prune runs: {total}")
    for r in reports:
        print({k: v for k, v in r.items() if v and k.startswith(("packs", "live", "wait"))})
    assert all(not r["warnings"] for r in reports), [r["warnings"] for r in reports]
    assert total["packs_repacked"] > 0, "no pack was repacked: the test did not exercise repacking"
    assert any(r["packs_deleted"] and r["live_sessions_at_delete"] for r in reports), \
        "no pack was deleted while a backup ran: the test did not exercise the race"
    assert reports[-1]["packs_pending"] == 0

    check = _kw(env, "check", "--read-data")
    assert check.returncode == 0 and "no errors were found" in check.stdout, check.stdout + check.stderr
    snaps = json.loads(_kw(env, "snapshots", "--json").stdout)
    assert len(snaps) == 4  # the last two of each backup process
    for snap in snaps:
        out = tmp_path / "restore" / snap["id"]
        r = _kw(env, "restore", snap["id"], "--target", str(out))
        assert r.returncode == 0, r.stderr
        src = snap["paths"][0]
        assert _manifest(out / src.lstrip("/")) == made[snap["id"]], f"snapshot {snap['short_id']}"
