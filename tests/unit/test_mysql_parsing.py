"""MySQL source pieces that need no server: connection settings, dump filtering, binlog names
and positions."""

from __future__ import annotations

from pathlib import Path

import pytest

from keepwell.errors import SourceError, UsageError
from keepwell.sources.mysql.binlog import BinlogPosition, gtid_key, split_name
from keepwell.sources.mysql.connection import parse_url, resolve
from keepwell.sources.mysql.dumpfilter import filter_dump, lines_of
from keepwell.sources.mysql.physical import parse_binlog_position

DUMP = b"""/*M!999999\\- enable the sandbox mode */
-- MariaDB dump
/*!40101 SET @OLD_CHARACTER_SET_CLIENT=@@CHARACTER_SET_CLIENT */;
-- CHANGE MASTER TO MASTER_LOG_FILE='binlog.000001', MASTER_LOG_POS=8099;

--
-- Current Database: `a`
--

/*!40000 DROP DATABASE IF EXISTS `a`*/;
CREATE DATABASE /*!32312 IF NOT EXISTS*/ `a`;
USE `a`;

--
-- Table structure for table `t1`
--
CREATE TABLE `t1` (id int);
--
-- Dumping data for table `t1`
--
INSERT INTO `t1` VALUES (1);
--
-- Table structure for table `t2`
--
CREATE TABLE `t2` (id int);
INSERT INTO `t2` VALUES (2);
--
-- Dumping routines for database 'a'
--
CREATE PROCEDURE p() SELECT 1;

--
-- Current Database: `b`
--
CREATE DATABASE `b`;
USE `b`;
--
-- Table structure for table `t1`
--
CREATE TABLE `t1` (id int);
/*!40101 SET CHARACTER_SET_CLIENT=@OLD_CHARACTER_SET_CLIENT */;
-- Dump completed on 2026-11-24
"""


def _filter(db: str, table: str | None = None) -> str:
    chunks = [DUMP[i:i + 7] for i in range(0, len(DUMP), 7)]
    return b"".join(filter_dump(lines_of(chunks), db, table)).decode()


def test_filter_one_database() -> None:
    out = _filter("a")
    assert "DROP DATABASE IF EXISTS `a`" in out and "CREATE PROCEDURE p()" in out
    assert "VALUES (1)" in out and "VALUES (2)" in out
    assert "`b`" not in out
    assert out.startswith("/*M!999999") and "@OLD_CHARACTER_SET_CLIENT */;" in out
    assert "Dump completed" in out


def test_filter_one_table_never_drops_its_database() -> None:
    out = _filter("a", "t2")
    assert "DROP DATABASE" not in out
    assert "CREATE DATABASE" in out and "USE `a`;" in out
    assert "VALUES (2)" in out and "VALUES (1)" not in out
    assert "CREATE PROCEDURE" not in out and "`b`" not in out


def test_lines_of_keeps_every_byte() -> None:
    assert b"".join(lines_of([DUMP[i:i + 5] for i in range(0, len(DUMP), 5)])) == DUMP


def test_url_forms() -> None:
    s = parse_url("mysql://bob:p%40ss@db.example:3307/")
    assert (s.user, s.password, s.host, s.port) == ("bob", "p@ss", "db.example", 3307)
    s = parse_url("mariadb://root@localhost/?socket=/run/x.sock")
    assert s.socket == "/run/x.sock" and s.uses_socket
    with pytest.raises(UsageError):
        parse_url("postgres://x@y/")


def test_precedence_url_over_option_file_over_environment(tmp_path: Path) -> None:
    cnf = tmp_path / "my.cnf"
    cnf.write_text("[client]\nuser = fileuser\npassword = 'file pw'\nhost=filehost\nport=3310\n")
    env = {"MYSQL_HOST": "envhost", "MYSQL_TCP_PORT": "3311", "MYSQL_PWD": "envpw",
           "USER": "envuser", "HOME": str(tmp_path)}
    s = resolve(None, None, {k: v for k, v in env.items() if k != "HOME"} | {"HOME": "/nx"})
    assert (s.host, s.port, s.user, s.password) == ("envhost", 3311, "envuser", "envpw")
    s = resolve(None, str(cnf), env)
    assert (s.host, s.port, s.user, s.password) == ("filehost", 3310, "fileuser", "file pw")
    (tmp_path / ".my.cnf").write_text(cnf.read_text())
    assert resolve(None, None, env).user == "fileuser"  # ~/.my.cnf is read like the clients do
    s = resolve("mysql://urluser@urlhost:3312/", str(cnf), env)
    assert (s.host, s.port, s.user, s.password) == ("urlhost", 3312, "urluser", "file pw")
    lines = s.option_lines()
    assert 'password="file pw"' in lines and "host=urlhost" in lines


