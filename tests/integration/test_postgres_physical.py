"""Physical backups and point-in-time restore against real PostgreSQL clusters."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.servers.postgres import PgCluster, PgEnv, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def archiving_cluster(env: PgEnv, name: str = "pg") -> PgCluster:
    c = PgCluster(env.workdir, name).initdb()
    c.set_archive_command(
        env.wal_push_command("--async", "--spool", str(env.workdir / "spool"), "%p")
    )
    return c.start()


def pgbench_consistent(c: PgCluster) -> None:
    """pgbench's invariant: every balance table sums to the sum of the history's deltas."""
    sums = c.sql(
        "SELECT (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts),"
        " (SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches),"
        " (SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers),"
        " (SELECT coalesce(sum(delta), 0) FROM pgbench_history)"
    )[0]
    assert len(set(sums)) == 1, sums
    assert c.scalar("SELECT count(*) FROM pgbench_accounts") == 100000


@pytest.mark.parametrize("method", ["copy", "stream"])
def test_physical_round_trip_under_load_verifies(pg_env: PgEnv, method: str) -> None:
    """Both ways of taking the copy (reading the data directory here; pg_basebackup) restore
    to a cluster that pg_verifybackup, pgbench's invariant and pg_amcheck accept."""
    c = archiving_cluster(pg_env)
    c.pgbench_init(1)
    with c.pgbench_load(seconds=20):
        time.sleep(1)
        res = pg_env.keepwell("backup", "--physical", "--db-url", c.url(), "--json",
                              *(["--method", "stream"] if method == "stream" else []))
        time.sleep(1)
    out = json.loads(res.stdout)
    assert out["complete"] is True
    assert out["method"] == method  # "auto" copies when the data directory is readable here
    c.switch_wal()
    c.wait_archived()
    info = json.loads(pg_env.keepwell("info", "--json").stdout)
    assert info["physical"][0]["complete"] is True
    assert info["system_identifier"] == str(
        c.scalar("SELECT system_identifier FROM pg_control_system()")
    )

    target = pg_env.workdir / "restored"
    pg_env.keepwell("restore", "--target-dir", str(target), "--immediate")
    verify = c.run_as_pg([c.bin("pg_verifybackup"), "-n", str(target)], check=False)
    assert verify.returncode == 0, verify.stderr
    c.stop()
    r = PgCluster(pg_env.workdir, "restored", port=free_port())
    r.start()
    deadline = time.monotonic() + 60
    while r.scalar("SELECT pg_is_in_recovery()") and time.monotonic() < deadline:
        time.sleep(0.2)
    pgbench_consistent(r)
    amcheck = r.run_as_pg([r.bin("pg_amcheck"), "-h", "127.0.0.1", "-p", str(r.port),
                           "-U", "postgres", "--all", "--install-missing"], check=False)
    assert amcheck.returncode == 0, amcheck.stdout + amcheck.stderr


def test_pitr_exact_by_time_lsn_and_xid(pg_env: PgEnv) -> None:
    c = archiving_cluster(pg_env)
    c.sql("CREATE TABLE marks (i int PRIMARY KEY)")
    pg_env.keepwell("backup", "--physical", "--db-url", c.url())
    commits = []  # (i, xid, lsn after commit, time after commit)
    for i in range(6):
        with c.connect() as conn:
            with conn.transaction():
                xrow = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
                conn.execute("INSERT INTO marks VALUES (%s)", (i,))
            row = conn.execute("SELECT pg_current_wal_lsn()::text, clock_timestamp()").fetchone()
        assert xrow is not None and row is not None
        xid, (lsn, now) = xrow[0], row
        commits.append((i, int(xid), lsn, now))
        time.sleep(0.3)
    c.switch_wal()
    c.wait_archived()

    def restored_rows(name: str, *target: str) -> list[int]:
        port = free_port()
        out = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / name), *target,
                              "--start", "--port", str(port), "--json")
        report = json.loads(out.stdout)
        assert report["started"] is True
        r = PgCluster(pg_env.workdir, name, port=port)
        rows = [row[0] for row in r.sql("SELECT i FROM marks ORDER BY i")]
        r.stop("immediate")
        return rows

    # by time: half-way between commits k and k+1 -> rows 0..k exactly
    for k in (0, 2, 4):
        mid = commits[k][3] + (commits[k + 1][3] - commits[k][3]) / 2
        assert restored_rows(f"t{k}", "--target-time", mid.isoformat()) == list(range(k + 1))
    # by LSN: the position right after commit 3
    assert restored_rows("lsn", "--target-lsn", commits[3][2]) == [0, 1, 2, 3]
    # by xid: inclusive, and --exclusive stops just before it
    assert restored_rows("xid", "--target-xid", str(commits[1][1])) == [0, 1]
    assert restored_rows("xid2", "--target-xid", str(commits[1][1]), "--exclusive") == [0]


