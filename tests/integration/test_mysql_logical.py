"""Logical MariaDB backups against real servers: round trips under write load, writers never
stalled, restoring one database or one table, and DDL during a dump."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.mariadb import (
    KeepwellRepo,
    MariaDBServer,
    WriteLoad,
    fill_sample,
    mariadb_available,
    mariadb_server,
    rows,
)
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mariadb_available(), reason="MariaDB is not installed"),
]


@pytest.fixture(scope="module")
def source() -> Iterator[MariaDBServer]:
    with mariadb_server(server_id=1, name="src") as s:
        fill_sample(s, "shop", rows=3000)
        s.sql("CREATE DATABASE other")
        s.sql("CREATE TABLE other.notes (id INT PRIMARY KEY, body TEXT)")
        s.sql("INSERT INTO other.notes SELECT seq, REPEAT('n', seq % 300) FROM seq_1_to_500",
              "other")
        yield s


@pytest.fixture(scope="module")
def target() -> Iterator[MariaDBServer]:
    with mariadb_server(server_id=2, name="dst") as s:
        yield s


@pytest.fixture
def repo(tmp_path: Path) -> KeepwellRepo:
    return KeepwellRepo(tmp_path)


def test_logical_round_trip_under_load_without_stalling_writers(
        source: MariaDBServer, target: MariaDBServer, repo: KeepwellRepo) -> None:
    # enough data that the dump takes a while, and a writer committing all along
    source.sql("CREATE TABLE shop.bulk (id INT PRIMARY KEY, pad VARCHAR(200)) ENGINE=InnoDB")
    source.sql("INSERT INTO bulk SELECT seq, REPEAT(MD5(seq), 6) FROM seq_1_to_150000", "shop")
    with WriteLoad(source, "shop", interval=0) as load:
        wait_for(lambda: load.committed >= 10, "the writer to commit")
        before = load.committed
        out = repo.json("backup", "--logical", "--db-url", source.url)
        during = load.committed - before
        wait_for(lambda: load.committed > before + during, "a commit after the backup")
    assert load.error is None
    print(f"\nlongest writer pause during the logical backup: {load.max_pause * 1000:.1f} ms "
          f"({during} commits during the backup)")
    assert during > 50
    assert load.max_pause < 0.200
    src = out["source"]
    assert src["binlog_file"] and src["binlog_pos"] and src["gtid"]
    assert sorted(src["databases"]) == ["other", "shop"]

    repo.run("restore", "--target-db-url", target.url)
    # the load table is a consistent prefix: ids 1..N without a hole
    n, lo, hi = target.sql("SELECT COUNT(*), MIN(id), MAX(id) FROM shop.load")[0]
    assert n == hi and lo == 1
    static = ["items", "audit", "bulk"]
    assert ({t: v for t, v in target.checksums(["shop"]).items() if t.split(".")[1] in static}
            == {t: v for t, v in source.checksums(["shop"]).items() if t.split(".")[1] in static})
    assert target.checksums(["other"]) == source.checksums(["other"])
    # routines, triggers, events, views and accounts came along
    assert rows(target, "SELECT double_it(21)", "shop") == [42]
    assert rows(target, "SELECT COUNT(*) FROM big_items", "shop") == rows(
        source, "SELECT COUNT(*) FROM big_items", "shop")
    assert rows(target, "SELECT trigger_name FROM information_schema.triggers WHERE "
                        "trigger_schema = 'shop'") == ["items_ai"]
    assert rows(target, "SELECT event_name FROM information_schema.events WHERE "
                        "event_schema = 'shop'") == ["nightly"]
    assert rows(target, "SELECT routine_name FROM information_schema.routines WHERE "
                        "routine_schema = 'shop' ORDER BY 1") == ["count_items", "double_it"]
    grants = rows(target, "SHOW GRANTS FOR 'reporter'@'%'")
    assert any("SELECT ON `shop`.*" in g for g in grants)
    source.sql("DROP TABLE shop.load")
    source.sql("DROP TABLE shop.bulk")


def test_restore_one_database_and_one_table(source: MariaDBServer, target: MariaDBServer,
                                            repo: KeepwellRepo) -> None:
    repo.run("backup", "--logical", "--db-url", source.url, "--database", "shop",
             "--database", "other")
    target.sql("DROP DATABASE IF EXISTS shop")
    target.sql("DROP DATABASE IF EXISTS other")
    repo.run("restore", "--target-db-url", target.url, "--database", "other")
    assert rows(target, "SHOW DATABASES LIKE 'shop'") == []
    assert target.checksums(["other"]) == source.checksums(["other"])

    target.sql("CREATE DATABASE shop")
    target.sql("CREATE TABLE shop.keepme (id INT PRIMARY KEY)")
    repo.run("restore", "--target-db-url", target.url, "--database", "shop", "--table", "items")
    assert sorted(rows(target, "SHOW TABLES", "shop")) == ["items", "keepme"]
    assert target.checksums(["shop"])["shop.items"] == source.checksums(["shop"])["shop.items"]

    bad = repo.run("restore", "--target-db-url", target.url, "--database", "nope", check=False)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "nope is not in snapshot" in bad.stderr


def test_ddl_during_logical_backup_still_restores(source: MariaDBServer, target: MariaDBServer,
                                                  repo: KeepwellRepo) -> None:
    source.sql("CREATE DATABASE IF NOT EXISTS churn")
    for i in range(40):
        source.sql(f"CREATE TABLE churn.t{i:02d} (id INT PRIMARY KEY, v VARCHAR(100))")
        source.sql(f"INSERT INTO churn.t{i:02d} SELECT seq, MD5(seq) FROM seq_1_to_2000",
                   "churn")
    stop = threading.Event()
    errors: list[BaseException] = []

    def ddl() -> None:
        i = 0
        try:
            while not stop.is_set():
                t = f"t{i % 40:02d}"
                source.sql(f"ALTER TABLE churn.{t} ADD COLUMN c{i} INT DEFAULT {i}")
                source.sql(f"CREATE TABLE churn.new{i} (id INT PRIMARY KEY)")
                source.sql(f"DROP TABLE churn.new{i}")
                i += 1
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=ddl)
    worker.start()
    attempts = []
    try:
        for _ in range(3):
            out = repo.json("backup", "--logical", "--db-url", source.url, "--database",
                            "churn", "--retries", "10")
            attempts.append(out["source"]["attempts"])
    finally:
        stop.set()
        worker.join()
    assert not errors
    print(f"\ndump attempts under DDL churn: {attempts}")
    target.sql("DROP DATABASE IF EXISTS churn")
    repo.run("restore", "--target-db-url", target.url)
    assert len(rows(target, "SHOW TABLES", "churn")) >= 40
    source.sql("DROP DATABASE churn")


def test_connection_from_option_file_and_environment(source: MariaDBServer,
                                                     repo: KeepwellRepo) -> None:
    cnf = repo.workdir / "backup.cnf"
    cnf.write_text(f"[client]\nhost=127.0.0.1\nport={source.port}\nuser=root\n"
                   f"password=\"{source.url.split(':')[2].split('@')[0]}\"\n")
    out = repo.json("backup", "--logical", "--database", "other", "--defaults-file", str(cnf))
    assert out["source"]["databases"] == ["other"]

    env = repo.env()
    env.update(MYSQL_HOST="127.0.0.1", MYSQL_TCP_PORT=str(source.port), USER="root",
               MYSQL_PWD=source.url.split(":")[2].split("@")[0])
    res = repo.run("backup", "--logical", "--database", "other", env=env)
    assert "consistent at binlog." in res.stdout

    env["MYSQL_PWD"] = "wrong"
    bad = repo.run("backup", "--logical", "--database", "other", env=env, check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert "cannot connect to MySQL/MariaDB at root@127.0.0.1" in bad.stderr


@pytest.mark.parametrize("kind", ["logical", "physical"])
def test_tool_started_before_the_repository_opens_is_ended_on_a_repository_error(
        kind: str, source: MariaDBServer, repo: KeepwellRepo) -> None:
    import subprocess

    env = repo.env()
    env["KEEPWELL_PASSWORD"] = "not the password"
    bad = repo.run("backup", f"--{kind}", "--db-url", source.url, env=env, check=False)
    assert bad.returncode == 12 and bad.stderr.count("\n") == 1, bad.stderr
    if kind == "physical":  # a copy of this datadir, started early, ended with keepwell
        left = subprocess.run(["pgrep", "-f", f"mariabackup .*--datadir={source.datadir}"],
                              capture_output=True, text=True)
        assert left.stdout.strip() == ""
    env.pop("KEEPWELL_REPOSITORY")
    bad = repo.run("backup", f"--{kind}", "--db-url", source.url, env=env, check=False)
    assert bad.returncode == 2 and "no repository given" in bad.stderr


def test_every_name_given_is_restored_and_one_that_matches_nothing_is_an_error(
        source: MariaDBServer, target: MariaDBServer, repo: KeepwellRepo) -> None:
    repo.run("backup", "--logical", "--db-url", source.url)
    for db in ("shop", "other"):
        target.sql(f"DROP DATABASE IF EXISTS {db}")
    bad = repo.run("restore", "--target-db-url", target.url, "-d", "shop", "-t", "nosuchtable",
                   check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stdout + bad.stderr
    assert "table nosuchtable is not in database shop of snapshot" in bad.stderr
    assert "restored" not in bad.stdout
    assert rows(target, "SHOW DATABASES LIKE 'shop'") == []  # the target was not touched

    repo.run("restore", "--target-db-url", target.url, "-d", "shop", "-d", "other")
    assert target.checksums(["shop", "other"]) == source.checksums(["shop", "other"])
    target.sql("DROP DATABASE shop")
    repo.run("restore", "--target-db-url", target.url, "-d", "shop", "-t", "items",
             "-t", "big_items")
    assert sorted(rows(target, "SHOW TABLES", "shop")) == ["big_items", "items"]
    assert rows(target, "SELECT COUNT(*) FROM big_items", "shop") == rows(
        source, "SELECT COUNT(*) FROM big_items", "shop")
    bad = repo.run("restore", "--target-db-url", target.url, "-d", "shop", "-d", "other",
                   "-t", "items", check=False)
    assert bad.returncode == 2 and "give one --database" in bad.stderr


@pytest.mark.parametrize("args", [
    ["restore", "--snapshot", "latest", "--snapshot", "latest"],
    ["restore", "--target-time", "2026-01-01T00:00:00Z", "--target-time",
     "2026-01-02T00:00:00Z"],
    ["restore", "--no-users", "--users"],
    ["backup", "--logical", "--retries", "1", "--retries", "5"],
    ["forget", "--keep-last", "1", "--keep-last", "3"],
    ["binlog-push", "--binlog-dir", "/a", "--binlog-dir", "/b"],
])
def test_a_single_valued_option_given_twice_is_refused(args: list[str],
                                                       repo: KeepwellRepo) -> None:
    res = repo.run(*args, check=False)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "given more than once" in res.stderr