def test_binlog_names_positions_gtids() -> None:
    assert split_name("mysql-bin.000042") == ("mysql-bin", 42)
    with pytest.raises(SourceError):
        split_name("binlog.index")
    a = BinlogPosition.parse("binlog.000002:4")
    assert BinlogPosition.parse("binlog.000001:99999") < a < BinlogPosition.of("binlog.000002", 5)
    assert gtid_key("0-1-42") == ("0", 42)
    assert gtid_key("3E11FA47-71CA-11E1-9E33-C80AA9429562:23") == (
        "3e11fa47-71ca-11e1-9e33-c80aa9429562", 23)
    with pytest.raises(SourceError):
        gtid_key("nope")


def test_mariabackup_log_position() -> None:
    log = ("[00] 2026-11-24 17:17:42 MySQL binlog position: filename 'binlog.000003', "
           "position '8099', GTID of the last change '0-7-17'\n[00] completed OK!\n")
    assert parse_binlog_position(log) == ("binlog.000003", 8099, "0-7-17")
    assert parse_binlog_position("nothing") == (None, None, None)


# --- MySQL 8 and MariaDB side by side ---------------------------------------------------------
VERSIONS = {
    "mysqldump  Ver 10.19 Distrib 10.11.6-MariaDB, for debian-linux-gnu (x86_64)":
        ("mariadb", (10, 11, 6)),
    "mariabackup based on MariaDB server 10.11.6-MariaDB debian-linux-gnu (x86_64)":
        ("mariadb", (10, 11, 6)),
    "mysqldump  Ver 8.0.35 for Linux on x86_64 (MySQL Community Server - GPL)":
        ("mysql", (8, 0, 35)),
    "mysqlbinlog  Ver 8.4.0 for Linux on x86_64 (MySQL Community Server - GPL)":
        ("mysql", (8, 4, 0)),
    "xtrabackup version 8.0.35-30 based on MySQL server 8.0.35 Linux (x86_64) (revision id: x)":
        ("mysql", (8, 0, 35)),
    "mysqldump  Ver 10.13 Distrib 5.7.44, for Linux (x86_64)": ("mysql", (5, 7, 44)),
    "mysqlbinlog Ver 3.5 for debian-linux-gnu at x86_64": (None, (3, 5)),  # MariaDB's: silent
}


def test_tool_flavor_from_version_text() -> None:
    from keepwell.sources.mysql.tools import flavor_of_version_text

    for text, expected in VERSIONS.items():
        assert flavor_of_version_text(text) == expected, text


def _program(directory: Path, name: str, version: str) -> Path:
    path = directory / name
    path.write_text(f"#!/bin/sh\necho '{version}'\n")
    path.chmod(0o755)
    return path