def test_pitr_by_restore_point_name(pg_env: PgEnv) -> None:
    c = archiving_cluster(pg_env)
    c.sql("CREATE TABLE marks (i int PRIMARY KEY)")
    first = json.loads(pg_env.keepwell("backup", "--physical", "--db-url", c.url(),
                                       "--json").stdout)
    c.sql("INSERT INTO marks VALUES (1)")
    point = json.loads(pg_env.keepwell("restore-point", "before-two", "--db-url", c.url(),
                                       "--json").stdout)
    c.sql("INSERT INTO marks VALUES (2)")
    second = json.loads(pg_env.keepwell("backup", "--physical", "--db-url", c.url(),
                                        "--json").stdout)
    c.sql("INSERT INTO marks VALUES (3)")
    c.sql("SELECT pg_create_restore_point('made-in-sql')")
    c.sql("INSERT INTO marks VALUES (4)")
    c.switch_wal()
    c.wait_archived()
    info = json.loads(pg_env.keepwell("info", "--json").stdout)
    assert [p["name"] for p in info["restore_points"]] == ["before-two"]
    assert info["restore_points"][0]["lsn"] == point["lsn"]

    def restore(name: str, *target: str) -> tuple[dict[str, object], list[int]]:
        port = free_port()
        out = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / name), *target,
                              "--start", "--port", str(port), "--json")
        r = PgCluster(pg_env.workdir, name, port=port)
        rows = [row[0] for row in r.sql("SELECT i FROM marks ORDER BY i")]
        r.stop("immediate")
        return json.loads(out.stdout), rows

    # the recorded point lies before the second backup ended: the first backup is the one
    report, rows = restore("by-name", "--target-name", "before-two")
    assert rows == [1]
    assert str(first["snapshot"]).startswith(str(report["backup"]))
    assert report["restore_point_lsn"] == point["lsn"] and report["note"] is None
    assert "before-two" in str(report["stopped_at"])
    # a point made in SQL is unknown to keepwell: the newest backup, and a note says so
    report, rows = restore("by-sql-name", "--target-name", "made-in-sql")
    assert rows == [1, 2, 3]
    assert str(second["snapshot"]).startswith(str(report["backup"]))
    assert "not recorded" in str(report["note"])
    # the second backup cannot reach the recorded point: refused with one line, before writing
    refused = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "refused"),
                              "--target-name", "before-two", "--snapshot",
                              str(second["snapshot"])[:8], check=False)
    assert refused.returncode == 1 and "ends after restore point 'before-two'" in refused.stderr
    assert refused.stderr.count("\n") == 1 and not (pg_env.workdir / "refused").exists()


def test_timeline_switch_and_restore_on_new_timeline(pg_env: PgEnv) -> None:
    c = archiving_cluster(pg_env)
    c.sql("CREATE TABLE marks (i int)")
    pg_env.keepwell("backup", "--physical", "--db-url", c.url())
    c.sql("INSERT INTO marks VALUES (1)")
    time.sleep(0.3)
    cut = c.scalar("SELECT clock_timestamp()")
    time.sleep(0.3)
    c.sql("INSERT INTO marks VALUES (2)")
    c.switch_wal()
    c.wait_archived()
    c.stop()

    port = free_port()
    pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "tl2"), "--target-time",
                    cut.isoformat(), "--archive-mode", "preserve", "--start", "--port",
                    str(port))
    r = PgCluster(pg_env.workdir, "tl2", port=port)
    assert r.scalar("SELECT timeline_id FROM pg_control_checkpoint()") == 2
    r.sql("INSERT INTO marks VALUES (20)")
    r.switch_wal()
    r.wait_archived()
    info = json.loads(pg_env.keepwell("info", "--json").stdout)
    assert "00000002.history" in info["wal"]["history_files"]
    assert "2" in info["wal"]["timelines"]
    r.stop()
    # a timeline the archive does not hold: refused before anything is written
    res = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "tl9"),
                          "--target-timeline", "9", check=False)
    assert res.returncode == 1 and "timeline 9 is not in the archive" in res.stderr
    assert res.stderr.count("\n") == 1 and not (pg_env.workdir / "tl9").exists()

    port2 = free_port()
    pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "again"), "--start",
                    "--port", str(port2))
    again = PgCluster(pg_env.workdir, "again", port=port2)
    assert [row[0] for row in again.sql("SELECT i FROM marks ORDER BY i")] == [1, 20]
    assert again.scalar("SELECT timeline_id FROM pg_control_checkpoint()") == 3
    again.stop("immediate")


def test_delta_restore_rewrites_only_what_differs(pg_env: PgEnv) -> None:
    c = archiving_cluster(pg_env)
    c.pgbench_init(1)
    pg_env.keepwell("backup", "--physical", "--db-url", c.url())
    c.stop()
    target = pg_env.workdir / "delta"
    pg_env.keepwell("restore", "--target-dir", str(target), "--immediate")
    refused = pg_env.keepwell("restore", "--target-dir", str(target), "--immediate",
                              check=False)
    assert refused.returncode != 0 and "--delta" in refused.stderr
    stray = Path(target, "base", "stray-file")
    Path(target, "global", "pg_control").write_bytes(b"x" * 8192)
    c.run_as_pg(["touch", str(stray)])
    out = json.loads(pg_env.keepwell("restore", "--target-dir", str(target), "--immediate",
                                     "--delta", "--json").stdout)
    assert 0 < out["written_files"] < out["files"] / 10
    assert out["removed"] >= 1 and not stray.exists()
    verify = c.run_as_pg([c.bin("pg_verifybackup"), "-n", str(target)], check=False)
    assert verify.returncode == 0, verify.stderr


