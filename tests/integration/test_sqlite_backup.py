"""`keepwell sqlite backup` on live databases: consistent under a steady writer in every journal
mode, bounded waits for a lock, nothing left behind when killed, clear errors for what is not a
database."""

# Fixtures imported from sqlite_support are, by pytest's design, parameters of the same name.
# ruff: noqa: F811

from __future__ import annotations

import os
import signal
import sqlite3

import pytest

from tests.integration.sqlite_support import (  # noqa: F401
    HOLDER,
    WRITER,
    Env,
    env,
    integrity,
    ledger_state,
    make_ledger,
    stop,
    wait_line,
)
from tests.terminal import run_on_tty

MODES = ["delete", "truncate", "persist", "wal", "memory", "off"]


@pytest.mark.parametrize("mode", MODES)
def test_backup_completes_and_is_consistent_under_a_steady_writer(env: Env, mode: str) -> None:
    db = env.root / "app.db"
    make_ledger(db, wal=mode == "wal")
    writer = env.python(WRITER, str(db), mode)
    try:
        wait_line(writer, b"writing")
        before = ledger_state(db)[0]
        r = env.kw("sqlite", "backup", str(db))
        after = ledger_state(db)[0]
    finally:
        stop(writer)
    assert r.returncode == 0, r.stderr
    assert after > before  # the writer kept committing while the backup ran

    out = env.root / "out.db"
    r = env.kw("sqlite", "restore", "latest", "--target", str(out))
    assert r.returncode == 0, r.stderr
    assert integrity(out) == ["ok"]
    rows, amounts, total = ledger_state(out)
    assert amounts == total  # both tables from the same transaction
    assert before <= rows <= after
    assert os.listdir(env.tmp) == []


def test_backup_waits_for_a_lock_only_as_long_as_told(env: Env) -> None:
    db = env.root / "app.db"
    make_ledger(db, rows=10)
    holder = env.python(HOLDER, str(db), "EXCLUSIVE")
    try:
        wait_line(holder, b"holding")
        r = env.kw("sqlite", "backup", str(db), "--busy-timeout", "0.5", timeout=120)
    finally:
        stop(holder)
    assert r.returncode == 1
    assert "no read lock within 0.5 s" in r.stderr and "--busy-timeout" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert env.kw("sqlite", "backup", str(db)).returncode == 0  # and works once it is free


# The backup runs in a process of its own; on the named event it says so and stops there.
KILLED_BACKUP = r"""
import sys, threading
from keepwell.repository import open_repository
from keepwell.sources.sqlite import backup_database

repo = open_repository(sys.argv[1], sys.argv[2])

def stall(name, fields):
    if name == sys.argv[4]:
        print("at " + name, flush=True)
        threading.Event().wait()

repo.events.subscribe(stall)
backup_database(repo, sys.argv[3])
"""


@pytest.mark.parametrize("event", ["sqlite_copy", "bytes"])
def test_a_killed_backup_leaves_no_copy_behind(env: Env, event: str) -> None:
    db = env.root / "app.db"
    make_ledger(db, wal=True)
    proc = env.python(KILLED_BACKUP, env.env["KEEPWELL_REPOSITORY"], env.env["KEEPWELL_PASSWORD"],
                      str(db), event)
    try:
        wait_line(proc, f"at {event}".encode())
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        stop(proc)
    assert os.listdir(env.tmp) == []
    # the live database is untouched and backs up as usual
    assert integrity(db) == ["ok"]
    assert env.kw("sqlite", "backup", str(db)).returncode == 0
    assert os.listdir(env.tmp) == []


def test_backup_shows_the_copy_and_the_upload_on_a_terminal(env: Env) -> None:
    db = env.root / "app.db"
    make_ledger(db)
    size = db.stat().st_size
    rc, out = run_on_tty(["sqlite", "backup", str(db)], env.env)
    assert rc == 0, out
    lines = [line.strip() for line in out.replace("\n", "\r").split("\r") if line.strip()]
    copy = [line for line in lines if line.startswith("copy:")]
    store = [line for line in lines if line.startswith("backup:")]
    assert copy and store, out
    total = f"{size / 2**20:.2f} MiB/{size / 2**20:.2f} MiB (100%)"
    assert total in copy[-1] and total in store[-1], out


def test_a_path_with_uri_characters_is_the_file_it_names(env: Env) -> None:
    d = env.root / "odd dir?x=1"
    d.mkdir()
    db = d / "we#ird%20name?.db"
    make_ledger(db, rows=30)
    r = env.kw("sqlite", "backup", str(db))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(d)) == ["we#ird%20name?.db"]  # no other file opened or created
    out = env.root / "out.db"
    r = env.kw("sqlite", "restore", "latest", "--target", str(out))
    assert r.returncode == 0, r.stderr
    assert ledger_state(out) == ledger_state(db) == (30, 30, 30)


def test_what_is_not_a_database_is_refused_clearly(env: Env) -> None:
    text = env.root / "notes.txt"
    text.write_text("not a database\n" * 100)
    db = env.root / "app.db"
    make_ledger(db, wal=True, rows=10)
    keep = sqlite3.connect(db)  # keeps the -wal file in place
    keep.execute("INSERT INTO total VALUES (0)")
    keep.commit()
    try:
        cases = {
            str(text): "is not an SQLite database",
            str(db) + "-wal": f"is the wal file of the database {db}",
            str(env.root): "is not a regular file",
            str(env.root / "missing.db"): "no such SQLite database",
        }
        for path, message in cases.items():
            r = env.kw("sqlite", "backup", path)
            assert r.returncode == 2, (path, r.stderr)
            assert message in r.stderr and "Traceback" not in r.stderr, (path, r.stderr)
    finally:
        keep.close()
    assert not (env.root / "missing.db").exists()
    assert env.kw("snapshots", "--json").stdout.strip() == "[]"


def test_a_scratch_copy_that_does_not_fit_fails_clearly(env: Env) -> None:
    db = env.root / "app.db"
    make_ledger(db, rows=1000)  # about 3.5 MiB
    r = env.kw("sqlite", "backup", str(db), max_file_size=1 << 20)
    assert r.returncode == 1
    assert "the copy failed" in r.stderr and f"room for the whole database in {env.tmp}" in \
        r.stderr and "Traceback" not in r.stderr, r.stderr
    assert os.listdir(env.tmp) == []
    assert integrity(db) == ["ok"]
