"""The pieces every kind of source shares: the registry behind the `Source` interface, the one
native-tool runner, the one temporary-server helper and the one row-count check, each run
against real programs and real databases (no server here is a mock: the temporary "servers"
are real processes that behave as a database server does towards keepwell)."""

from __future__ import annotations

import os
import pwd
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest
import yaml

from keepwell.control.config import load_config
from keepwell.control.status import explain
from keepwell.errors import ConfigurationError, IntegrityError, SourceError
from keepwell.sources.base import Source, kinds, source_for
from keepwell.sources.rowcount import count_rows, figures
from keepwell.sources.sqlite_source import SqliteSource, SqliteTables
from keepwell.sources.tempserver import TempServer, unreachable
from keepwell.sources.tools import ToolProcess, as_user, failure_line, run_program, run_tool


class Stop(Exception):
    pass


def test_every_kind_the_configuration_knows_has_a_source() -> None:
    assert kinds() == ["files", "mysql", "postgres", "sqlite"]
    for kind in kinds():
        source = source_for(kind)
        assert isinstance(source, Source) and source.kind == kind
        assert source_for(kind) is source
    assert [k for k in kinds() if source_for(k).point_in_time] == ["mysql", "postgres"]
    with pytest.raises(ConfigurationError, match="no source kind 'redis'"):
        source_for("redis")


def test_config_check_describes_each_source_through_its_kind(tmp_path: Path) -> None:
    config = tmp_path / "keepwell.yaml"
    config.write_text(yaml.safe_dump({
        "history": str(tmp_path / "history.db"),
        "repositories": {"r": {"location": str(tmp_path / "repo"), "password": "env:KW_X"}},
        "sources": {
            "home": {"kind": "files", "repository": "r", "paths": ["/srv/a", "/srv/b"],
                     "excludes": ["*.tmp"]},
            "app": {"kind": "sqlite", "repository": "r", "path": "/srv/app.db"},
            "orders": {"kind": "postgres", "repository": "r", "mode": "physical",
                       "connection": {"host": "db1"}},
            "shop": {"kind": "mysql", "repository": "r"},
        },
    }))
    what = {s["source"]: s["what"] for s in explain(load_config(str(config)))["sources"]}
    assert what == {"home": "files /srv/a, /srv/b excluding *.tmp",
                    "app": "SQLite database /srv/app.db",
                    "orders": "postgres (physical) on db1",
                    "shop": "mysql (logical) on localhost"}


# -- the native-tool runner ------------------------------------------------------------------
def test_a_failed_program_is_one_line_quoting_what_it_said() -> None:
    script = "echo 'copying 1/3' >&2; echo 'mytool: ERROR: disk full' >&2; echo bye >&2; exit 3"
    with pytest.raises(SourceError) as caught:
        run_tool(["sh", "-c", script], what="the copy")
    assert str(caught.value) == "the copy failed: sh exited with 3: mytool: ERROR: disk full"
    assert failure_line("pg_dump: error: no such table\n", "pg_dump") == "error: no such table"
    assert failure_line("") == "no message"


def test_run_program_returns_its_output_and_feeds_its_input() -> None:
    assert run_program(["tr", "a-z", "A-Z"], "upper-casing", input_data=b"keep\n") == "KEEP\n"
    with pytest.raises(SourceError, match="timed out"):
        run_program(["sleep", "30"], "a nap", timeout=0.2)


def test_a_job_that_must_stop_kills_its_program() -> None:
    asked = []

    def stop() -> None:
        asked.append(1)
        raise Stop

    with ToolProcess(["sleep", "60"], stdout=None) as proc:
        with pytest.raises(Stop):
            proc.wait(check=stop)
        assert not proc.running() and asked == [1]


def test_a_program_runs_as_keepwells_own_user_without_a_switch() -> None:
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert as_user(None) == {"env": None}
    assert as_user(me, {"A": "1"}) == {"env": {"A": "1"}}
    assert unreachable(Path.cwd(), me) is None