def test_tools_are_chosen_by_what_they_are_not_only_by_name(tmp_path: Path) -> None:
    from keepwell.sources.mysql.tools import find

    mysql8, maria = tmp_path / "mysql8", tmp_path / "mariadb"
    mysql8.mkdir()
    maria.mkdir()
    _program(mysql8, "mysqldump", "mysqldump  Ver 8.0.35 for Linux on x86_64 (MySQL Community "
                                  "Server - GPL)")
    _program(mysql8, "mysqlbinlog", "mysqlbinlog  Ver 8.0.35 for Linux on x86_64 (MySQL "
                                    "Community Server - GPL)")
    _program(mysql8, "mysql", "mysql  Ver 8.0.35 for Linux on x86_64 (MySQL Community Server)")
    _program(mysql8, "xtrabackup", "xtrabackup version 8.0.35-30 based on MySQL server 8.0.35")
    _program(mysql8, "xbstream", "xbstream  Ver 8.0.35-30 for Linux (x86_64)")
    _program(maria, "mariadb-dump", "mariadb-dump  Ver 10.19 Distrib 10.11.6-MariaDB, for "
                                    "debian-linux-gnu (x86_64)")
    (maria / "mysqldump").symlink_to("mariadb-dump")  # as Debian's MariaDB installs it
    _program(maria, "mariadb", "mariadb  Ver 15.1 Distrib 10.11.6-MariaDB")
    _program(maria, "mariabackup", "mariabackup based on MariaDB server 10.11.6-MariaDB")

    # a MySQL server on a host with only MySQL's programs (no MariaDB name exists)
    dump = find("dump", "mysql", dirs=[str(mysql8)])
    assert (dump.name, dump.flavor, dump.version) == ("mysqldump", "mysql", (8, 0, 35))
    assert find("binlog", "mysql", dirs=[str(mysql8)]).name == "mysqlbinlog"
    assert find("backup", "mysql", dirs=[str(mysql8)]).name == "xtrabackup"
    assert find("extract", "mysql", dirs=[str(mysql8)]).name == "xbstream"
    # MariaDB's names come first for MariaDB, wherever they are on the path
    assert find("dump", "mariadb", dirs=[str(mysql8), str(maria)]).name == "mariadb-dump"
    # MariaDB's mysqldump link is MariaDB's: it must not dump a MySQL server
    with pytest.raises(SourceError, match="MariaDB's and cannot serve a MySQL server"):
        find("dump", "mysql", dirs=[str(maria)])
    with pytest.raises(SourceError, match="is not installed") as exc:
        find("backup", "mysql", dirs=[str(tmp_path)])
    assert "XtraBackup" in (exc.value.hint or "")
    with pytest.raises(SourceError, match="MySQL's and cannot serve a MariaDB server"):
        find("dump", "mariadb", dirs=[str(mysql8)])
    # any client speaks the protocol: the other flavor's serves when its own is missing
    assert find("client", "mysql", dirs=[str(maria)]).name == "mariadb"


def test_dump_options_follow_the_dump_tool() -> None:
    from keepwell.sources.mysql.logical import position_options
    from keepwell.sources.mysql.tools import Tool

    assert position_options(Tool("/x/mariadb-dump", "mariadb", (10, 11, 6))) == [
        "--master-data=2", "--gtid"]
    assert position_options(Tool("/x/mysqldump", "mysql", (8, 0, 35))) == [
        "--source-data=2", "--set-gtid-purged=COMMENTED"]
    assert position_options(Tool("/x/mysqldump", "mysql", (8, 0, 20))) == [
        "--master-data=2", "--set-gtid-purged=OFF"]


MYSQL_DUMP_HEAD = b"""-- MySQL dump 10.13  Distrib 8.0.35, for Linux (x86_64)
SET @MYSQLDUMP_TEMP_LOG_BIN = @@SESSION.SQL_LOG_BIN;
SET @@SESSION.SQL_LOG_BIN= 0;

--
-- GTID state at the beginning of the backup
--

/* SET @@GLOBAL.GTID_PURGED='+3E11FA47-71CA-11E1-9E33-C80AA9429562:1-5,
8B1C2D3E-0000-11EE-8000-0242AC120002:1-17'*/;

--
-- Position to start replication or point-in-time recovery from
--

-- CHANGE REPLICATION SOURCE TO SOURCE_LOG_FILE='binlog.000003', SOURCE_LOG_POS=157;
"""
MARIADB_DUMP_HEAD = b"""-- MariaDB dump 10.19  Distrib 10.11.6-MariaDB
-- CHANGE MASTER TO MASTER_LOG_FILE='binlog.000002', MASTER_LOG_POS=8099;
-- SET GLOBAL gtid_slave_pos='0-1-17,1-2-4';
"""


