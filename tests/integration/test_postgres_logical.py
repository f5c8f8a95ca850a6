"""Logical backups (pg_dump streams) and their restores against a real server."""

from __future__ import annotations

import json
import subprocess

import pytest

import tests.servers.postgres as servers_pg
from tests.servers.postgres import PgCluster, PgEnv

pg_env = servers_pg.pg_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def repo_bytes(env: PgEnv) -> int:
    out = subprocess.run(["du", "-sb", str(env.repo)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def test_logical_round_trip_table_restore_and_dedup(pg_env: PgEnv) -> None:
    c = PgCluster(pg_env.workdir).initdb().start()
    c.pgbench_init(1)
    c.sql("CREATE ROLE reporter LOGIN")
    c.sql("CREATE DATABASE app")
    c.sql("CREATE SCHEMA s1; CREATE TABLE s1.items AS"
          " SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 300000) g", dbname="app")
    with c.pgbench_load(seconds=15):
        first = json.loads(pg_env.keepwell("backup", "--logical", "--db-url", c.url(),
                                           "--json").stdout)
    assert first["databases"] == ["app", "postgres"] and first["globals"] is True

    # whole database into a new one: pg_dump's snapshot is consistent even under load
    pg_env.keepwell("restore", "--logical", "--db-url", c.url(), "--database", "postgres",
                    "--into", "copy", "--create")
    sums = c.sql("SELECT (SELECT sum(abalance) FROM pgbench_accounts),"
                 " (SELECT sum(delta) FROM pgbench_history)", dbname="copy")[0]
    assert sums[0] == sums[1]
    assert c.scalar("SELECT count(*) FROM pgbench_accounts", dbname="copy") == 100000

    # one table, back into the live database after it was dropped
    c.sql("DROP TABLE s1.items", dbname="app")
    pg_env.keepwell("restore", "--logical", "--db-url", c.url(), "--database", "app",
                    "--schema", "s1", "--table", "items")
    assert c.scalar("SELECT count(*) FROM s1.items", dbname="app") == 300000

    # globals: a dropped role comes back
    c.sql("DROP ROLE reporter")
    pg_env.keepwell("restore", "--logical", "--db-url", c.url(), "--globals")
    assert c.scalar("SELECT count(*) FROM pg_roles WHERE rolname = 'reporter'") == 1

    # a second dump of a mostly unchanged database adds little to the repository
    c.sql("UPDATE s1.items SET v = 'changed' WHERE id <= 100", dbname="app")
    before = repo_bytes(pg_env)
    again = json.loads(pg_env.keepwell("backup", "--logical", "--db-url", c.url(), "--database",
                                       "app", "--json").stdout)
    growth = repo_bytes(pg_env) - before
    assert growth < 0.15 * again["bytes"], (growth, again["bytes"])

    # mistakes are one clear line
    bad = pg_env.keepwell("restore", "--logical", "--db-url", c.url(), "--database", "nope",
                          check=False)
    assert bad.returncode != 0 and "database nope" in bad.stderr
    assert "Traceback" not in bad.stderr
    down = pg_env.keepwell("backup", "--logical", "--db-url",
                           "postgresql://postgres@127.0.0.1:1/postgres", check=False)
    assert down.returncode == 1 and "cannot connect to PostgreSQL" in down.stderr
