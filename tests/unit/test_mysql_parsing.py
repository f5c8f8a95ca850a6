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
