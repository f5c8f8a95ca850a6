"""One server name holds one server: real MariaDB servers that share a server id (the default
1), one of them a fresh installation and one a copy of another's data directory, are told
apart; another server, or a server whose binary log was reset, is refused unless
``--new-server`` starts a new history; a restore never combines a base and binlogs of two
histories or of two servers."""

from __future__ import annotations

import shutil
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.servers.mariadb import (
    KeepwellRepo,
    MariaDBServer,
    mariadb_available,
    mariadb_server,
    rows,
)
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mariadb_available(), reason="MariaDB is not installed"),
]

REFUSED = "refusing to file another server's data under the same name"


def _table(server: MariaDBServer, tag: str, n: int, first: int = 1) -> None:
    server.sql("CREATE DATABASE IF NOT EXISTS app")
    server.sql("CREATE TABLE IF NOT EXISTS app.t (id INT PRIMARY KEY, v VARCHAR(20))")
    for i in range(first, first + n):
        server.sql(f"INSERT INTO app.t VALUES ({i}, '{tag}')")


def _initialized(server: MariaDBServer) -> str:
    server.sql("SET time_zone = '+00:00'")
    return str(rows(server, "SELECT MIN(create_time) FROM information_schema.tables "
                            "WHERE table_schema = 'mysql'")[0])


def _one_line_refusal(res: subprocess.CompletedProcess[str], text: str) -> None:
    assert res.returncode == 1, res.stdout + res.stderr
    assert text in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_another_server_under_the_same_name_is_refused(tmp_path: Path) -> None:
    repo = KeepwellRepo(tmp_path)
    with ExitStack() as stack:
        a = stack.enter_context(mariadb_server(server_id=1, name="a"))
        # an installation is told by its second: the other one is made in a later second
        first = _initialized(a)
        wait_for(lambda: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()) > first,
                 "the second after the first installation's")
        b = stack.enter_context(mariadb_server(server_id=1, name="b"))
        dst = stack.enter_context(mariadb_server(server_id=3, name="dst"))
        assert _initialized(a) != _initialized(b), "two installations in the same second"
        _table(a, "a", 5)
        _table(b, "b", 7)
        repo.run("backup", "--logical", "--db-url", a.url, "--server-name", "prod")
        repo.run("binlog-push", "--flush", "--db-url", a.url, "--server-name", "prod")

        # the same server id, another installation: every kind of snapshot is refused
        for args in (["backup", "--logical"], ["backup", "--physical"],
                     ["binlog-push", "--flush"]):
            res = repo.run(*args, "--db-url", b.url, "--server-name", "prod", check=False)
            _one_line_refusal(res, REFUSED)
            assert "--new-server" in res.stderr and "initialized" in res.stderr
        info = repo.json("info", "--server-name", "prod")
        assert len(info["bases"]) == 1 and len(info["histories"]) == 1

        # so a restore of "the latest" is the named server's
        repo.run("restore", "--target-db-url", dst.url, "--server-name", "prod")
        assert rows(dst, "SELECT DISTINCT v FROM app.t") == ["a"]
        # under a name of its own the other server is welcome; with two names in the
        # repository a restore must say which, and a named base says it by itself
        lab = repo.json("backup", "--logical", "--db-url", b.url, "--server-name", "lab")
        res = repo.run("restore", "--target-db-url", dst.url, check=False)
        assert res.returncode == 2 and "choose one with --server-name" in res.stderr
        dst.sql("DROP DATABASE app")
        repo.run("restore", "--target-db-url", dst.url, "--snapshot", lab["short_id"])
        assert rows(dst, "SELECT DISTINCT v FROM app.t") == ["b"]

        # declared, the other server starts history 1; the first one is now the stranger
        out = repo.json("backup", "--logical", "--db-url", b.url, "--server-name", "prod",
                        "--new-server")
        assert out["source"]["server"]["history"] == 1 and out["source"]["new_server"]
        assert any("history 1 begins" in n for n in out["notes"])
        _table(b, "b", 3, first=8)
        repo.run("binlog-push", "--flush", "--db-url", b.url, "--server-name", "prod")
        res = repo.run("backup", "--logical", "--db-url", a.url, "--server-name", "prod",
                       check=False)
        _one_line_refusal(res, REFUSED)
        report = repo.json("check", "--server-name", "prod")
        assert report["ok"], report["problems"]
        assert [h["history"] for h in report["histories"]] == [0, 1]
        assert report["histories"][1]["current"] and report["histories"][1]["declared"]

        # each history restores only with its own binlogs (both hold a binlog.000001)
        end = b.sql("SHOW BINARY LOGS")[-2]
        dst.sql("DROP DATABASE app")
        repo.run("restore", "--target-db-url", dst.url, "--server-name", "prod",
                 "--target-position", f"{end[0]}:{end[1]}")
        assert rows(dst, "SELECT id, v FROM app.t ORDER BY id") == [
            (i, "b") for i in range(1, 11)]
        base_a = next(x["snapshot"] for x in report["bases"] if x["history"] == 0)
        end_a = a.sql("SHOW BINARY LOGS")[-2]
        dst.sql("DROP DATABASE app")
        out = repo.json("restore", "--target-db-url", dst.url, "--server-name", "prod",
                        "--snapshot", base_a, "--target-position", f"{end_a[0]}:{end_a[1]}")
        assert out["plan"]["history"] == 0
        assert rows(dst, "SELECT DISTINCT v FROM app.t") == ["a"]


