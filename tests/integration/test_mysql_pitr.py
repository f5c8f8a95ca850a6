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


def _mysql_uid() -> int:
    import pwd

    return pwd.getpwnam("mysql").pw_uid


def test_physical_pitr_as_root_with_the_default_owner(
        history: tuple[KeepwellRepo, dict[str, str]], tmp_path: Path) -> None:
    """As root, the restored datadir goes to the mysql user, and so does the private server
    that replays the binlogs: its socket directory must be the server's to write in."""
    import os
    import shutil
    import signal
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("the default owner differs from the running user only for root")
    repo, targets = history
    # a parent the mysql user cannot enter is refused before anything is written
    hidden = Path(tempfile.mkdtemp(prefix="kw-hidden-", dir="/tmp"))
    hidden.chmod(0o700)
    place = Path(tempfile.mkdtemp(prefix="kw-owner-", dir="/tmp"))
    place.chmod(0o755)
    try:
        res = repo.run("restore", "--target-dir", str(hidden / "restored"), "--target-gtid",
                       targets["gtid"], check=False)
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
        assert f"would run as mysql, which cannot enter {hidden}" in res.stderr
        assert list(hidden.iterdir()) == []

        datadir, port = place / "restored", free_port()
        out = repo.json("restore", "--target-dir", str(datadir), "--target-gtid",
                        targets["gtid"], "--start", "--port", str(port))
        try:
            assert datadir.stat().st_uid == _mysql_uid()
            status = Path(f"/proc/{out['server_pid']}/status").read_text()
            uid_line = next(ln for ln in status.splitlines() if ln.startswith("Uid:"))
            assert int(uid_line.split()[1]) == _mysql_uid()
            restored = MariaDBServer(tmp_path, datadir=datadir, install=False)
            restored.port = port
            assert rows(restored, "SELECT id, v FROM pitr.t ORDER BY id") == EXPECTED
        finally:
            os.kill(out["server_pid"], signal.SIGTERM)
            _wait_gone(out["server_pid"])
    finally:
        shutil.rmtree(hidden, ignore_errors=True)
        shutil.rmtree(place, ignore_errors=True)


def test_a_restore_never_writes_into_a_live_server(
        history: tuple[KeepwellRepo, dict[str, str]], source: MariaDBServer,
        tmp_path: Path) -> None:
    repo, targets = history
    before = sorted(p.name for p in source.datadir.iterdir())
    inside = source.datadir / "restored"
    res = repo.run("restore", "--target-dir", str(inside), "--owner", "root", check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "the data directory of a MySQL/MariaDB server" in res.stderr
    res = repo.run("restore", "--target-dir", str(source.datadir), "--owner", "root",
                   check=False)
    assert res.returncode == 1 and "is the data directory of a" in res.stderr
    # the live server's port is refused before anything is restored
    elsewhere = tmp_path / "restored"
    res = repo.run("restore", "--target-dir", str(elsewhere), "--owner", "root", "--start",
                   "--port", str(source.port), check=False)
    assert res.returncode == 2 and f"port {source.port} is in use" in res.stderr, res.stderr
    assert not elsewhere.exists()
    assert sorted(p.name for p in source.datadir.iterdir()) == before


def test_a_gtid_of_another_server_is_not_taken_for_ours(
        history: tuple[KeepwellRepo, dict[str, str]], target: MariaDBServer) -> None:
    repo, targets = history
    domain, server_id, seq = targets["gtid"].split(",")[0].split("-")
    other = f"{domain}-{int(server_id) + 1000}-{seq}"
    res = repo.run("restore", "--target-db-url", target.url, "--target-gtid", other, check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert f"GTID {other} is not in the archived binlogs" in res.stderr
    assert f"{domain}-{server_id}-{seq} is" in res.stderr


def test_target_time_without_a_zone_is_local_and_echoed(
        history: tuple[KeepwellRepo, dict[str, str]], target: MariaDBServer) -> None:
    from datetime import timedelta, timezone

    repo, targets = history
    when = datetime.fromisoformat(targets["time"])
    local = when.astimezone(timezone(timedelta(hours=5, minutes=30))).replace(tzinfo=None)
    env = repo.env()
    env["TZ"] = "XST-5:30"  # a zone with no tz database behind it: UTC+05:30
    target.sql("DROP DATABASE IF EXISTS pitr")
    res = repo.run("restore", "--target-db-url", target.url, "--target-time",
                   local.isoformat(), env=env)
    exact = when.astimezone(UTC).isoformat().replace("+00:00", "Z")
    assert f"target time {exact} ({local.isoformat()} read in the local zone (XST, UTC+0530))" \
        in res.stdout, res.stdout
    assert rows(target, "SELECT id, v FROM pitr.t ORDER BY id") == EXPECTED


def test_a_sub_second_target_time_says_the_whole_second_is_replayed(
        history: tuple[KeepwellRepo, dict[str, str]], target: MariaDBServer) -> None:
    repo, targets = history
    assert datetime.fromisoformat(targets["time"]).microsecond  # the fixture's time has them
    target.sql("DROP DATABASE IF EXISTS pitr")
    res = repo.run("restore", "--target-db-url", target.url, "--target-time", targets["time"])
    assert "binlog event times are whole seconds" in res.stdout, res.stdout
    assert "--target-gtid or --target-position" in res.stdout
    assert rows(target, "SELECT id, v FROM pitr.t ORDER BY id") == EXPECTED


def test_a_target_time_past_the_archived_events_is_refused(
        history: tuple[KeepwellRepo, dict[str, str]], source: MariaDBServer,
        target: MariaDBServer) -> None:
    """binlog-push without --include-current archives the closed files only: a time after
    the current file began is beyond the archive, however late the push ran."""
    repo, _ = history
    source.sql("FLUSH BINARY LOGS")  # a closed file for the push to store
    source.sql("CREATE TABLE pitr.late (id INT PRIMARY KEY)")
    source.sql("INSERT INTO pitr.late VALUES (1)")
    time.sleep(1.1)
    when = datetime.now(UTC).isoformat()
    time.sleep(1.1)
    repo.run("binlog-push", "--db-url", source.url)
    res = repo.run("restore", "--target-db-url", target.url, "--target-time", when,
                   check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stdout + res.stderr
    assert "the binlog archive reaches only" in res.stderr and "--include-current" in res.stderr