# -- the temporary-server helper -------------------------------------------------------------
SERVER = """
import os, signal, sys, subprocess
ready, mode = sys.argv[1], sys.argv[2]
child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
open(ready + ".child", "w").write(str(child.pid))
if mode == "dies":
    print("FATAL: the data directory is damaged", file=sys.stderr, flush=True)
    sys.exit(1)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
open(ready, "w").close()
while True:
    signal.pause()
"""


def _server(tmp_path: Path, mode: str) -> tuple[TempServer, Path]:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    ready = tmp_path / "ready"

    def why() -> str | None:
        lines = [ln for ln in server.output().splitlines() if "FATAL" in ln]
        return lines[-1] if lines else None

    server = TempServer([sys.executable, str(script), str(ready), mode],
                        ready=ready.exists, why=why)
    return server, ready


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(
        f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")


def test_a_temporary_server_is_waited_for_and_stopped(tmp_path: Path) -> None:
    server, ready = _server(tmp_path, "polite")
    with server:
        server.start(30)
        assert ready.exists() and server.running()
        assert os.getpgid(server.pid) == server.pid, "in a session of its own"
    assert not server.running()


def test_a_server_that_dies_says_why(tmp_path: Path) -> None:
    server, _ = _server(tmp_path, "dies")
    with pytest.raises(SourceError, match="did not start: FATAL: the data directory is damaged"):
        server.start(30)


def test_a_server_that_will_not_stop_is_killed_with_what_it_started(tmp_path: Path) -> None:
    server, ready = _server(tmp_path, "stubborn")
    server.start(30)
    child = int((tmp_path / "ready.child").read_text())
    assert _alive(child)
    server.stop(timeout=0.5)
    assert not server.running()
    deadline = time.monotonic() + 30  # SIGKILL is delivered asynchronously
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _alive(child)


def test_a_job_that_must_stop_stops_the_server_it_waits_for(tmp_path: Path) -> None:
    script = tmp_path / "slow.py"
    script.write_text("import signal\nsignal.pause()\n")  # never ready
    server = TempServer([sys.executable, str(script)], ready=lambda: False, why=lambda: None,
                        stop_signal=signal.SIGKILL)

    def stop() -> None:
        raise Stop

    with pytest.raises(Stop):
        server.start(30, stop)
    assert not server.running()


# -- the row-count check ---------------------------------------------------------------------
@pytest.fixture
def db(tmp_path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(tmp_path / "d.db")
    con.execute("CREATE TABLE items (id INTEGER)")
    con.execute("CREATE TABLE tags (name TEXT)")
    con.executemany("INSERT INTO items VALUES (?)", [(i,) for i in range(30)])
    con.execute("INSERT INTO tags VALUES ('a')")
    return con


def test_row_counts_of_the_named_tables_or_of_all(db: sqlite3.Connection) -> None:
    tables = SqliteTables(db)
    assert count_rows(tables, {}) == {"items": 30, "tags": 1}
    assert count_rows(tables, {"items": 30}) == {"items": 30}
    every = count_rows(tables, {"items": 5}, every=True)
    assert every == {"items": 30, "tags": 1}
    assert figures(every) == {"tables": 2, "rows": 31, "row_counts": every}
    assert count_rows(tables, {"main.items": 1},
                      full_name=lambda n: n.split(".")[-1]) == {"items": 30}


def test_a_missing_or_short_table_fails_the_drill(db: sqlite3.Connection) -> None:
    tables = SqliteTables(db)
    with pytest.raises(IntegrityError, match="table orders is missing from the restore"):
        count_rows(tables, {"orders": 0})
    with pytest.raises(IntegrityError, match="table items holds 30 rows, fewer than the 31"):
        count_rows(tables, {"items": 31})
    assert isinstance(source_for("sqlite"), SqliteSource)
