"""kill -9 of backup and prune at random moments never leaves a repository that fails
`check --read-data`, and the next backup completes reusing what was uploaded.

`test_random_operations_killed_at_random_moments` is the long form: trial after trial, a random
operation (backup of a changed tree, backup of an unchanged one, forget with prune, prune beside
a running backup, copy into a second repository) is killed at a random moment; then `check
--read-data` and a byte-for-byte restore of every snapshot of both repositories, and a backup
that must succeed. ``KEEPWELL_FAULT_TRIALS`` trials (default 4; ``KEEPWELL_FAULT_TRIALS=200 make
fault`` for the long run); its figures (trials, kills that landed mid-work, failures, bytes
lost) are printed, and written as JSON to ``KEEPWELL_FAULT_REPORT`` if set."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from keepwell.backends.spool import TMP_PREFIX
from tests.fault.support import KW, Manifest, audit, kw, kw_env, manifest


def _env(repo: Path) -> dict[str, str]:
    return kw_env(repo, KEEPWELL_SESSION_STALE="1.5", KEEPWELL_SESSION_HEARTBEAT="0.3")


def _kw(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return kw(env, *args, check=check)


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
        return index.exists() and any(not f.name.startswith(TMP_PREFIX) for f in index.iterdir())

    while time.time() < deadline and not checkpointed():
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert checkpointed(), "no index checkpoint was written"
    r = _kw(env, "backup", "--json", str(src))
    summary = json.loads(r.stdout)["snapshot"]["summary"]
    assert summary["blobs_known"] > 0
    assert summary["bytes_added"] < 96_000_000


@dataclass
class Figures:
    seed: int
    trials: int = 0
    kills_mid_work: int = 0  # the operation was still running when it was killed
    by_operation: dict[str, int] = field(default_factory=dict)
    failures: int = 0
    bytes_checked: int = 0  # restored and compared, over all audits
    bytes_lost: int = 0
    problems: list[str] = field(default_factory=list)


class _Run:
    """A source tree, a repository and its copy, and what every snapshot must restore to."""

    OPERATIONS = ("backup", "rebackup", "forget-prune", "prune-beside-backup", "copy")
    KEEP = 3  # snapshots kept after each trial, so that an audit's restores stay few

    def __init__(self, tmp: Path, rng: random.Random) -> None:
        self.tmp, self.rng = tmp, rng
        self.src = tmp / "src"
        for d in range(3):
            sub = self.src / f"d{d}"
            sub.mkdir(parents=True)
            for f in range(100):  # 300 small files: enough for the worker processes to start
                (sub / f"f{f}").write_bytes(rng.randbytes(rng.randint(10, 60_000)))
            (sub / "big").write_bytes(rng.randbytes(4_000_000))
        self.repo, self.replica = tmp / "repo", tmp / "replica"
        self.env, self.replica_env = _env(self.repo), _env(self.replica)
        self.copy_env = {**self.replica_env, "KEEPWELL_FROM_REPOSITORY": str(self.repo),
                         "KEEPWELL_FROM_PASSWORD": "pw"}
        _kw(self.env, "init")
        _kw(self.replica_env, "init")
        self.made: dict[str, Manifest] = {}  # every snapshot ever reported saved
        self.backup()
        # how long each operation runs when nobody kills it: kills land within that time
        self.duration = {op: self.run_one(op, kill_after=None)[1] for op in self.OPERATIONS}

    def backup(self, *args: str) -> None:
        r = _kw(self.env, "backup", "--json", *args, str(self.src))
        self.made[json.loads(r.stdout)["snapshot"]["id"]] = manifest(self.src)

    def change(self) -> None:
        victim = self.src / f"d{self.rng.randrange(3)}" / "big"
        victim.write_bytes(self.rng.randbytes(4_000_000))
        files = sorted(p for p in self.src.rglob("f*") if p.is_file())
        for p in self.rng.sample(files, k=10):
            p.write_bytes(self.rng.randbytes(p.stat().st_size))

    def kill_one(self) -> tuple[str, bool]:
        """A random operation killed at a random moment; (its name, killed mid-work)."""
        op = self.rng.choice(self.OPERATIONS)
        killed, _took = self.run_one(op, kill_after=self.rng.uniform(0.05, 1.1 * self.duration[op]))
        return op, killed

    def run_one(self, op: str, kill_after: float | None) -> tuple[bool, float]:
        """Run an operation, killed after ``kill_after`` seconds if it still runs then; (killed
        while it ran, seconds it ran)."""
        beside = None
        if op == "backup":
            self.change()
        if op in ("forget-prune", "prune-beside-backup"):
            _kw(self.env, "forget", "--keep-last", str(self.rng.randint(1, self.KEEP)))
        if op == "prune-beside-backup":
            self.change()
            beside = subprocess.Popen(KW + ["backup", "--json", str(self.src)], env=self.env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        args, env = {
            "backup": (["backup", str(self.src)], self.env),
            "rebackup": (["backup", str(self.src)], self.env),
            "forget-prune": (["prune", "--grace", "0", "--max-unused", "0%"], self.env),
            "prune-beside-backup": (["prune", "--grace", "0", "--max-unused", "0%"], self.env),
            "copy": (["copy"], self.copy_env),
        }[op]
        before = self.snapshot_ids()
        started = time.monotonic()
        p = subprocess.Popen(KW + args, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            p.wait(timeout=kill_after if kill_after is not None else 300)
            killed = False
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            killed = True
        took = time.monotonic() - started
        if kill_after is None:
            assert p.returncode == 0, f"{op} failed with nothing killed"
        if op in ("backup", "rebackup"):  # a snapshot stored before the kill: of this tree
            for sid in self.snapshot_ids() - before:
                self.made[sid] = manifest(self.src)
        if beside is not None:  # a backup beside a killed prune must succeed, and restore
            out, err = beside.communicate(timeout=300)
            assert beside.returncode == 0, err
            self.made[json.loads(out)["snapshot"]["id"]] = manifest(self.src)
        return killed, took

    def tidy(self) -> None:
        """Keep the snapshots an audit restores few (storage is not pruned here)."""
        _kw(self.env, "forget", "--keep-last", str(self.KEEP))
        _kw(self.replica_env, "forget", "--keep-last", str(self.KEEP))

    def snapshot_ids(self) -> set[str]:
        return {s["id"] for s in json.loads(_kw(self.env, "snapshots", "--json").stdout)}

    def replica_made(self) -> dict[str, Manifest]:
        r = _kw(self.replica_env, "snapshots", "--json")
        return {s["id"]: self.made[s["source"].get("copied_from", s["id"])]
                for s in json.loads(r.stdout) if s["source"].get("copied_from") in self.made}


@pytest.mark.slow
def test_random_operations_killed_at_random_moments(tmp_path: Path) -> None:
    seed = int(os.environ.get("KEEPWELL_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    run = _Run(tmp_path, rng)
    fig = Figures(seed)
    for trial in range(int(os.environ.get("KEEPWELL_FAULT_TRIALS", "4"))):
        op, mid_work = run.kill_one()
        fig.trials += 1
        fig.kills_mid_work += mid_work
        fig.by_operation[op] = fig.by_operation.get(op, 0) + 1
        out = tmp_path / f"out{trial}"
        for repo, made in ((run.repo, run.made), (run.replica, run.replica_made())):
            found = audit(repo, made, out)
            fig.bytes_checked += found.bytes_checked
            fig.bytes_lost += found.bytes_lost
            if not found.ok:
                fig.failures += 1
                fig.problems.append(f"trial {trial} ({op}), {repo.name}: {found.errors[:3]}")
        run.backup()  # the next backup after any kill succeeds
        run.tidy()
        shutil.rmtree(out, ignore_errors=True)
    print(f"random kills: seed {seed}, {fig.trials} trials, {fig.kills_mid_work} mid-work, "
          f"{fig.failures} failures, {fig.bytes_lost} bytes lost of {fig.bytes_checked} restored "
          f"and compared; by operation {fig.by_operation}")
    report = os.environ.get("KEEPWELL_FAULT_REPORT")
    if report:
        Path(report).write_text(json.dumps(asdict(fig), indent=2))
    assert fig.failures == 0 and fig.bytes_lost == 0, fig.problems
