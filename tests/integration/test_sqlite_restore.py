"""`keepwell sqlite restore`: the right database's snapshot, never onto an existing database
unless asked, never with the old database's WAL or journal replayed onto it, never under a
program that has it open; modes kept; checked where it lands."""

# Fixtures imported from sqlite_support are, by pytest's design, parameters of the same name.
# ruff: noqa: F811

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from keepwell.errors import RestoreTargetError
from tests.integration.sqlite_support import (  # noqa: F401
    HOLDER,
    PASSWORD,
    Env,
    env,
    integrity,
    ledger_state,
    make_ledger,
    stop,
    wait_line,
)


def _rows(path: Path) -> list[tuple[object, ...]]:
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT id, amount, pad FROM ledger ORDER BY id").fetchall()
    finally:
        con.close()


def _backed_up(env: Env, db: Path, *args: str) -> list[tuple[object, ...]]:
    r = env.kw("sqlite", "backup", str(db), *args)
    assert r.returncode == 0, r.stderr
    return _rows(db)


def test_an_existing_target_is_replaced_only_when_asked(env: Env) -> None:
    db = env.root / "app.db"
    make_ledger(db, rows=20)
    snap_rows = _backed_up(env, db)
    other = env.root / "other.db"
    make_ledger(other, rows=5)
    before = other.read_bytes()

    r = env.kw("sqlite", "restore", "--target", str(other), "--path", str(db))
    assert r.returncode == 1
    assert f"{other} exists" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert other.read_bytes() == before

    # leftovers of an earlier database where a new one goes count as well
    fresh = env.root / "fresh.db"
    Path(str(fresh) + "-journal").write_bytes(b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7" + bytes(504))
    r = env.kw("sqlite", "restore", "--target", str(fresh), "--path", str(db))
    assert r.returncode == 1 and "fresh.db-journal" in r.stderr, r.stderr
    assert not fresh.exists()

    for target in (other, fresh):
        r = env.kw("sqlite", "restore", "--target", str(target), "--path", str(db), "--overwrite")
        assert r.returncode == 0, r.stderr
        assert _rows(target) == snap_rows and integrity(target) == ["ok"]
    assert sorted(os.listdir(env.root)) == ["app.db", "fresh.db", "other.db", "repo", "tmp"]


def _crashed_copy_with_wal(src: Path, dest: Path) -> None:
    """What a program killed with its database open leaves: the main file and a WAL that holds
    committed transactions not yet checkpointed into it (copied while the connection is open)."""
    con = sqlite3.connect(src, isolation_level=None)
    con.execute("PRAGMA wal_autocheckpoint=0")
    con.execute("CREATE INDEX by_pad ON ledger(pad)")
    con.execute("UPDATE ledger SET pad = randomblob(3100) WHERE id % 7 = 0")
    for suffix in ("", "-wal", "-shm"):
        shutil.copyfile(str(src) + suffix, str(dest) + suffix)
    con.close()


def test_the_old_databases_wal_is_not_replayed_onto_the_restored_one(env: Env) -> None:
    db = env.root / "app.db"
    make_ledger(db, wal=True, rows=800)
    snap_rows = _backed_up(env, db)
    _crashed_copy_with_wal(db, env.root / "crashed.db")
    # the program ran on after the backup; the database is restored over what it left
    for suffix in ("", "-wal", "-shm"):
        os.replace(str(env.root / "crashed.db") + suffix, str(db) + suffix)
    assert os.path.getsize(str(db) + "-wal") > 0

    r = env.kw("sqlite", "restore", "latest", "--target", str(db), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert integrity(db) == ["ok"]
    assert _rows(db) == snap_rows


# Starts a large transaction with a page cache too small to hold it, so SQLite writes changed
# pages into the database file before commit; then waits to be killed: a hot journal is left.
HALF_WRITTEN = r"""
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA cache_size=10")
con.execute("BEGIN")
con.execute("DELETE FROM ledger WHERE id % 3 = 0")
con.execute("UPDATE ledger SET amount = amount + 1000, pad = randomblob(2000)")
print("dirty", flush=True)
sys.stdin.read()
"""


def test_a_hot_journal_of_the_old_database_is_not_rolled_back_onto_the_restored_one(
        env: Env) -> None:
    db = env.root / "app.db"
    make_ledger(db, rows=300)
    snap_rows = _backed_up(env, db)
    con = sqlite3.connect(db)  # the program goes on: the database grows past the snapshot
    con.executemany("INSERT INTO ledger(amount, pad) VALUES (2, randomblob(3000))", [()] * 400)
    con.commit()
    con.close()
    crashing = env.python(HALF_WRITTEN, str(db))
    try:
        wait_line(crashing, b"dirty")
        crashing.send_signal(signal.SIGKILL)
        crashing.wait()
    finally:
        stop(crashing)
    assert os.path.getsize(str(db) + "-journal") > 0

    r = env.kw("sqlite", "restore", "latest", "--target", str(db), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert integrity(db) == ["ok"]
    assert _rows(db) == snap_rows


def test_modes_are_kept(env: Env) -> None:
    db = env.root / "app.db"
    make_ledger(db, rows=5)
    os.chmod(db, 0o604)
    _backed_up(env, db)
    new = env.root / "new.db"
    assert env.kw("sqlite", "restore", "--target", str(new)).returncode == 0
    assert new.stat().st_mode & 0o7777 == 0o604  # the mode recorded at backup

    existing = env.root / "existing.db"
    make_ledger(existing, rows=1)
    os.chmod(existing, 0o640)
    r = env.kw("sqlite", "restore", "--target", str(existing), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert existing.stat().st_mode & 0o7777 == 0o640  # the target's own
    assert ledger_state(existing) == (5, 5, 5)


@pytest.mark.parametrize("mode", ["wal", "delete"])
def test_a_database_in_use_is_not_replaced(env: Env, mode: str) -> None:
    db = env.root / "app.db"
    make_ledger(db, wal=mode == "wal", rows=10)
    _backed_up(env, db)
    live = env.root / "live.db"
    make_ledger(live, wal=mode == "wal", rows=3)
    holder = env.python(HOLDER, str(live), "NORMAL")
    try:
        wait_line(holder, b"holding")
        r = env.kw("sqlite", "restore", "--target", str(live), "--overwrite", "--busy-timeout", "1")
        assert r.returncode == 1
        assert f"{live} is in use by process {holder.pid}" in r.stderr, r.stderr
    finally:
        stop(holder)
    assert ledger_state(live) == (3, 3, 3)
    r = env.kw("sqlite", "restore", "--target", str(live), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert ledger_state(live) == (10, 10, 10)


def test_a_program_that_opens_the_database_during_the_restore_stops_it(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opened after the first look for programs using it, before the new file is in place:
    that program would go on with the old file, but create its -wal or -journal under the
    name the restored database then has (a hot journal of the old file rolled back onto the
    new one tears it). The look is taken again under the lock."""
    from keepwell.repository import open_repository
    from keepwell.sources import sqlite as sqlite_source

    db = env.root / "app.db"
    make_ledger(db, rows=10)
    _backed_up(env, db)
    live = env.root / "live.db"
    make_ledger(live, rows=3)
    holders: list[subprocess.Popen[bytes]] = []
    bring_to_rest = sqlite_source._bring_to_rest

    def opened_meanwhile(target: str, busy_timeout: float) -> None:
        bring_to_rest(target, busy_timeout)
        holders.append(env.python(HOLDER, target, "NORMAL"))
        wait_line(holders[-1], b"holding")

    monkeypatch.setattr(sqlite_source, "_bring_to_rest", opened_meanwhile)
    repo = open_repository(str(env.root / "repo"), PASSWORD)
    try:
        snap = sqlite_source.select_snapshot(repo, path=str(db))
        with pytest.raises(RestoreTargetError, match="in use by process") as refused:
            sqlite_source.restore_database(repo, snap, str(live), overwrite=True,
                                           busy_timeout=1)
        assert f"process {holders[0].pid}" in str(refused.value)
    finally:
        repo.close()
        for h in holders:
            stop(h)
    assert ledger_state(live) == (3, 3, 3)


def _damage_an_index(path: Path) -> None:
    """Rows deleted behind an index's back: PRAGMA quick_check passes, integrity_check fails."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("CREATE INDEX by_amount ON ledger(amount)")
    name, table, root, sql = con.execute(
        "SELECT name, tbl_name, rootpage, sql FROM sqlite_schema WHERE name = 'by_amount'").fetchone()
    con.execute("PRAGMA writable_schema=ON")
    con.execute("DELETE FROM sqlite_schema WHERE name = 'by_amount'")
    con.close()
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("DELETE FROM ledger WHERE id % 2 = 0")
    con.execute("PRAGMA writable_schema=ON")
    con.execute("INSERT INTO sqlite_schema VALUES ('index', ?, ?, ?, ?)", (name, table, root, sql))
    con.close()


def test_integrity_check_runs_where_the_database_lands(env: Env) -> None:
    db = env.root / "app.db"
    make_ledger(db, rows=50)
    _damage_an_index(db)
    _backed_up(env, db)
    out = env.root / "out.db"
    r = env.kw("sqlite", "restore", "--target", str(out))
    assert r.returncode == 1
    assert f"{out} was restored" in r.stderr and "fails PRAGMA integrity_check" in r.stderr, \
        r.stderr
    assert "by_amount" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert out.exists()


def test_latest_is_the_newest_snapshot_of_that_database(env: Env) -> None:
    a, b = env.root / "a.db", env.root / "b.db"
    make_ledger(a, rows=7)
    make_ledger(b, rows=9)
    a_rows = _backed_up(env, a)
    b_rows = _backed_up(env, b)  # newer, of another database

    # in place: the database at the target
    con = sqlite3.connect(a)
    con.execute("DELETE FROM ledger")
    con.commit()
    con.close()
    r = env.kw("sqlite", "restore", "latest", "--target", str(a), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert _rows(a) == a_rows

    # elsewhere: ambiguous unless named
    out = env.root / "out.db"
    r = env.kw("sqlite", "restore", "--target", str(out))
    assert r.returncode == 2
    assert str(a) in r.stderr and str(b) in r.stderr and "--path" in r.stderr, r.stderr
    assert not out.exists()
    r = env.kw("sqlite", "restore", "--target", str(out), "--path", str(a))
    assert r.returncode == 0, r.stderr
    assert _rows(out) == a_rows

    # the same path on two hosts is two databases
    _backed_up(env, b, "--host", "elsewhere")
    r = env.kw("sqlite", "restore", "--target", str(b), "--overwrite")
    assert r.returncode == 2 and "elsewhere:" in r.stderr, r.stderr
    r = env.kw("sqlite", "restore", "--target", str(b), "--overwrite", "--host", "elsewhere")
    assert r.returncode == 0, r.stderr
    assert _rows(b) == b_rows

    # an id of another database than --path names, or a mistyped 'latest', is refused
    r = env.kw("snapshots", "--json")
    ids = {s["paths"][0]: s["id"] for s in json.loads(r.stdout)}
    r = env.kw("sqlite", "restore", ids[str(b)], "--target", str(out), "--overwrite",
               "--path", str(a))
    assert r.returncode == 2 and "not of the database" in r.stderr, r.stderr
    r = env.kw("sqlite", "restore", "latestt", "--target", str(out), "--overwrite")
    assert r.returncode == 2 and "not a snapshot id" in r.stderr, r.stderr
    assert _rows(out) == a_rows


def test_restore_refuses_targets_that_are_not_database_files(env: Env) -> None:
    db = env.root / "app.db"
    make_ledger(db, rows=3)
    _backed_up(env, db)
    (env.root / "dir.db").mkdir()
    victim = env.root / "victim.db"
    make_ledger(victim, rows=1)
    (env.root / "link.db").symlink_to(victim)
    (env.root / "afile").write_text("a file, not a directory\n")
    for name, message in (("dir.db", "is not a regular file"), ("link.db", "symbolic link"),
                          ("afile/x.db", "cannot write in"),
                          ("victim.db-wal", "is the wal file of the database"),
                          ("victim.db-journal", "is the journal file of the database")):
        r = env.kw("sqlite", "restore", "--target", str(env.root / name), "--overwrite")
        assert r.returncode == 1 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    assert ledger_state(victim) == (1, 1, 1)
    assert not [p.name for p in env.root.iterdir() if p.name.startswith("victim.db-")]


# The restore runs in a process of its own; at its first bytes it says so and stops there.
KILLED_RESTORE = r"""
import sys, threading
from keepwell.repository import open_repository
from keepwell.sources.sqlite import restore_database, select_snapshot

repo = open_repository(sys.argv[1], sys.argv[2])

def stall(name, fields):
    if name == "bytes":
        print("writing", flush=True)
        threading.Event().wait()

snap = select_snapshot(repo, target=sys.argv[3])
repo.events.subscribe(stall)
restore_database(repo, snap, sys.argv[3], overwrite=True)
"""


def test_a_killed_restore_leaves_the_target_alone_and_the_next_one_cleans_up(env: Env) -> None:
    db = env.root / "data" / "app.db"
    db.parent.mkdir()
    make_ledger(db, rows=200)
    snap_rows = _backed_up(env, db)
    con = sqlite3.connect(db)
    con.execute("DELETE FROM ledger WHERE id > 10")
    con.commit()
    con.close()
    proc = env.python(KILLED_RESTORE, env.env["KEEPWELL_REPOSITORY"],
                      env.env["KEEPWELL_PASSWORD"], str(db))
    try:
        wait_line(proc, b"writing")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        stop(proc)
    assert ledger_state(db) == (10, 10, 200)  # untouched (its total row says 200)

    r = env.kw("sqlite", "restore", "--target", str(db), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert _rows(db) == snap_rows
    assert os.listdir(db.parent) == ["app.db"]