def test_a_reset_binary_log_is_refused_until_a_new_history_starts(tmp_path: Path) -> None:
    repo = KeepwellRepo(tmp_path)
    with mariadb_server(server_id=5, name="r") as src:
        _table(src, "old", 5)
        repo.run("backup", "--logical", "--db-url", src.url)
        _table(src, "old", 5, first=6)
        for _ in range(3):
            src.sql("FLUSH BINARY LOGS")
            src.sql("INSERT INTO app.t VALUES (11, 'old') ON DUPLICATE KEY UPDATE v = 'old'")
        repo.run("binlog-push", "--flush", "--db-url", src.url)  # archived to binlog.000005
        src.sql("RESET MASTER")  # the binary log starts again at binlog.000001
        src.sql("DELETE FROM app.t WHERE id > 3")
        src.sql("INSERT INTO app.t VALUES (20, 'new')")
        res = repo.run("binlog-push", "--flush", "--db-url", src.url, check=False)
        _one_line_refusal(res, "no longer continues what is archived")
        res = repo.run("backup", "--logical", "--db-url", src.url, check=False)
        _one_line_refusal(res, "no longer continues what is archived")
        # the stream refuses too, and says why
        proc = repo.popen("binlog-stream", "--db-url", src.url, "--interval", "0.3")
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "no longer continues" in err, err

        out = repo.json("backup", "--logical", "--db-url", src.url, "--new-server")
        assert out["source"]["server"]["history"] == 1
        src.sql("INSERT INTO app.t VALUES (21, 'new')")
        repo.run("binlog-push", "--flush", "--db-url", src.url)
        assert [h["history"] for h in repo.json("check")["histories"]] == [0, 1]
        end = src.sql("SHOW BINARY LOGS")[-2]
        with mariadb_server(server_id=6, name="dst") as dst:
            res = repo.json("restore", "--target-db-url", dst.url, "--snapshot",
                            out["short_id"], "--target-position", f"{end[0]}:{end[1]}")
            assert res["plan"]["history"] == 1
            assert rows(dst, "SELECT id, v FROM app.t ORDER BY id") == rows(
                src, "SELECT id, v FROM app.t ORDER BY id")


def test_a_base_from_a_copied_server_is_never_replayed_onto_the_original(
        tmp_path: Path) -> None:
    """A copy of a data directory (a cloned VM, a replica seeded by a file copy) has the same
    identity; its base records a GTID the original's binlog never had at that position."""
    repo = KeepwellRepo(tmp_path)
    with mariadb_server(server_id=1, name="orig") as orig:
        _table(orig, "base", 5)
        repo.run("backup", "--logical", "--db-url", orig.url, "--server-name", "prod")
        orig.sql("FLUSH BINARY LOGS")
        repo.run("binlog-push", "--db-url", orig.url, "--server-name", "prod")
        orig.stop()
        copy = MariaDBServer(orig.workdir, server_id=1, name="copy", install=False,
                             datadir=orig.workdir / "copy-data")
        shutil.copytree(orig.datadir, copy.datadir)
        orig.start()
        copy.start()
        try:
            _table(orig, "orig", 3, first=6)
            orig.sql("FLUSH BINARY LOGS")
            repo.run("binlog-push", "--db-url", orig.url, "--server-name", "prod")
            # the copy writes more than the original did, then is backed up under its name
            _table(copy, "copy", 30, first=6)
            repo.run("backup", "--logical", "--db-url", copy.url, "--server-name", "prod")
            _table(orig, "orig", 40, first=9)
            repo.run("binlog-push", "--include-current", "--db-url", orig.url,
                     "--server-name", "prod")
            end = orig.sql("SHOW MASTER STATUS")[0]
            with mariadb_server(server_id=7, name="dst") as dst:
                res = repo.run("restore", "--target-db-url", dst.url, "--server-name", "prod",
                               "--target-position", f"{end[0]}:{end[1]}")
                assert "taken on another server" in res.stdout, res.stdout
                assert rows(dst, "SELECT id, v FROM app.t ORDER BY id") == rows(
                    orig, "SELECT id, v FROM app.t ORDER BY id")
        finally:
            copy.stop()
