"""Point-in-time restores that stop where asked or fail loudly: gaps in the archive, damaged
WAL ahead of the target, time targets without a zone or past the end of the archive."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.servers.postgres import PgCluster, PgEnv, backed_up_cluster, free_port
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def cluster_with_marks(env: PgEnv, segments: int) -> tuple[PgCluster, list[tuple[int, str, str]]]:
    """`backed_up_cluster`, then one committed row per WAL segment: [(row, LSN after its
    commit, segment it is in)]."""
    c = backed_up_cluster(env)
    rows = []
    for i in range(segments):
        c.sql("INSERT INTO marks VALUES (%s)", (i,))
        lsn, seg = c.sql("SELECT pg_current_wal_lsn()::text,"
                         " pg_walfile_name(pg_current_wal_lsn())")[0]
        rows.append((i, str(lsn), str(seg)))
        c.switch_wal()
    c.wait_archived()
    return c, rows


def restored_marks(env: PgEnv, name: str, *args: str) -> tuple[list[int], str]:
    port = free_port()
    res = env.keepwell("restore", "--target-dir", str(env.workdir / name), "--start", "--port",
                       str(port), *args)
    r = PgCluster(env.workdir, name, port=port)
    rows = [row[0] for row in r.sql("SELECT i FROM marks ORDER BY i")]
    r.stop("immediate")
    return rows, res.stdout + res.stderr  # the output matters here: not start_restored


def test_restore_to_the_end_fails_at_a_gap_unless_allowed(pg_env: PgEnv) -> None:
    c, rows = cluster_with_marks(pg_env, 6)
    c.stop()
    missing = rows[3][2]  # the segment holding row 3: rows 3.. lie beyond the gap
    pg_env.forget_wal(missing)
    assert pg_env.keepwell("check", check=False).returncode == 1

    res = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "r"), "--start",
                          "--port", str(free_port()), check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert missing in res.stderr and "--allow-gap" in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert not (pg_env.workdir / "r").exists(), "refused before writing anything"

    got, out = restored_marks(pg_env, "gap", "--allow-gap")
    assert got == [0, 1, 2]
    assert f"WAL segment {missing} is missing" in out and "not replayed" in out

    # a target before the gap needs no permission; one after it is refused
    assert restored_marks(pg_env, "before", "--target-lsn", rows[1][1])[0] == [0, 1]
    after = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "after"),
                            "--target-lsn", rows[4][1], check=False)
    assert after.returncode == 1 and "past the archived WAL" in after.stderr
    assert missing in after.stderr


def test_damaged_wal_ahead_does_not_stop_an_earlier_target(pg_env: PgEnv) -> None:
    c, rows = cluster_with_marks(pg_env, 6)
    c.stop()
    pg_env.damage_wal(rows[4][2])  # read ahead by the fetch of row 1's segment
    got, _ = restored_marks(pg_env, "early", "--target-lsn", rows[1][1])
    assert got == [0, 1]
    # a restore that needs the damaged segment fails, and says which one
    res = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "late"), "--start",
                          "--port", str(free_port()), check=False)
    assert res.returncode != 0
    assert f"WAL file {rows[4][2]} cannot be restored" in res.stderr, res.stderr


def test_target_time_is_read_in_the_local_zone_and_must_be_archived(pg_env: PgEnv) -> None:
    c = backed_up_cluster(pg_env)
    stamps = []
    for i in range(3):
        c.sql("INSERT INTO marks VALUES (%s)", (i,))
        stamps.append(c.scalar("SELECT clock_timestamp()"))
        time.sleep(0.3)
    c.switch_wal()
    c.wait_archived()
    c.stop()
    zone = {"TZ": "KWT-5:30"}  # UTC+05:30, no tz database needed
    mid = stamps[1] + (stamps[2] - stamps[1]) / 2
    local = mid.astimezone(UTC) + timedelta(hours=5, minutes=30)
    naive = local.replace(tzinfo=None).isoformat(sep=" ")
    port = free_port()
    out = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "r"), "--target-time",
                          naive, "--start", "--port", str(port), env=zone)
    r = PgCluster(pg_env.workdir, "r", port=port)
    assert [row[0] for row in r.sql("SELECT i FROM marks ORDER BY i")] == [0, 1]
    r.stop("immediate")
    assert "+05:30" in out.stdout and "local zone KWT" in out.stdout
    assert f"{mid.astimezone(UTC):%Y-%m-%d %H:%M:%S}" in out.stdout

    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    res = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "f"),
                          "--target-time", future, check=False)
    assert res.returncode == 1 and "past the archived WAL" in res.stderr
    assert res.stderr.count("\n") == 1 and not (pg_env.workdir / "f").exists()
    report = json.loads(pg_env.keepwell("info", "--json").stdout)
    assert report["windows"], "the archive has a window to restore within"


def test_a_restored_server_runs_no_command_of_the_backed_up_configuration(pg_env: PgEnv) -> None:
    """A configuration that cleans its archive or runs a script at the end of recovery (a
    standby's, say) would act on the live cluster's files from the restored server."""
    ran = pg_env.workdir / "ran"
    c = PgCluster(pg_env.workdir).initdb(archive_timeout=0)
    c.set_archive_command(pg_env.wal_hook_command("push", "%p"))
    c.configure(recovery_end_command=f"'touch {ran}-end'",
                archive_cleanup_command=f"'touch {ran}-cleanup-%r'")
    c.start()
    c.sql("CREATE TABLE marks (i int PRIMARY KEY)")
    pg_env.keepwell("backup", "--physical", "--db-url", c.url())
    c.sql("INSERT INTO marks VALUES (1)")
    c.switch_wal()
    c.wait_archived()
    c.stop()
    port = free_port()
    pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "r"), "--start", "--port",
                    str(port))
    r = PgCluster(pg_env.workdir, "r", port=port)
    assert [row[0] for row in r.sql("SELECT i FROM marks")] == [1]
    assert r.scalar("SHOW recovery_end_command") == ""
    assert r.scalar("SHOW archive_cleanup_command") == ""
    r.stop("immediate")
    assert not list(pg_env.workdir.glob("ran*")), "a command of the backed-up server ran"


def test_a_restored_subscriber_does_not_consume_the_live_subscribers_changes(
        pg_env: PgEnv) -> None:
    """A restored copy of a logical replication subscriber would connect to the publisher
    with the live subscriber's slot and confirm changes the live subscriber then never gets;
    the default restore (--archive-mode off: a copy) starts no subscription."""
    pub = PgCluster(pg_env.workdir, "pub").initdb(wal_level="logical").start()
    pub.sql("CREATE TABLE t (i int PRIMARY KEY)")
    pub.sql("CREATE PUBLICATION p FOR TABLE t")
    sub = PgCluster(pg_env.workdir, "sub").initdb(archive_timeout=0)
    sub.set_archive_command(pg_env.wal_hook_command("push", "%p"))
    sub.start()
    sub.sql("CREATE TABLE t (i int PRIMARY KEY)")
    sub.sql(f"CREATE SUBSCRIPTION s CONNECTION 'host=127.0.0.1 port={pub.port}"
            " user=postgres dbname=postgres' PUBLICATION p")
    pub.sql("INSERT INTO t VALUES (1)")
    wait_for(lambda: sub.sql("SELECT i FROM t") == [(1,)], "the subscriber to apply row 1")
    pg_env.keepwell("backup", "--physical", "--db-url", sub.url())
    sub.stop()  # the live subscriber is down for a moment
    flushed = pub.scalar("SELECT confirmed_flush_lsn::text FROM pg_replication_slots")

    port = free_port()
    pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "r"), "--start", "--port",
                    str(port))
    r = PgCluster(pg_env.workdir, "r", port=port)
    # row 2 published once the restored copy is open: none of its subscriptions may apply it
    wait_for(lambda: r.scalar("SELECT NOT pg_is_in_recovery()"), "the restored copy to open")
    pub.sql("INSERT INTO t VALUES (2)")
    assert r.sql("SELECT i FROM t") == [(1,)]
    assert pub.sql("SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots") == [
        (False, flushed)], "the publisher's slot is the live subscriber's alone"
    assert r.scalar("SHOW max_logical_replication_workers") == "0"
    r.stop("immediate")


def test_a_time_after_the_last_archived_commit_says_what_to_do(pg_env: PgEnv) -> None:
    """Inside the archive's window but after its last commit: PostgreSQL stops only at a
    commit past the target, so recovery ends without reaching it; the failure says why."""
    c = PgCluster(pg_env.workdir).initdb(archive_timeout=0, autovacuum="off")
    c.set_archive_command(pg_env.wal_hook_command("push", "%p"))
    c.start()
    c.sql("CREATE TABLE marks (i int PRIMARY KEY)")
    pg_env.keepwell("backup", "--physical", "--db-url", c.url())
    c.sql("INSERT INTO marks VALUES (1)")
    after = c.scalar("SELECT clock_timestamp()") + timedelta(seconds=1)
    # the WAL switched once the server's clock is past the target: the window reaches it
    wait_for(lambda: c.scalar("SELECT clock_timestamp()") > after + timedelta(seconds=1),
             "the server's clock to pass the target", interval=0.1)
    c.switch_wal()
    c.wait_archived()
    c.stop()
    res = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "r"), "--target-time",
                          after.isoformat(), "--start", "--port", str(free_port()), check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "recovery ended before configured recovery target was reached" in res.stderr
    assert "restore without a target" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_start_of_a_cluster_configured_outside_its_data_directory_fails_at_once(
        pg_env: PgEnv) -> None:
    """Debian's layout: postgresql.conf and pg_hba.conf in /etc, so not in the backup. The
    server cannot start; the restore says why at once instead of waiting out its timeout."""
    c = PgCluster(pg_env.workdir).initdb(archive_timeout=0)
    c.set_archive_command(pg_env.wal_hook_command("push", "%p"))
    etc = pg_env.workdir / "etc"
    c.run_as_pg(["mkdir", str(etc)])
    for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf"):
        c.run_as_pg(["mv", str(c.datadir / name), str(etc / name)])
    c.run_as_pg(["sh", "-c", f"printf \"data_directory = '%s'\\nhba_file = '%s'\\n"
                 f"ident_file = '%s'\\n\" {c.datadir} {etc}/pg_hba.conf {etc}/pg_ident.conf"
                 f" >> {etc}/postgresql.conf"])
    c.run_as_pg([c.bin("pg_ctl"), "-D", str(etc), "-l", str(c.logfile), "-o",
                 f"-p {c.port}", "-w", "start"])
    try:
        c.sql("CREATE TABLE marks (i int)")
        pg_env.keepwell("backup", "--physical", "--db-url", c.url())
        c.switch_wal()
        c.wait_archived()
    finally:
        c.run_as_pg([c.bin("pg_ctl"), "-D", str(etc), "-m", "fast", "-w", "stop"])
    began = time.monotonic()
    res = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "r"), "--start",
                          "--port", str(free_port()), check=False, timeout=120)
    assert res.returncode == 1 and time.monotonic() - began < 60, res.stdout + res.stderr
    assert "holds no postgresql.conf" in res.stderr and "pg_hba.conf" in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
