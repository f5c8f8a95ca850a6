"""WAL archiving through repository write failures: nothing is acknowledged that a restore could
not read, and ``postgres check`` fails on archived WAL a restore could not read."""

from __future__ import annotations

import json
import os
import time

import pytest

import tests.servers.postgres as servers_pg
from tests.servers.postgres import PgCluster, PgEnv, backed_up_cluster, free_port

pg_env = servers_pg.pg_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def wait_for(predicate: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_short_index_write_failure_leaves_every_archived_segment_readable(
        pg_env: PgEnv) -> None:
    spool = pg_env.workdir / "spool"
    c = PgCluster(pg_env.workdir).initdb(archive_timeout=0)
    c.set_archive_command(pg_env.wal_push_command("--async", "--spool", str(spool), "%p"))
    c.start()
    c.sql("CREATE TABLE t (i int)")
    c.switch_wal()
    c.wait_archived()
    pg_env.keepwell("backup", "--physical", "--db-url", c.url())

    # the repository refuses new index objects for a moment (packs still go in)
    index_dir = pg_env.repo / "index"
    os.chmod(index_dir, 0o555)
    try:
        for _ in range(3):
            c.sql("INSERT INTO t SELECT generate_series(1, 1000)")
            c.switch_wal()
        wait_for(lambda: "upload failed" in ((spool / "ALERT").read_text()
                                             if (spool / "ALERT").exists() else ""),
                 "the uploader to fail")
    finally:
        os.chmod(index_dir, 0o755)
    c.wait_archived(timeout=120)
    for _ in range(2):
        c.sql("INSERT INTO t SELECT generate_series(1, 1000)")
        c.switch_wal()
    c.wait_archived(timeout=120)
    rows = c.scalar("SELECT count(*) FROM t")

    check = pg_env.keepwell("check", "--json", check=False)
    report = json.loads(check.stdout)
    assert check.returncode == 0 and not report.get("unreadable"), report["problems"]
    c.stop()
    port = free_port()
    pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "r"), "--start", "--port",
                    str(port))
    r = PgCluster(pg_env.workdir, "r", port=port)
    assert r.scalar("SELECT count(*) FROM t") == rows == 5000
    r.stop("immediate")


def test_check_fails_on_archived_wal_a_restore_could_not_read(pg_env: PgEnv) -> None:
    c = backed_up_cluster(pg_env, "t (i int)")
    c.sql("INSERT INTO t SELECT generate_series(1, 1000)")
    victim = str(c.scalar("SELECT pg_walfile_name(pg_current_wal_lsn())"))
    c.switch_wal()
    c.sql("INSERT INTO t SELECT generate_series(1, 1000)")
    c.switch_wal()
    c.wait_archived()
    assert pg_env.keepwell("check").returncode == 0
    pg_env.unindex_wal(victim)
    check = pg_env.keepwell("check", "--json", check=False)
    assert check.returncode == 1
    problems = " ".join(json.loads(check.stdout)["problems"])
    assert victim in problems and "cannot be read" in problems
