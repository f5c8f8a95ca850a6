"""The current code reads a repository written by the first released format, and restores it.

tests/data/compat-v1 holds a repository that the released code wrote (tests/data/make_compat_v1.py
says how) and a manifest of what each snapshot must restore to. Every test works on its own copy
of the repository (tests/data is never written), through the CLI, into real servers started here:
the files, stdin and SQLite snapshots byte for byte (modes, times, symlinks and hard links
included); PostgreSQL's dump into a fresh cluster, and its base backup with the archived WAL to a
restore point and to the end of the archive, started; MariaDB's dump into a fresh server, and
rolled forward through the archived binlog to a GTID.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keepwell.repository import open_repository
from tests.integration.compat_support import (
    describe_tree,
    mariadb_counts,
    pg_counts,
    sqlite_facts,
)
from tests.servers import free_port
from tests.servers.mariadb import MariaDBServer, mariadb_available, mariadb_server
from tests.servers.postgres import PYTHON, PgCluster, PgEnv, chown_pg

pytestmark = [pytest.mark.integration]

COMPAT = Path(__file__).resolve().parents[1] / "data" / "compat-v1"
MANIFEST: dict[str, Any] = json.loads((COMPAT / "manifest.json").read_text())
PASSWORD = (COMPAT / MANIFEST["password_file"]).read_text().strip()


def copy_repository(into: Path) -> Path:
    """A private copy of the committed repository (the tests never write tests/data)."""
    dest = into / "compat-repo"
    shutil.copytree(COMPAT / "repo", dest)
    return dest


def keepwell(repo: Path, *args: str) -> str:
    """``keepwell ARGS`` of this checkout against `repo`; its output, or a failure with both
    streams."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEPWELL_", "MYSQL_"))}
    env.update(KEEPWELL_REPOSITORY=str(repo), KEEPWELL_PASSWORD=PASSWORD)
    res = subprocess.run([PYTHON, "-m", "keepwell.cli.main", *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (f"keepwell {' '.join(args)} exited {res.returncode}\n"
                                 f"{res.stdout}\n{res.stderr}")
    return res.stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return copy_repository(tmp_path)


def test_opens_lists_and_checks_clean(repo: Path) -> None:
    with open_repository(str(repo), PASSWORD) as r:
        assert r.config["version"] == 1
        assert r.chunker_params.to_dict() == MANIFEST["chunker"]
    listed = json.loads(keepwell(repo, "snapshots", "--json"))
    assert [(s["id"], s["kind"]) for s in listed] == [
        (s["id"], s["kind"]) for s in MANIFEST["snapshots"]]
    report = json.loads(keepwell(repo, "check", "--read-data", "--json"))
    assert report["errors"] == [] and report["warnings"] == []
    assert report["blobs_checked"] > 0


def test_files_snapshot_restores_byte_for_byte(repo: Path, tmp_path: Path) -> None:
    files = MANIFEST["files"]
    target = tmp_path / "restored"
    keepwell(repo, "restore", files["snapshot"], "--target", str(target))
    restored = describe_tree(str(target) + files["path"])
    assert restored == files["entries"]
    kinds = {e["type"] for e in restored}
    assert kinds == {"dir", "file", "symlink"}
    assert any("hardlink_group" in e for e in restored)
    assert any(not bytes.fromhex(e["path_hex"]).isascii() for e in restored)


def test_stdin_snapshot_restores_byte_for_byte(repo: Path, tmp_path: Path) -> None:
    stdin = MANIFEST["stdin"]
    keepwell(repo, "restore", stdin["snapshot"], "--target", str(tmp_path / "out"))
    entries = describe_tree(tmp_path / "out")
    restored = next(e for e in entries if e["path"] == stdin["filename"])
    assert (restored["size"], restored["sha256"]) == (stdin["size"], stdin["sha256"])


def test_sqlite_snapshot_restores_with_its_rows(repo: Path, tmp_path: Path) -> None:
    db = MANIFEST["sqlite"]
    target = tmp_path / "app.db"
    keepwell(repo, "sqlite", "restore", db["snapshot"], "--target", str(target))
    facts = sqlite_facts(target)
    assert facts == {"rows": db["rows"], "rows_sha256": db["rows_sha256"]}
    with sqlite3.connect(target) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# -- PostgreSQL ---------------------------------------------------------------------------------
@pytest.fixture
def pg_compat(pg_env: PgEnv) -> PgEnv:
    """The committed repository copied into the work directory, owned by postgres (whose
    restored servers fetch WAL from it)."""
    repo = copy_repository(pg_env.workdir)
    password = pg_env.workdir / "compat-password"
    password.write_text(PASSWORD + "\n")
    os.chmod(password, 0o600)
    chown_pg(repo)
    chown_pg(password)
    return PgEnv(workdir=pg_env.workdir, repo=repo, password_file=password)


def test_postgres_logical_restores_into_a_fresh_cluster(pg_compat: PgEnv) -> None:
    pg = MANIFEST["postgres"]
    fresh = PgCluster(pg_compat.workdir, "fresh").initdb().start()
    try:
        pg_compat.keepwell("restore", "--logical", "--db-url", fresh.url(), "--globals",
                           "--database", pg["databases"][0], "--snapshot", pg["logical_snapshot"])
        assert pg_counts(fresh) == pg["rows_at_base"]
        assert fresh.scalar("SELECT count(*) FROM pg_roles WHERE rolname = %s",
                            (pg["role"],)) == 1
        assert fresh.scalar("SELECT has_table_privilege(%s, 'events', 'SELECT')",
                            (pg["role"],)) is True
    finally:
        fresh.stop("immediate")


def test_postgres_physical_restores_and_recovers_through_the_archived_wal(
        pg_compat: PgEnv) -> None:
    pg = MANIFEST["postgres"]
    info = json.loads(pg_compat.keepwell("info", "--json").stdout)
    assert info["system_identifier"] == pg["system_identifier"]
    assert [b["complete"] for b in info["physical"]] == [True]

    def restored(name: str, *target: str) -> tuple[dict[str, Any], dict[str, int], str]:
        port = free_port()
        out = pg_compat.keepwell("restore", "--target-dir", str(pg_compat.workdir / name),
                                 *target, "--start", "--port", str(port), "--json")
        cluster = PgCluster(pg_compat.workdir, name, port=port)
        try:
            sysid = str(cluster.scalar("SELECT system_identifier FROM pg_control_system()"))
            return json.loads(out.stdout), pg_counts(cluster), sysid
        finally:
            cluster.stop("immediate")

    report, rows, sysid = restored("at-point", "--target-name", pg["restore_point"]["name"])
    assert pg["physical_snapshot"].startswith(report["backup"])
    assert report["restore_point_lsn"] == pg["restore_point"]["lsn"]
    assert rows == pg["rows_at_restore_point"]
    assert sysid == pg["system_identifier"]
    report, rows, _ = restored("at-end")
    assert rows == pg["rows_at_end"]


# -- MariaDB ------------------------------------------------------------------------------------
@pytest.fixture
def fresh_mariadb() -> Iterator[MariaDBServer]:
    if not mariadb_available():
        pytest.skip("MariaDB is not installed")
    with mariadb_server(server_id=31, name="fresh") as server:
        yield server


def test_mariadb_logical_restores_and_replays_the_archived_binlog(
        repo: Path, fresh_mariadb: MariaDBServer) -> None:
    my = MANIFEST["mariadb"]
    keepwell(repo, "mysql", "restore", "--target-db-url", fresh_mariadb.url, "--server-name",
             my["server_name"], "--snapshot", my["logical_snapshot"])
    assert mariadb_counts(fresh_mariadb) == my["rows_at_base"]
    assert fresh_mariadb.sql("SELECT double_it(21)", "shop") == [(42,)]
    assert fresh_mariadb.sql("SELECT COUNT(*) FROM mysql.user WHERE user = 'reporter'") == [(1,)]

    out = json.loads(keepwell(repo, "mysql", "restore", "--target-db-url", fresh_mariadb.url,
                              "--server-name", my["server_name"], "--target-gtid",
                              my["target_gtid"], "--json"))
    assert my["logical_snapshot"].startswith(out["snapshot"])
    assert out["plan"]["binlogs"] == my["binlogs"]
    assert mariadb_counts(fresh_mariadb) == my["rows_at_target_gtid"]
    assert my["rows_at_target_gtid"] != my["rows_at_end"]
