"""Restores and drills on the live cluster's own host never write into its files.

The live cluster has a tablespace in its base backup and one created by WAL archived after the
backup (PostgreSQL replays ``CREATE TABLESPACE`` at the absolute path in the record). A PITR
restore and a restore drill run on the same host while it runs; every file of its data directory
and tablespaces must be byte-identical afterwards, its committed rows still there, and the
restored copies must hold all the data, with their tablespaces inside their own directories.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.servers.postgres import PgCluster, PgEnv, control, control_config, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def tree_digest(*roots: Path, wal: tuple[str, int] | None = None) -> dict[str, str]:
    """sha256 of every file (and the target of every link) under `roots`; of the WAL segment
    being written (`wal`: its name and the insert position in it) only the part written so far,
    since the live server appends its own records (standby snapshots) whenever it likes."""
    out: dict[str, str] = {}
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    out[path] = "link:" + os.readlink(path)
                    continue
                with open(path, "rb") as f:
                    data = f.read(wal[1] if wal and name == wal[0] else -1)
                out[path] = hashlib.sha256(data).hexdigest()
            for name in _dirs:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    out[path] = "link:" + os.readlink(path)
    return out


def live_cluster_with_tablespaces(env: PgEnv, *, in_base: bool = True
                                  ) -> tuple[PgCluster, Path, Path]:
    """A running cluster with tablespace ts1 (in its base backup unless `in_base` is false:
    then created after it too) and ts2, created by WAL archived after the base backup."""
    c = PgCluster(env.workdir).initdb(autovacuum="off", archive_timeout=0,
                                      checkpoint_timeout="'1h'")
    c.set_archive_command(
        env.wal_push_command("--async", "--spool", str(env.workdir / "spool"), "%p"))
    c.start()
    ts1, ts2 = env.workdir / "ts1", env.workdir / "ts2"
    for d in (ts1, ts2):
        c.run_as_pg(["mkdir", str(d)])
    if not in_base:
        env.keepwell("backup", "--physical", "--db-url", c.url())
    c.sql(f"CREATE TABLESPACE ts1 LOCATION '{ts1}'")
    c.sql("CREATE TABLE old_rows (id int PRIMARY KEY, v int) TABLESPACE ts1")
    c.sql("INSERT INTO old_rows SELECT g, 0 FROM generate_series(1, 2000) g")
    if in_base:
        env.keepwell("backup", "--physical", "--db-url", c.url())
    # after the base: a tablespace the replayed WAL creates, and rows in both
    c.sql(f"CREATE TABLESPACE ts2 LOCATION '{ts2}'")
    c.sql("CREATE TABLE new_rows (id int PRIMARY KEY, v int) TABLESPACE ts2")
    c.sql("INSERT INTO new_rows SELECT g, 1 FROM generate_series(1, 3000) g")
    for _ in range(10):
        c.sql("UPDATE old_rows SET v = v + 1 WHERE id <= 100")
        c.sql("UPDATE new_rows SET v = v + 1 WHERE id <= 100")
    c.switch_wal()
    c.wait_archived()
    c.sql("CHECKPOINT")
    return c, ts1, ts2


def unchanged(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The files that differ (or appeared, or went) between two digests."""
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))


def insert_position(c: PgCluster) -> tuple[str, int]:
    name, offset = c.sql("SELECT file_name, file_offset FROM"
                         " pg_walfile_name_offset(pg_current_wal_insert_lsn())")[0]
    return str(name), int(offset)


@pytest.mark.parametrize("in_base", [False, True], ids=["wal-only", "base-and-wal"])
def test_pitr_and_drill_on_the_live_host_leave_its_files_untouched(pg_env: PgEnv,
                                                                    in_base: bool) -> None:
    c, ts1, ts2 = live_cluster_with_tablespaces(pg_env, in_base=in_base)
    wal = insert_position(c)
    before = tree_digest(c.datadir, ts1, ts2, wal=wal)
    assert any(p.startswith(str(ts2)) for p in before), "the WAL-created tablespace has files"

    # PITR to the end of the archived WAL, started, on the same host as the live cluster
    port = free_port()
    out = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "r"), "--start",
                          "--port", str(port), "--json")
    assert json.loads(out.stdout)["started"] is True
    r = PgCluster(pg_env.workdir, "r", port=port)
    assert unchanged(before, tree_digest(c.datadir, ts1, ts2, wal=wal)) == []
    assert r.scalar("SELECT count(*) FROM new_rows") == 3000
    assert r.scalar("SELECT sum(v) FROM new_rows") == 3000 + 10 * 100
    assert r.scalar("SELECT sum(v) FROM old_rows") == 10 * 100
    locations = dict(r.sql("SELECT spcname, pg_tablespace_location(oid) FROM pg_tablespace"
                           " WHERE spcname LIKE 'ts%'"))
    assert set(locations) == {"ts1", "ts2"}
    for loc in locations.values():  # in place: inside the restored data directory
        assert loc.startswith("pg_tblspc/"), locations
    r.stop()

    # a drill of the same cluster on the same host
    config = control_config(pg_env, c, drills={"live-drill": {
        "source": "live", "tables": {"public.new_rows": 3000, "public.old_rows": 2000}}})
    drill = control(pg_env, config, "drill", "live-drill", "--json")
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert json.loads(drill.stdout)["status"] == "succeeded"

    # the live cluster: every file as it was, every committed update still there
    assert unchanged(before, tree_digest(c.datadir, ts1, ts2, wal=wal)) == []
    assert c.scalar("SELECT sum(v) FROM new_rows") == 3000 + 10 * 100
    assert c.scalar("SELECT sum(v) FROM old_rows") == 10 * 100


