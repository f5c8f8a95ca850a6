"""What the SQLite tests share: a repository, the command line, a ledger database whose writers
keep an invariant across two tables, and programs that write to or hold a database."""

from __future__ import annotations

import os
import resource
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from keepwell.sources.sqlite import begin_read

KW = [sys.executable, "-m", "keepwell.cli.main"]
PASSWORD = "sqlite-test"

# Each transaction adds a row to `ledger` and its amount to `total`: in any consistent state
# sum(ledger.amount) == total.sum. The padding makes the database span many backup steps.
WRITER = r"""
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], timeout=600, isolation_level=None)
con.execute(f"PRAGMA journal_mode={sys.argv[2]}")
n = 0
while True:
    amount = n % 97 + 1
    con.execute("BEGIN IMMEDIATE")
    con.execute("INSERT INTO ledger(amount, pad) VALUES (?, randomblob(3000))", (amount,))
    con.execute("UPDATE total SET sum = sum + ?", (amount,))
    con.execute("COMMIT")
    n += 1
    if n == 50:
        print("writing", flush=True)
"""

# Opens a database and reads from it, says so, and keeps it open. In exclusive locking mode it
# writes too, which takes the EXCLUSIVE lock for as long as the connection lives.
HOLDER = r"""
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute(f"PRAGMA locking_mode={sys.argv[2]}")
con.execute("SELECT count(*) FROM sqlite_schema").fetchone()
if sys.argv[2] == "EXCLUSIVE":
    con.execute("CREATE TABLE IF NOT EXISTS held(x)")
print("holding", flush=True)
sys.stdin.read()
"""


class Env:
    """A repository in ``root`` and the environment to run keepwell on it; ``tmp`` is TMPDIR."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir()
        self.env = dict(os.environ, KEEPWELL_PASSWORD=PASSWORD, KEEPWELL_TESTONLY_WEAK_KDF="1",
                        KEEPWELL_REPOSITORY=str(root / "repo"), TMPDIR=str(self.tmp))
        self.env.pop("KEEPWELL_PASSWORD_FILE", None)
        self.kw("init").check_returncode()

    def kw(self, *args: str, timeout: float = 300,
           max_file_size: int | None = None) -> subprocess.CompletedProcess[str]:
        """Run keepwell; ``max_file_size``: the largest file it may write (RLIMIT_FSIZE)."""
        def limit() -> None:
            if max_file_size is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_size, max_file_size))

        return subprocess.run(KW + list(args), env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=limit)

    def python(self, code: str, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", code, *args], env=self.env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def make_ledger(path: Path, *, wal: bool = False, rows: int = 4000) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    if wal:
        con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE ledger(id INTEGER PRIMARY KEY, amount INTEGER, pad BLOB)")
    con.execute("CREATE TABLE total(sum INTEGER)")
    con.execute("BEGIN")
    con.executemany("INSERT INTO ledger(amount, pad) VALUES (1, randomblob(3000))",
                    [()] * rows)
    con.execute("INSERT INTO total VALUES (?)", (rows,))
    con.execute("COMMIT")
    con.close()


def ledger_state(path: Path) -> tuple[int, int, int]:
    """(rows, sum of amounts, recorded total) of a ledger database, read in one transaction
    (taken the way keepwell takes it, which a steady writer cannot starve)."""
    con = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        begin_read(con, 120)
        rows, amounts = con.execute("SELECT count(*), sum(amount) FROM ledger").fetchone()
        (total,) = con.execute("SELECT sum FROM total").fetchone()
        return int(rows), int(amounts), int(total)
    finally:
        con.close()


def integrity(path: Path) -> list[str]:
    con = sqlite3.connect(path)
    try:
        return [str(r[0]) for r in con.execute("PRAGMA integrity_check").fetchall()]
    finally:
        con.close()


def wait_line(proc: subprocess.Popen[bytes], expected: bytes) -> None:
    """Block until ``proc`` prints ``expected`` (a line), or fail if it ends first."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == expected + b"\n", f"expected {expected!r}, got {line!r} (exit {proc.poll()})"


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            f.close()
