"""``keepwell mysql forget`` with a keep policy, then ``keepwell prune``: every retained base
(logical and physical) still restores and rolls forward to the end of the archive, and the
binlogs before the oldest retained base are gone from the repository."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from keepwell.sources.mysql.binlog import binlog_seq
from keepwell.sources.mysql.catalog import load_catalog
from tests.servers import free_port
from tests.servers.mariadb import (
    PYTHON,
    KeepwellRepo,
    MariaDBServer,
    mariadb_available,
    mariadb_server,
    rows,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mariadb_available(), reason="MariaDB is not installed"),
]

# four "days": a base each (logical, physical, logical, physical), writes before and after it,
# the binlog closed and pushed at the end of the day
KINDS = ["logical", "physical", "logical", "physical"]


def _day(server: MariaDBServer, repo: KeepwellRepo, day: int, kind: str) -> None:
    for i in range(5):
        server.sql(f"INSERT INTO ret.t (day, v) VALUES ({day}, 'before-{i}')")
    repo.run("backup", f"--{kind}", "--db-url", server.url)
    for i in range(5):
        server.sql(f"INSERT INTO ret.t (day, v) VALUES ({day}, 'after-{i}')")
    server.sql(f"UPDATE ret.t SET v = CONCAT(v, '+') WHERE day = {day} AND id % 2 = 0")
    repo.run("binlog-push", "--flush", "--db-url", server.url)


def _prune(repo: KeepwellRepo) -> None:
    code = "import sys\nfrom keepwell.cli.main import run\nsys.exit(run())\n"
    res = subprocess.run([PYTHON, "-c", code, "prune", "--grace", "0", "--wait", "--json"],
                         env=repo.env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def _stop(pid: int, timeout: float = 60) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def test_forget_keeps_binlogs_of_retained_bases_and_pitr_still_works(tmp_path: Path) -> None:
    with mariadb_server(server_id=41, name="ret") as src:
        repo = KeepwellRepo(tmp_path)
        src.sql("CREATE DATABASE ret")
        src.sql("CREATE TABLE ret.t (id INT AUTO_INCREMENT PRIMARY KEY, day INT, "
                "v VARCHAR(40)) ENGINE=InnoDB")
        for day, kind in enumerate(KINDS):
            _day(src, repo, day, kind)
        end_file, end_pos = src.sql("SHOW BINARY LOGS")[-2][:2]  # the last pushed file's end
        expected = rows(src, "SELECT id, day, v FROM ret.t ORDER BY id")
        before = {b["snapshot"]: b for b in repo.json("info")["bases"]}
        assert len(before) == 4

        # the newest base of each kind stays; the oldest of them decides the binlog floor
        plan = repo.json("forget", "--keep-last", "1", "--dry-run")
        assert plan["dry_run"] and len(plan["bases"]) == 2 and plan["binlogs"]
        assert len(repo.json("info")["bases"]) == 4  # a dry run forgets nothing
        snaps = {s.id: s for s in repo.open().list_snapshots()}
        kept_ids = [k["id"] for k in plan["keep"]]
        kept_kinds = sorted(snaps[i].kind for i in kept_ids)
        assert kept_kinds == ["mysql-logical", "mysql-physical"]
        floor = min((snaps[i].source["binlog_file"] for i in kept_ids), key=binlog_seq)
        assert plan["binlogs_kept_from"] == floor
        all_files = set(load_catalog(repo.open()).files)
        expired = {f for f in all_files if binlog_seq(f) < binlog_seq(floor)}
        assert expired  # days 0 and 1 wrote binlogs that no retained base needs

        repo.run("forget", "--keep-last", "1")
        _prune(repo)

        cat = load_catalog(repo.open())
        assert sorted(b.snapshot_id for b in cat.bases) == sorted(kept_ids)
        assert not expired & set(cat.files), "expired binlogs are still in the repository"
        assert set(cat.files) == all_files - expired
        report = repo.json("check")
        assert report["ok"] and all(b["reach"] for b in report["bases"])

        # every retained base, restored and rolled forward, equals the source at the end
        target_pos = f"{end_file}:{end_pos}"
        logical = next(i for i in kept_ids if snaps[i].kind == "mysql-logical")
        physical = next(i for i in kept_ids if snaps[i].kind == "mysql-physical")
        with mariadb_server(server_id=42, name="dst") as dst:
            out = repo.json("restore", "--target-db-url", dst.url, "--snapshot", logical[:8],
                            "--target-position", target_pos)
            assert out["snapshot"] == logical[:8] and out["plan"]["binlogs"]
            assert rows(dst, "SELECT id, day, v FROM ret.t ORDER BY id") == expected
        datadir = tmp_path / "restored"
        port = free_port()
        out = repo.json("restore", "--target-dir", str(datadir), "--snapshot", physical[:8],
                        "--target-position", target_pos, "--start", "--port", str(port),
                        "--owner", "root")
        assert out["snapshot"] == physical[:8]
        restored = MariaDBServer(tmp_path, datadir=datadir, install=False)
        restored.port = port
        try:
            assert rows(restored, "SELECT id, day, v FROM ret.t ORDER BY id") == expected
        finally:
            _stop(out["server_pid"])

        # a base that was forgotten cannot be asked for any more
        gone = next(s for s in before if s not in {k[:8] for k in kept_ids})
        res = repo.run("restore", "--target-dir", str(tmp_path / "x"), "--snapshot", gone,
                       check=False)
        assert res.returncode != 0 and res.stderr.count("\n") == 1


def test_forget_refuses_an_empty_policy(tmp_path: Path) -> None:
    repo = KeepwellRepo(tmp_path)
    res = repo.run("forget", check=False)
    assert res.returncode == 2 and "no --keep-* policy" in res.stderr
    res = repo.run("forget", "--keep-within", "soon", check=False)
    assert res.returncode == 2 and "--keep-within: expected a duration" in res.stderr
