"""A database source's retention, run by the daemon after a backup, goes through the source's
own forget plan: it keeps every base the point-in-time window needs (the newest base older than
a ``keep_within`` window is where the window starts) and forgets the log (WAL, binlogs) below
the oldest kept base, against a real PostgreSQL cluster that archives its WAL and a real
MariaDB whose binlogs are pushed.

Each test takes three backups through the control plane without a policy, then lets a real
daemon take a fourth with ``keep_within`` shorter than the time between two backups: the window
then holds the newest base only, and starts from the base before it, so that base must stay and
the two before it go, with the log below it. The daemon is stopped as soon as its backup has
started: a stopping daemon finishes the job it runs and starts no other.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

import tests.servers.postgres as servers_pg
from keepwell.backends import open_backend
from keepwell.repository import Repository
from keepwell.sources.mysql import KIND_BINLOG
from keepwell.sources.mysql.binlog import binlog_seq
from keepwell.sources.mysql.catalog import load_catalog
from keepwell.sources.postgres.catalog import Catalog
from keepwell.sources.postgres.walnames import parse_segment_name
from tests.integration.control_support import CLI, PASSWORD, env, init_repository
from tests.servers.mariadb import ROOT_PASSWORD, MariaDBServer, fill_sample, mariadb_available
from tests.servers.postgres import PG_USER, PgCluster, PgEnv, as_pg_user, chown_pg

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# shorter than the time between two backups: the window holds the newest base only
WINDOW = "1ms"


def _daemon_backup(config: Path, log: Path, environ: dict[str, str],
                   user: str | None = None) -> None:
    """One backup by a real daemon (every two seconds, stopped once the first has started)."""
    doc = yaml.safe_load(config.read_text())
    for src in doc["sources"].values():
        src["schedule"] = "*/2 * * * * *"
    doc["limits"] = {"shutdown_grace": "10m"}
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    options: dict[str, Any] = {}
    if user is not None:
        pw = pwd.getpwnam(user)
        options = {"user": pw.pw_uid, "group": pw.pw_gid,
                   "extra_groups": os.getgrouplist(user, pw.pw_gid)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([servers_pg.PYTHON, "-m", "keepwell.cli.control", "daemon",
                                 "-c", str(config), "--log-json"], env=environ, stdout=out,
                                stderr=out, **options)
    try:
        deadline = time.monotonic() + 120
        while '"job_started"' not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the daemon started no backup"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]
    finished = [e for e in events if e.get("event") == "job_finished"]
    assert [e["status"] for e in finished] == ["succeeded"], log.read_text()[-3000:]


def _with_retention(config: Path) -> None:
    doc = yaml.safe_load(config.read_text())
    for src in doc["sources"].values():
        src["retention"] = {"keep_within": WINDOW}
    config.write_text(yaml.safe_dump(doc, sort_keys=False))


def _snapshots(repo: Path, password: str) -> list[Any]:
    os.environ["KEEPWELL_TESTONLY_WEAK_KDF"] = "1"
    with Repository.open(open_backend(str(repo)), password) as r:
        return r.list_snapshots()


@contextmanager
def _backup_runs(history: Path) -> Iterator[list[sqlite3.Row]]:
    """The succeeded backup runs of a job history, oldest first."""
    db = sqlite3.connect(history)
    db.row_factory = sqlite3.Row
    try:
        yield db.execute("SELECT * FROM runs WHERE action='backup' AND status='succeeded'"
                         " ORDER BY id").fetchall()
    finally:
        db.close()


# -- PostgreSQL ------------------------------------------------------------------------------
def _pg_environ(pg: PgEnv) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "KEEPWELL_"))}
    e.update(HOME=str(pg.workdir), KEEPWELL_TESTONLY_WEAK_KDF="1",
             PYTHONPATH=str(servers_pg.REPO_ROOT / "src"))
    return e


def _pg_run(pg: PgEnv, config: Path) -> str:
    res = subprocess.run(as_pg_user([servers_pg.PYTHON, "-m", "keepwell.cli.control", "run",
                                     "orders", "--json", "-c", str(config)]),
                         env=_pg_environ(pg), capture_output=True, text=True, timeout=600,
                         cwd=str(pg.workdir))
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert out["status"] == "succeeded", out
    return str(out["snapshot_id"])


def test_daemon_retention_of_postgres_keeps_the_window_start_and_forgets_wal_below_it(
        pg_env: PgEnv) -> None:
    password = pg_env.password_file.read_text().strip()
    c = PgCluster(pg_env.workdir).initdb()
    c.set_archive_command(pg_env.wal_hook_command("push", "%p"))
    c.start()
    c.sql("CREATE TABLE items (id int PRIMARY KEY)")
    state = pg_env.workdir / "state"
    state.mkdir()
    chown_pg(state)
    config = pg_env.workdir / "keepwell.yaml"
    config.write_text(yaml.safe_dump({
        "history": str(state / "history.db"),
        "metrics": {"listen": None},
        "repositories": {"main": {"location": str(pg_env.repo),
                                  "password": f"file:{pg_env.password_file}"}},
        "sources": {"orders": {"kind": "postgres", "repository": "main", "mode": "physical",
                               "connection": {"host": "127.0.0.1", "port": c.port,
                                              "user": PG_USER, "database": "postgres"}}},
    }, sort_keys=False))
    chown_pg(config)
    bases = []
    for i in range(3):
        c.sql(f"INSERT INTO items SELECT g FROM generate_series({i * 100}, {i * 100 + 99}) g")
        c.switch_wal()
        c.wait_archived()
        bases.append(_pg_run(pg_env, config))
        c.switch_wal()
        c.wait_archived()
    before = Catalog.build(_snapshots(pg_env.repo, password), "main")
    assert [b.snapshot_id for b in before.backups] == bases
    start = next(b for b in before.backups if b.snapshot_id == bases[2])
    floor = start.start_segno()
    below = {sid for sid, names in before.wal_snapshots.items()
             if _below(names, floor, before.segment_size)}
    assert below, "WAL archived before the window's first base"

    _with_retention(config)
    chown_pg(config)
    _daemon_backup(config, pg_env.workdir / "daemon.log", _pg_environ(pg_env), user=PG_USER)

    after = Catalog.build(_snapshots(pg_env.repo, password), "main")
    kept = [b.snapshot_id for b in after.backups]
    assert kept[:1] == [bases[2]] and len(kept) == 2, "the window's first base stays"
    assert all(after.is_complete(b) for b in after.backups), "with the WAL each needs"
    assert not below & set(after.wal_snapshots), "the WAL below the oldest kept base is gone"
    assert set(before.wal_snapshots) - below <= set(after.wal_snapshots), "the rest stays"
    reach = after.reach(after.backups[0])
    assert not reach.missing and reach.end_lsn >= after.backups[1].stop_lsn
    with _backup_runs(state / "history.db") as runs:
        details = json.loads(runs[-1]["details"])
    assert sorted(details["forgotten"]) == sorted(b[:8] for b in bases[:2])
    assert details["forgotten_logs"] == len(below) and details["log_floor"]


def _below(names: list[str], floor: int, segment_size: int) -> bool:
    """Whether every file of a WAL snapshot is a segment below ``floor`` (history files are
    kept whatever their age)."""
    parsed = [parse_segment_name(n[:24], segment_size) for n in names]
    return all(p is not None and p[1] < floor for p in parsed)


# -- MySQL/MariaDB ---------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path: Path) -> Iterator[MariaDBServer]:
    if not mariadb_available():
        pytest.skip("MariaDB is not installed")
    s = MariaDBServer(tmp_path / "server")
    (tmp_path / "server").mkdir()
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _my_environ() -> dict[str, str]:
    e = env()
    e["KW_DB_PASSWORD"] = ROOT_PASSWORD
    return e


def test_daemon_retention_of_mysql_keeps_the_window_start_and_forgets_binlogs_below_it(
        server: MariaDBServer, tmp_path: Path) -> None:
    fill_sample(server, "shop", rows=200)
    repo = tmp_path / "repo"
    init_repository(repo)
    config = tmp_path / "keepwell.yaml"
    config.write_text(yaml.safe_dump({
        "history": str(tmp_path / "history.db"),
        "metrics": {"listen": None},
        "repositories": {"main": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"shop": {"kind": "mysql", "repository": "main", "mode": "logical",
                             "tags": ["nightly"],
                             "connection": {"host": "127.0.0.1", "port": server.port,
                                            "user": "root", "password": "env:KW_DB_PASSWORD"}}},
    }, sort_keys=False))
    push_env = env()
    push_env.update(KEEPWELL_REPOSITORY=str(repo), KEEPWELL_PASSWORD=PASSWORD)
    bases = []
    for i in range(3):
        server.sql(f"INSERT INTO shop.items VALUES ({90000 + i}, 'day {i}', 1, '')")
        res = subprocess.run([*CLI, "run", "shop", "--json", "-c", str(config)],
                             env=_my_environ(), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        bases.append(json.loads(res.stdout)["snapshot_id"])
        server.sql(f"INSERT INTO shop.items VALUES ({91000 + i}, 'after {i}', 1, '')")
        subprocess.run([sys.executable, "-m", "keepwell.cli.main", "mysql", "binlog-push",
                        "--flush", "--db-url", server.url], env=push_env, check=True,
                       capture_output=True, timeout=120)
    os.environ["KEEPWELL_TESTONLY_WEAK_KDF"] = "1"
    with Repository.open(open_backend(str(repo)), PASSWORD) as r:
        before = load_catalog(r)
        assert all({"source:shop", "nightly"} <= set(r.find_snapshot(b).tags) for b in bases)
    assert [b.snapshot_id for b in before.bases] == bases
    start = next(b for b in before.bases if b.snapshot_id == bases[2])
    assert start.position is not None
    below = {f.snapshot_id for f in before.files.values() if f.seq < start.position.seq}
    assert below, "binlogs archived before the window's first base"

    _with_retention(config)
    _daemon_backup(config, tmp_path / "daemon.log", _my_environ())

    with Repository.open(open_backend(str(repo)), PASSWORD) as r:
        after = load_catalog(r)
        binlog_snaps = {s.id for s in r.list_snapshots() if s.kind == KIND_BINLOG}
    kept = [b.snapshot_id for b in after.bases]
    assert kept[:1] == [bases[2]] and len(kept) == 2, "the window's first base stays"
    assert after.reach(after.bases[0]) is not None, "it still rolls forward"
    assert not below & binlog_snaps, "the binlogs below the oldest kept base are gone"
    assert min(binlog_seq(f.name) for f in after.files.values()) >= start.position.seq
    with _backup_runs(tmp_path / "history.db") as runs:
        details = json.loads(runs[-1]["details"])
    assert sorted(details["forgotten"]) == sorted(b[:8] for b in bases[:2])
    assert details["forgotten_logs"] >= 1 and details["log_floor"]