def test_dump_positions_of_both_flavors() -> None:
    import io

    from keepwell.sources.mysql.logical import DumpMarks

    for head, expected in (
        (MYSQL_DUMP_HEAD, ("binlog.000003", 157, "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5,"
                                                "8b1c2d3e-0000-11ee-8000-0242ac120002:1-17")),
        (MARIADB_DUMP_HEAD, ("binlog.000002", 8099, "0-1-17,1-2-4")),
        (MYSQL_DUMP_HEAD.replace(b"/* SET", b"SET").replace(b"'*/;", b"';").replace(
            b"='+", b"=/*!80000 '+'*/ '"), ("binlog.000003", 157, None)),
    ):
        marks = DumpMarks(io.BytesIO(head + b"\n-- Dump completed on 2026-11-24\n"))
        while marks.read(100):
            pass
        file, pos, gtid = marks.position()
        assert (file, pos) == expected[:2] and marks.complete()
        if expected[2] is not None:
            assert gtid == expected[2]
        else:  # the statement form (--set-gtid-purged=ON/AUTO) is read as well
            assert gtid is not None and gtid.startswith("3e11fa47")


XTRABACKUP_LOG = """2026-11-24T17:17:41.9 0 [Note] [MY-011825] [Xtrabackup] Executing UNLOCK TABLES
2026-11-24T17:17:42.0 0 [Note] [MY-011825] [Xtrabackup] MySQL binlog position: filename \
'binlog.000012', position '4711', GTID of the last change '3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5,
8b1c2d3e-0000-11ee-8000-0242ac120002:1-17'
2026-11-24T17:17:42.1 0 [Note] [MY-011825] [Xtrabackup] completed OK!
"""


def test_backup_tool_positions_of_both_flavors() -> None:
    from keepwell.sources.mysql.physical import parse_binlog_info, parse_info

    uuids = "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5,8b1c2d3e-0000-11ee-8000-0242ac120002:1-17"
    assert parse_binlog_position(XTRABACKUP_LOG) == ("binlog.000012", 4711, uuids)
    assert parse_binlog_position("MySQL binlog position: filename 'binlog.000004', "
                                 "position '120'\ncompleted OK!") == ("binlog.000004", 120, None)
    # xtrabackup_info / mariadb_backup_info
    info = ("tool_name = mariabackup\nbinlog_pos = filename 'binlog.000003', position '8099', "
            "GTID of the last change '0-7-17'\ninnodb_from_lsn = 0\n")
    assert parse_info(info) == ("binlog.000003", 8099, "0-7-17")
    # xtrabackup_binlog_info / mariadb_backup_binlog_info (tab separated)
    assert parse_binlog_info("binlog.000003\t8099\t0-7-17\n") == ("binlog.000003", 8099,
                                                                 "0-7-17")
    assert parse_binlog_info("binlog.000012\t4711\t3E11FA47-71CA-11E1-9E33-C80AA9429562:1-5,\n"
                             "8b1c2d3e-0000-11ee-8000-0242ac120002:1-17\n") == (
        "binlog.000012", 4711, uuids)
    assert parse_binlog_info("binlog.000012\t4711\n") == ("binlog.000012", 4711, None)
    assert parse_binlog_info("") == (None, None, None)


def test_gtid_sets_of_both_flavors() -> None:
    from keepwell.sources.mysql.binlog import gtid_in_set, normalize_gtid_set, parse_gtid_set
    from keepwell.sources.mysql.plan import Target

    u = "3e11fa47-71ca-11e1-9e33-c80aa9429562"
    mysql = parse_gtid_set(f"{u.upper()}:1-5:7-9,\n{u[:-1]}3:1-3:mytag:4")
    assert mysql == {u: [(1, 5), (7, 9)], f"{u[:-1]}3": [(1, 3)], f"{u[:-1]}3:mytag": [(4, 4)]}
    assert gtid_in_set(f"{u}:8", mysql) and not gtid_in_set(f"{u}:6", mysql)
    assert gtid_in_set(f"{u[:-1]}3:mytag:4", mysql)
    maria = parse_gtid_set("0-1-17,1-2-4")
    assert maria == {"0": [(1, 17)], "1": [(1, 4)]}
    assert gtid_in_set("0-9-12", maria) and not gtid_in_set("1-2-5", maria)
    assert normalize_gtid_set(" \n") is None
    assert normalize_gtid_set(f"{u.upper()}:1-5,\n  {u}:7") == f"{u}:1-5,{u}:7"
    # a set or a malformed GTID is not a --target-gtid: one usage error, not a traceback
    for bad in (f"{u}:1-5", "nope:5", "0-1", f"{u}:x"):
        with pytest.raises(UsageError):
            Target.of(None, None, bad)
    assert Target.of(None, None, f"{u}:23") == Target(gtid=f"{u}:23")
