"""Sessions and the prune lock of processes that died or whose marker is damaged.

A killed prune does not block the next one on its host (its pid is gone); elsewhere a prune that
finds the lock says who holds it, since when, when it goes stale, and that `keepwell unlock`
exists. `unlock` removes the markers of ended processes of this host at once, others' once
stale, and every one with --remove-all. A running backup whose session marker is damaged still
counts as running: a prune keeps what it uploaded."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fault.support import (
    KW,
    PASSWORD,
    Manifest,
    assert_one_line_error,
    audit,
    kw,
    kw_env,
    manifest,
)
from tests.waiting import wait_for

HOLD_LOCK = """
import sys
from keepwell.repository import open_repository
from keepwell.repository.sessions import PruneLock
repo = open_repository(sys.argv[1], "pw")
with PruneLock(repo):
    print("held", flush=True)
    sys.stdin.read()
"""

KILL_PRUNE_AT_MARKING = """
import os, signal, sys
from keepwell.repository import open_repository
from keepwell.repository.prune import PruneOptions, UnusedLimit, prune
repo = open_repository(sys.argv[1], "pw")
def on(name, fields):
    if fields.get("step") == "index_written":
        os.kill(os.getpid(), signal.SIGKILL)
repo.events.subscribe(on)
prune(repo, PruneOptions(grace=0, max_unused=UnusedLimit(percent=0)))
"""


def _repo(tmp_path: Path, snapshots: int = 1) -> tuple[Path, dict[str, str], dict[str, Manifest]]:
    repo, src = tmp_path / "repo", tmp_path / "src"
    env = kw_env(repo)
    kw(env, "init")
    made: dict[str, Manifest] = {}
    src.mkdir()
    for i in range(snapshots):
        (src / f"f{i}").write_bytes(os.urandom(300_000))
        r = kw(env, "backup", "--json", str(src))
        made[json.loads(r.stdout)["snapshot"]["id"]] = manifest(src)
    return repo, env, made


def _write_marker(repo: Path, name: str, kind: bytes, doc: dict[str, object]) -> None:
    from keepwell.repository import open_repository

    with open_repository(str(repo), PASSWORD) as r:
        r.backend.put(name, r.master.encrypt_object(kind, json.dumps(doc).encode()), overwrite=True)


def test_a_killed_prune_does_not_block_the_next_one(tmp_path: Path) -> None:
    repo, env, _made = _repo(tmp_path, snapshots=3)
    kw(env, "forget", "--keep-last", "1")
    r = subprocess.run([sys.executable, "-c", KILL_PRUNE_AT_MARKING, str(repo)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert (repo / "locks" / "prune").exists()
    kw(env, "prune", "--grace", "0", "--wait")  # its pid is gone: the lock is taken over at once
    assert not (repo / "locks" / "prune").exists()
    assert "no errors were found" in kw(env, "check", "--read-data").stdout


def test_a_prune_refused_says_who_until_when_and_how_to_unlock(tmp_path: Path) -> None:
    from keepwell.repository.sessions import KIND_LOCK, PRUNE_LOCK

    repo, env, made = _repo(tmp_path)
    _write_marker(repo, PRUNE_LOCK, KIND_LOCK, {
        "token": "t", "host": "far-away", "pid": 4242, "machine": "another-boot/1",
        # last heard of 5 s ago: live by the default stale time, stale by 0.5 s, whatever the
        # commands below take
        "started": time.time() - 60, "heartbeat": time.time() - 5, "purpose": "prune"})
    r = kw(env, "prune", check=False)
    assert r.returncode == 1
    assert_one_line_error(r)
    for said in ("another prune is running", "pid 4242 on far-away", "since ", "stale at ",
                 "keepwell unlock"):
        assert said in r.stderr, r.stderr
    r = kw(env, "unlock")  # another host's lock is live until it is stale
    assert "kept locks/prune" in r.stdout and (repo / "locks" / "prune").exists()
    r = kw({**env, "KEEPWELL_SESSION_STALE": "0.5"}, "unlock")
    assert "removed locks/prune" in r.stdout and not (repo / "locks" / "prune").exists()


def test_unlock_removes_the_lock_of_an_ended_process_of_this_host_at_once(tmp_path: Path) -> None:
    repo, env, made = _repo(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(repo)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        r = kw(env, "unlock")  # its process runs: kept
        assert "kept locks/prune" in r.stdout and f"pid {holder.pid} on " in r.stdout
        r = kw(env, "prune", check=False)
        assert r.returncode == 1 and f"pid {holder.pid}" in r.stderr
    finally:
        holder.kill()
        holder.wait()
    r = kw(env, "unlock")
    assert "removed locks/prune: its process" in r.stdout, r.stdout
    kw(env, "prune")


def test_unlock_sessions(tmp_path: Path) -> None:
    """A killed backup's session (this host) goes at once; another host's once it is stale;
    a running backup's stays, unless --remove-all."""
    from keepwell.repository.sessions import KIND_SESSION

    repo, env, made = _repo(tmp_path)
    killed = subprocess.Popen(KW + ["backup", "--stdin"], env=env, stdin=subprocess.PIPE)
    running = subprocess.Popen(KW + ["backup", "--stdin"], env=env, stdin=subprocess.PIPE)
    sessions = repo / "sessions"
    try:
        wait_for(lambda: sessions.exists() and len(list(sessions.iterdir())) == 2, "two sessions")
        killed.kill()
        killed.wait()
        _write_marker(repo, "sessions/elsewhere", KIND_SESSION, {
            "host": "far-away", "pid": 7, "machine": "another-boot/1",
            "started": time.time() - 100, "heartbeat": time.time() - 100, "purpose": "backup"})
        r = kw(env, "unlock")
        assert r.stdout.count("removed sessions/") == 1 and "has ended" in r.stdout, r.stdout
        assert r.stdout.count("kept sessions/") == 2, r.stdout
        r = kw({**env, "KEEPWELL_SESSION_STALE": "50"}, "unlock")
        assert "removed sessions/elsewhere: silent for" in r.stdout, r.stdout
        r = kw(env, "unlock", "--remove-all")
        assert "removed sessions/" in r.stdout and not list(sessions.iterdir())
    finally:
        for p in (killed, running):
            p.kill()
            p.wait()


