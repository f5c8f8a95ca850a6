"""Point-in-time restore of MariaDB from logical and physical bases, by time, binlog position
and GTID: exactly the transactions before the target exist afterwards. Also the physical round
trip under write load (base + replay equals the source, table by table)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.servers import free_port
from tests.servers.mariadb import (
    KeepwellRepo,
    MariaDBServer,
    WriteLoad,
    mariadb_available,
    mariadb_server,
    rows,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mariadb_available(), reason="MariaDB is not installed"),
]


class History:
    """Rows 1..5 before the base, batch A (6..15) before the targets, batch B (16..25) after."""

    def __init__(self, server: MariaDBServer) -> None:
        self.server = server

    def before_base(self) -> None:
        self.server.sql("CREATE DATABASE pitr")
        self.server.sql("CREATE TABLE pitr.t (id INT PRIMARY KEY, v VARCHAR(20)) ENGINE=InnoDB")
        for i in range(1, 6):
            self.server.sql(f"INSERT INTO pitr.t VALUES ({i}, 'base')")

    def after_base(self) -> dict[str, str]:
        for i in range(6, 16):
            self.server.sql(f"INSERT INTO pitr.t VALUES ({i}, 'a')")
        time.sleep(1.2)
        target_time = datetime.now(UTC).isoformat()
        file, pos = self.server.sql("SHOW MASTER STATUS")[0][:2]
        gtid = self.server.sql("SELECT @@gtid_binlog_pos")[0][0]
        time.sleep(1.2)
        self.server.sql("UPDATE pitr.t SET v = 'changed' WHERE id <= 3")
        self.server.sql("FLUSH BINARY LOGS")
        for i in range(16, 26):
            self.server.sql(f"INSERT INTO pitr.t VALUES ({i}, 'b')")
        self.server.sql("DELETE FROM pitr.t WHERE id = 1")
        return {"time": target_time, "position": f"{file}:{pos}", "gtid": gtid}


EXPECTED = [(i, "base" if i < 6 else "a") for i in range(1, 16)]


@pytest.fixture(scope="module")
def source() -> Iterator[MariaDBServer]:
    with mariadb_server(server_id=11, name="src") as s:
        yield s


@pytest.fixture(scope="module")
def target() -> Iterator[MariaDBServer]:
    with mariadb_server(server_id=12, name="dst") as s:
        yield s


@pytest.fixture(scope="module")
def history(source: MariaDBServer, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[KeepwellRepo, dict[str, str]]:
    repo = KeepwellRepo(tmp_path_factory.mktemp("pitr"))
    h = History(source)
    h.before_base()
    repo.run("backup", "--logical", "--db-url", source.url, "--database", "pitr")
    repo.run("backup", "--physical", "--db-url", source.url)
    targets = h.after_base()
    repo.run("binlog-push", "--flush", "--db-url", source.url)
    return repo, targets


@pytest.mark.parametrize("how", ["time", "position", "gtid"])
def test_pitr_from_logical_base(how: str, history: tuple[KeepwellRepo, dict[str, str]],
                                target: MariaDBServer) -> None:
    repo, targets = history
    target.sql("DROP DATABASE IF EXISTS pitr")
    out = repo.json("restore", "--target-db-url", target.url, f"--target-{how}", targets[how])
    assert out["kind"] == "mysql-logical"
    assert rows(target, "SELECT id, v FROM pitr.t ORDER BY id") == EXPECTED


@pytest.mark.parametrize("how", ["gtid", "time"])
def test_pitr_from_physical_base(how: str, history: tuple[KeepwellRepo, dict[str, str]],
                                 tmp_path: Path) -> None:
    repo, targets = history
    datadir = tmp_path / "restored"
    port = free_port()
    out = repo.json("restore", "--target-dir", str(datadir), f"--target-{how}", targets[how],
                    "--start", "--port", str(port), "--owner", "root")
    assert out["kind"] == "mysql-physical" and out["server_pid"]
    restored = MariaDBServer(tmp_path, datadir=datadir, install=False)
    restored.port = port
    try:
        assert rows(restored, "SELECT id, v FROM pitr.t ORDER BY id") == EXPECTED
    finally:
        import os
        import signal

        os.kill(out["server_pid"], signal.SIGTERM)
        _wait_gone(out["server_pid"])


def _wait_gone(pid: int, timeout: float = 60) -> None:
    import os

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def test_target_beyond_archive_is_refused(history: tuple[KeepwellRepo, dict[str, str]],
                                          target: MariaDBServer) -> None:
    repo, _ = history
    res = repo.run("restore", "--target-db-url", target.url, "--target-time",
                   "2100-01-01T00:00:00Z", check=False)
    assert res.returncode == 1
    assert "reaches only" in res.stderr and res.stderr.count("\n") == 1


def test_physical_round_trip_under_load(tmp_path: Path) -> None:
    with mariadb_server(server_id=21, name="phys") as src:
        repo = KeepwellRepo(tmp_path)
        src.sql("CREATE DATABASE app")
        src.sql("CREATE TABLE app.bulk (id INT PRIMARY KEY, pad VARCHAR(200))")
        src.sql("INSERT INTO bulk SELECT seq, REPEAT(MD5(seq), 5) FROM seq_1_to_50000", "app")
        with WriteLoad(src, "app", interval=0) as load:
            time.sleep(0.3)
            repo.run("backup", "--physical", "--db-url", src.url)
            time.sleep(0.3)
        assert load.error is None and load.committed > 0
        src.sql("FLUSH BINARY LOGS")
        end = src.sql("SHOW MASTER STATUS")[0]
        repo.run("binlog-push", "--include-current", "--db-url", src.url)
        datadir = tmp_path / "restored"
        port = free_port()
        out = repo.json("restore", "--target-dir", str(datadir), "--target-position",
                        f"{end[0]}:{end[1]}", "--start", "--port", str(port), "--owner", "root")
        restored = MariaDBServer(tmp_path, datadir=datadir, install=False)
        restored.port = port
        try:
            assert restored.checksums(["app"]) == src.checksums(["app"])
        finally:
            import os
            import signal

            os.kill(out["server_pid"], signal.SIGTERM)
            _wait_gone(out["server_pid"])