def test_restore_refuses_paths_a_running_server_uses(pg_env: PgEnv) -> None:
    c, ts1, ts2 = live_cluster_with_tablespaces(pg_env)
    wal = insert_position(c)
    before = tree_digest(c.datadir, ts1, ts2, wal=wal)
    cases = [
        (["--target-dir", str(c.datadir), "--delta"], "data directory of the running server"),
        (["--target-dir", str(pg_env.workdir)], "holds"),
        (["--target-dir", str(pg_env.workdir / "r1"), "--tablespace-map", f"ts1={ts1}",
          "--delta"], "tablespace of the running server"),
        (["--target-dir", str(pg_env.workdir / "r2"), "--tablespace-map-all",
          str(pg_env.workdir)], "holds"),
    ]
    for args, why in cases:
        res = pg_env.keepwell("restore", *args, check=False)
        assert res.returncode != 0, args
        assert why in res.stderr and "refusing" in res.stderr, res.stderr
        assert "--delta" not in res.stderr.split("refusing", 1)[1], res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    port = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "r4"), "--start",
                           "--port", str(c.port), check=False)
    assert port.returncode != 0 and f"port {c.port} is in use" in port.stderr
    for name in ("r1", "r2", "r4"):
        assert not (pg_env.workdir / name).exists(), "refused before writing anything"
    # mapping a tablespace the WAL creates onto its live location is refused at replay
    port = free_port()
    oid = c.scalar("SELECT oid FROM pg_tablespace WHERE spcname = 'ts2'")
    res = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "r3"),
                          "--tablespace-map", f"{oid}={ts2}", "--start", "--port", str(port),
                          check=False)
    assert res.returncode != 0
    assert tree_digest(c.datadir, ts1, ts2, wal=wal) == before
    assert c.scalar("SELECT sum(v) FROM new_rows") == 3000 + 10 * 100
    # the restored configuration names the live server's port: not started, said plainly
    c.sql(f"ALTER SYSTEM SET port = {c.port}")
    pg_env.keepwell("backup", "--physical", "--db-url", c.url())
    res = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "r5"), "--start",
                          check=False)
    assert res.returncode != 0
    assert f"port {c.port} of the restored configuration is in use" in res.stderr


def test_restore_refuses_the_wal_directory_of_a_running_server(pg_env: PgEnv) -> None:
    """pg_wal on another disk (``initdb --waldir``) is the running server's as much as its data
    directory: a delta restore there would replace its WAL with a data directory."""
    disk = pg_env.workdir / "waldisk"
    c = PgCluster(pg_env.workdir).initdb(waldir=disk / "pg_wal", archive_timeout=0)
    c.set_archive_command(pg_env.wal_hook_command("push", "%p"))
    c.start()
    c.sql("CREATE TABLE marks (i int)")
    pg_env.keepwell("backup", "--physical", "--db-url", c.url())
    c.wait_archived()
    wal = insert_position(c)
    before = tree_digest(disk, wal=wal)
    cases = [
        (["--target-dir", str(disk / "pg_wal"), "--delta"], "is the WAL directory"),
        (["--target-dir", str(disk), "--delta"], "holds"),
        (["--target-dir", str(pg_env.workdir / "r"), "--tablespace-map-all", str(disk)], "holds"),
    ]
    for args, why in cases:
        res = pg_env.keepwell("restore", *args, check=False)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        assert why in res.stderr and "refusing" in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert unchanged(before, tree_digest(disk, wal=wal)) == []
    assert not (pg_env.workdir / "r").exists()
    c.sql("INSERT INTO marks VALUES (1)")


def test_tablespace_created_by_wal_goes_where_mapped(pg_env: PgEnv) -> None:
    c, ts1, ts2 = live_cluster_with_tablespaces(pg_env)
    oid = c.scalar("SELECT oid FROM pg_tablespace WHERE spcname = 'ts2'")
    c.stop()
    elsewhere = pg_env.workdir / "t2"  # no longer than the path in the WAL record
    r = pg_env.start_restored("r", "--tablespace-map", f"ts1={pg_env.workdir / 'moved-ts1'}",
                              "--tablespace-map", f"{oid}={elsewhere}")
    locations = dict(r.sql("SELECT spcname, pg_tablespace_location(oid) FROM pg_tablespace"
                           " WHERE spcname LIKE 'ts%'"))
    assert locations == {"ts1": str(pg_env.workdir / "moved-ts1"), "ts2": str(elsewhere)}
    assert r.scalar("SELECT count(*) FROM new_rows") == 3000
    assert any(elsewhere.rglob("*")), "the tablespace's files are where it was mapped"
    r.stop("immediate")


def test_a_restored_cluster_with_tablespaces_inside_backs_up_and_restores(pg_env: PgEnv) -> None:
    c, _ts1, _ts2 = live_cluster_with_tablespaces(pg_env)
    c.stop()
    r = pg_env.start_restored("r", "--archive-mode", "preserve")
    pg_env.keepwell("backup", "--physical", "--db-url", r.url())
    r.sql("INSERT INTO new_rows VALUES (100000, 7)")
    r.switch_wal()
    r.wait_archived()
    r.stop()
    again = pg_env.start_restored("again")
    assert again.scalar("SELECT count(*) FROM new_rows") == 3001
    assert again.scalar("SELECT count(*) FROM old_rows") == 2000
    again.stop("immediate")