@pytest.mark.slow
def test_a_damaged_session_of_a_running_backup_keeps_its_data(tmp_path: Path) -> None:
    repo, env, made = _repo(tmp_path)
    # the marker is written once: no heartbeat repairs the damage while the test runs
    backup = subprocess.Popen(KW + ["backup", "--json", "--stdin", "--stdin-filename", "big"],
                              env={**env, "KEEPWELL_SESSION_HEARTBEAT": "3600"},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert backup.stdin is not None
    data = os.urandom(40 << 20)
    try:
        backup.stdin.write(data[: 36 << 20])
        backup.stdin.flush()
        packs = repo / "data"
        wait_for(lambda: packs.exists() and any(
            not p.name.startswith(".tmp") for p in packs.rglob("*") if p.is_file()),
            "a pack of the running backup")
        (session,) = (repo / "sessions").iterdir()
        session.write_bytes(b"damaged")
        for _ in range(2):  # marks what no snapshot uses, then deletes what may be deleted
            r = kw(env, "prune", "--grace", "0", "--max-unused", "0%")
            assert f"sessions/{session.name} cannot be read" in r.stderr, r.stderr
        out, err = backup.communicate(data[36 << 20:], timeout=300)
    finally:
        backup.kill()
    assert backup.returncode == 0, err
    made[json.loads(out)["snapshot"]["id"]] = {".": (hashlib.sha256(data).hexdigest(), len(data))}
    found = audit(repo, made, tmp_path / "out")
    assert found.ok, found.errors


def test_a_pid_that_names_another_process_now_is_gone() -> None:
    """A marker's pid may be reused by a later process: its start time tells them apart (in
    ticks since boot, which a wall-clock step does not move); another machine's pid says
    nothing here."""
    import socket
    from dataclasses import replace

    from keepwell.repository.sessions import Marker, process_start, this_machine

    me = os.getpid()
    alive = Marker("sessions/a", socket.gethostname(), me, time.time(), time.time(),
                   this_machine(), process_start(me))
    assert alive.process_start > 0 and not alive.gone()
    assert replace(alive, process_start=alive.process_start + 1).gone()
    assert not replace(alive, process_start=0).gone()  # written before starts were recorded
    assert not replace(alive, process_start=1, machine="another-boot/1").gone()
    assert not replace(alive, process_start=1, host="far-away").gone()