def test_forget_keeps_the_wal_retained_backups_need(pg_env: PgEnv) -> None:
    c = archiving_cluster(pg_env)
    c.sql("CREATE TABLE marks (i int)")
    for i in range(2):
        c.sql("INSERT INTO marks VALUES (%s)", (i,))
        c.switch_wal()
        pg_env.keepwell("backup", "--physical", "--db-url", c.url())
        c.sql("INSERT INTO marks VALUES (%s)", (10 + i,))
        c.switch_wal()
    c.wait_archived()
    before = json.loads(pg_env.keepwell("info", "--json").stdout)
    first_wal = before["wal"]["timelines"]["1"]["first"]
    out = json.loads(pg_env.keepwell("forget", "--keep-last", "1", "--json").stdout)
    assert len(out["forget_physical"]) == 1 and out["forget_wal_snapshots"] >= 1
    after = json.loads(pg_env.keepwell("info", "--json").stdout)
    kept = after["physical"]
    assert [b["short_id"] for b in kept] == [before["physical"][1]["short_id"]]
    assert after["wal"]["timelines"]["1"]["first"] > first_wal
    assert kept[0]["complete"]
    assert pg_env.keepwell("check").returncode == 0
    c.stop()
    port = free_port()
    pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "r"), "--start",
                    "--port", str(port))
    r = PgCluster(pg_env.workdir, "r", port=port)
    assert [row[0] for row in r.sql("SELECT i FROM marks ORDER BY i")] == [0, 1, 10, 11]
    r.stop("immediate")


def test_backup_from_standby_restores(pg_env: PgEnv) -> None:
    import threading

    c = archiving_cluster(pg_env)
    c.sql("CREATE TABLE marks (i int)")
    c.sql("INSERT INTO marks SELECT generate_series(1, 100)")
    standby_dir = pg_env.workdir / "standby"
    c.run_as_pg([c.bin("pg_basebackup"), "-h", "127.0.0.1", "-p", str(c.port), "-U",
                 "postgres", "-D", str(standby_dir), "-R", "-X", "stream", "-c", "fast"])
    s = PgCluster(pg_env.workdir, "standby", port=free_port())
    s.configure(archive_mode="off")
    s.start()
    assert s.scalar("SELECT pg_is_in_recovery()") is True
    stop = threading.Event()

    def switcher() -> None:  # the primary finishes the segments the standby's backup needs
        while not stop.is_set():
            c.sql("INSERT INTO marks VALUES (0)")
            c.switch_wal()
            stop.wait(0.5)

    t = threading.Thread(target=switcher)
    t.start()
    try:
        out = json.loads(pg_env.keepwell("backup", "--physical", "--db-url", s.url(),
                                         "--json").stdout)
    finally:
        stop.set()
        t.join()
    assert out["complete"]
    info = json.loads(pg_env.keepwell("info", "--json").stdout)
    assert info["physical"][0]["from_standby"] is True
    c.wait_archived()
    s.stop()
    c.stop()
    port = free_port()
    pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "r"), "--start",
                    "--port", str(port))
    r = PgCluster(pg_env.workdir, "r", port=port)
    assert r.scalar("SELECT count(*) FROM marks WHERE i > 0") == 100
    r.stop("immediate")


def test_tablespace_is_remapped(pg_env: PgEnv) -> None:
    c = archiving_cluster(pg_env)
    ts = pg_env.workdir / "ts1"
    c.run_as_pg(["mkdir", str(ts)])
    c.sql(f"CREATE TABLESPACE ts1 LOCATION '{ts}'")
    c.sql("CREATE TABLE inspace TABLESPACE ts1 AS SELECT generate_series(1, 5000) AS i")
    refused = pg_env.keepwell("backup", "--physical", "--db-url", c.url(), "--method", "copy",
                              check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "cannot copy the data directory: the cluster has tablespaces" in refused.stderr
    out = json.loads(pg_env.keepwell("backup", "--physical", "--db-url", c.url(), "--json").stdout)
    assert out["method"] == "stream"  # auto: pg_basebackup copies the tablespaces
    c.switch_wal()
    c.wait_archived()
    c.stop()
    moved = pg_env.workdir / "ts1-moved"
    port = free_port()
    pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "r"), "--tablespace-map",
                    f"ts1={moved}", "--start", "--port", str(port))
    r = PgCluster(pg_env.workdir, "r", port=port)
    assert r.scalar("SELECT count(*) FROM inspace") == 5000
    assert r.scalar("SELECT pg_tablespace_location(oid) FROM pg_tablespace"
                    " WHERE spcname = 'ts1'") == str(moved)
    r.stop("immediate")
