"""Accounts and grants in a logical backup, restored to a point in time into a freshly installed
MariaDB server of the same version with its own default accounts present: the built-in role
``PUBLIC`` (10.11) and the server's own accounts are never created or replaced, what was
granted to ``PUBLIC`` and to roles comes back, and roles exist before they are granted."""

from __future__ import annotations

from pathlib import Path

import pymysql
import pytest

from tests.servers.mariadb import (
    KeepwellRepo,
    MariaDBServer,
    fill_sample,
    mariadb_available,
    mariadb_server,
    rows,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mariadb_available(), reason="MariaDB is not installed"),
]


def _accounts(server: MariaDBServer) -> dict[tuple[str, str], str]:
    return {(str(u), str(h)): str(p) for u, h, p in server.sql(
        "SELECT user, host, priv FROM mysql.global_priv")}


def test_point_in_time_restore_into_a_freshly_installed_server(tmp_path: Path) -> None:
    repo = KeepwellRepo(tmp_path)
    with mariadb_server(server_id=51, name="src") as src:
        fill_sample(src, "shop", rows=300)  # with the account reporter@%
        # what a Debian-installed 10.11 server holds, and what its users add
        src.sql("CREATE USER IF NOT EXISTS 'mysql'@'localhost' IDENTIFIED VIA "
                "mysql_native_password USING 'invalid' OR unix_socket")
        src.sql("GRANT ALL ON *.* TO 'mysql'@'localhost' WITH GRANT OPTION")
        src.sql("GRANT SELECT ON shop.items TO PUBLIC")  # makes 10.11 list the PUBLIC role
        src.sql("CREATE ROLE zz_readers")  # sorts after the account it is granted to
        src.sql("GRANT SELECT ON shop.* TO zz_readers")
        src.sql("GRANT zz_readers TO 'reporter'@'%'")
        src.sql("SET DEFAULT ROLE zz_readers FOR 'reporter'@'%'")
        assert ("PUBLIC", "") in _accounts(src)
        repo.run("backup", "--logical", "--db-url", src.url)
        src.sql("INSERT INTO shop.items VALUES (100001, 'late', 1, '')")
        src.sql("CREATE USER 'late'@'%' IDENTIFIED BY 'late-pw'")
        src.sql("FLUSH BINARY LOGS")
        repo.run("binlog-push", "--db-url", src.url)
        end = src.sql("SHOW BINARY LOGS")[-2]
        expected = src.checksums(["shop"])

    with mariadb_server(server_id=52, name="fresh") as fresh:  # the same version, just installed
        own = _accounts(fresh)
        assert ("mysql", "localhost") not in own
        res = repo.run("restore", "--target-db-url", fresh.url, "--target-position",
                       f"{end[0]}:{end[1]}")
        assert "restored mysql-logical" in res.stdout
        assert fresh.checksums(["shop"]) == expected
        after = _accounts(fresh)
        # the server's own accounts are as they were, the source's built-ins never came
        assert {k: after[k] for k in own} == own
        assert ("mysql", "localhost") not in after
        assert {("reporter", "%"), ("zz_readers", ""), ("late", "%"), ("PUBLIC", "")} <= set(after)
        assert "GRANT SELECT ON `shop`.`items` TO PUBLIC" in rows(fresh, "SHOW GRANTS FOR PUBLIC")
        grants = rows(fresh, "SHOW GRANTS FOR 'reporter'@'%'")
        assert "GRANT `zz_readers` TO `reporter`@`%`" in grants
        assert "SET DEFAULT ROLE `zz_readers` FOR `reporter`@`%`" in grants
        # the restored account works, with its default role
        conn = pymysql.connect(host="127.0.0.1", port=fresh.port, user="reporter",
                               password="rep-pw", database="shop")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT CURRENT_ROLE(), COUNT(*) FROM items")
                assert cur.fetchone() == ("zz_readers", 301)
        finally:
            conn.close()
