"""WAL archiving through repository write failures: nothing is acknowledged that a restore could
not read, and ``postgres check`` fails on archived WAL a restore could not read."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from keepwell.sources.postgres.walnames import Lsn, parse_segment_name
from tests.servers.postgres import PYTHON, PgCluster, PgEnv, as_pg_user, backed_up_cluster
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def spooled_segments(spool: Path) -> list[str]:
    return [n for n in os.listdir(spool / "ready") if len(n) == 24 and n.isalnum()]


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
    # acknowledged means spooled: the uploader retries the spooled segments after its back-off
    wait_for(lambda: not spooled_segments(spool), "the spool to drain", timeout=120)
    rows = c.scalar("SELECT count(*) FROM t")

    check = pg_env.keepwell("check", "--json", check=False)
    report = json.loads(check.stdout)
    assert check.returncode == 0 and not report.get("unreadable"), report["problems"]
    c.stop()
    r = pg_env.start_restored("r")
    assert r.scalar("SELECT count(*) FROM t") == rows == 5000
    r.stop("immediate")


def _archived_segment_and_one_after(c: PgCluster) -> str:
    """Rows into two WAL segments, both archived; the name of the first (one WAL comes after
    it, so a restore past it needs it)."""
    c.sql("INSERT INTO t SELECT generate_series(1, 1000)")
    victim = str(c.scalar("SELECT pg_walfile_name(pg_current_wal_lsn())"))
    c.switch_wal()
    c.sql("INSERT INTO t SELECT generate_series(1, 1000)")
    c.switch_wal()
    c.wait_archived()
    return victim


def test_check_fails_on_archived_wal_a_restore_could_not_read(pg_env: PgEnv) -> None:
    c = backed_up_cluster(pg_env, "t (i int)")
    victim = _archived_segment_and_one_after(c)
    assert pg_env.keepwell("check").returncode == 0
    pg_env.unindex_wal(victim)
    check = pg_env.keepwell("check", "--json", check=False)
    assert check.returncode == 1
    problems = " ".join(json.loads(check.stdout)["problems"])
    assert victim in problems and "cannot be read" in problems


def test_check_names_damaged_wal_and_the_restores_it_cuts_short(pg_env: PgEnv) -> None:
    """Once a check of the data found a WAL file corrupt, 'postgres check' says so (not that
    an index is missing, which prune would mend) and which backups it stops where."""
    c = backed_up_cluster(pg_env, "t (i int)")
    backup = json.loads(pg_env.keepwell("info", "--json").stdout)["physical"][0]["short_id"]
    victim = _archived_segment_and_one_after(c)
    c.stop()
    pg_env.damage_wal(victim)
    read = subprocess.run(as_pg_user([PYTHON, "-c", "from keepwell.cli.main import run; run()",
                                      "check", "--read-data"]),
                          env=pg_env.env(), capture_output=True, text=True, timeout=300,
                          cwd=str(pg_env.workdir))
    assert read.returncode == 1 and str(victim) in read.stderr + read.stdout
    check = pg_env.keepwell("check", "--json", check=False)
    assert check.returncode == 1
    problems = " ".join(json.loads(check.stdout)["problems"])
    start = Lsn(parse_segment_name(victim)[1] * (16 << 20))  # type: ignore[index]
    assert f"{victim} of snapshot" in problems and "are damaged" in problems, problems
    assert f"restores from backup {backup} stop at {start}" in problems, problems
    assert "no index lists" not in problems


def writable(path: object, on: bool) -> None:
    subprocess.run(["find", str(path), "-type", "d", "-exec", "chmod", "u+w" if on else "u-w",
                    "{}", "+"], check=True)


def test_archiving_into_two_repositories_goes_on_while_one_is_down(pg_env: PgEnv) -> None:
    repo2 = pg_env.workdir / "repo2"
    pg_env.init_repo(repo2)
    spool = pg_env.workdir / "spool"
    c = PgCluster(pg_env.workdir).initdb(archive_timeout=0)
    c.set_archive_command(pg_env.wal_push_command(
        "--async", "--spool", str(spool), "--spool-max", "48M", "--repo", str(pg_env.repo),
        "--repo", str(repo2), "%p"))
    c.start()
    c.sql("CREATE TABLE t (i int)")
    for repo in (pg_env.repo, repo2):
        pg_env.keepwell("backup", "--physical", "--db-url", c.url(),
                        env={"KEEPWELL_REPOSITORY": str(repo)})

    writable(repo2, False)  # the second repository goes down
    try:
        for _ in range(2):
            c.sql("INSERT INTO t SELECT generate_series(1, 1000)")
            c.switch_wal()
        c.wait_archived(timeout=120)  # the first one is not held back
        last = str(c.scalar("SELECT last_archived_wal FROM pg_stat_archiver"))
        info = json.loads(pg_env.keepwell("info", "--json").stdout)
        assert info["wal"]["timelines"]["1"]["last"] == last
        report = pg_env.keepwell("check", "--spool", str(spool), "--json", check=False)
        assert report.returncode == 1
        assert "repo2:" in json.loads(report.stdout)["spool"]["alert"]
        # ... until the down repository's spool is full: then nothing is acknowledged
        for _ in range(4):
            c.sql("INSERT INTO t SELECT generate_series(1, 1000)")
            c.switch_wal()
        wait_for(lambda: "is full" in c.log_text(), "the second spool to fill")
        assert str(repo2) in c.log_text()
        assert list((c.datadir / "pg_wal" / "archive_status").glob("*.ready"))
    finally:
        writable(repo2, True)
    c.wait_archived(timeout=180)
    rows = c.scalar("SELECT count(*) FROM t")
    c.stop()
    for repo in (pg_env.repo, repo2):  # both whole: every segment, no gap
        at = {"KEEPWELL_REPOSITORY": str(repo)}
        wait_for(lambda at=at: pg_env.keepwell("check", check=False, env=at).returncode == 0,
                 f"{repo} to be complete", timeout=120)
        r = pg_env.start_restored(f"r-{repo.name}", env=at)
        assert r.scalar("SELECT count(*) FROM t") == rows == 6000
        r.stop("immediate")
