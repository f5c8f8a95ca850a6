"""Logical backups (pg_dump streams) and their restores against a real server."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.servers.postgres import PgCluster, PgEnv

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


SHOP = """
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (
    id serial PRIMARY KEY,
    customer int NOT NULL REFERENCES customers(id),
    total numeric NOT NULL DEFAULT 0 CHECK (total >= 0),
    created timestamptz NOT NULL DEFAULT now(),
    note text);
CREATE INDEX orders_created_idx ON orders(created);
CREATE UNIQUE INDEX orders_note_idx ON orders(note) WHERE note IS NOT NULL;
CREATE TABLE items (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    order_id int NOT NULL REFERENCES orders(id), qty int);
CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql
    AS $$BEGIN NEW.note := coalesce(NEW.note, 'stamped'); RETURN NEW; END$$;
CREATE TRIGGER orders_stamp BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION stamp();
COMMENT ON TABLE orders IS 'one row per order';
COMMENT ON COLUMN orders.note IS 'free text';
INSERT INTO customers(name) SELECT 'c' || g FROM generate_series(1, 10) g;
INSERT INTO orders(customer, total, note) SELECT 1 + g % 10, g, 'n' || g
    FROM generate_series(1, 500) g;
INSERT INTO items(order_id, qty) SELECT 1 + g % 500, g FROM generate_series(1, 50) g;
"""


def table_shape(c: PgCluster, db: str, table: str) -> dict[str, object]:
    """What makes up a table besides its rows."""
    q = "'public." + table + "'::regclass"
    return {
        "constraints": sorted(r[0] for r in c.sql(
            f"SELECT conname FROM pg_constraint WHERE conrelid = {q}", dbname=db)),
        "indexes": sorted(r[0] for r in c.sql(
            f"SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = {q}", dbname=db)),
        "triggers": sorted(r[0] for r in c.sql(
            f"SELECT tgname FROM pg_trigger WHERE tgrelid = {q} AND NOT tgisinternal",
            dbname=db)),
        "defaults": sorted(r[0] for r in c.sql(
            f"SELECT a.attname FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid"
            f" AND a.attnum = d.adnum WHERE d.adrelid = {q}", dbname=db)),
        "comment": c.scalar(f"SELECT obj_description({q}, 'pg_class')", dbname=db),
        "sequence": c.scalar(f"SELECT pg_get_serial_sequence('public.{table}', 'id')",
                             dbname=db),
    }


def test_one_table_comes_back_whole(pg_env: PgEnv) -> None:
    c = PgCluster(pg_env.workdir).initdb().start()
    c.sql("CREATE DATABASE app")
    c.sql(SHOP, dbname="app")
    shape = table_shape(c, "app", "orders")
    next_id = c.scalar("SELECT last_value FROM orders_id_seq", dbname="app")
    pg_env.keepwell("backup", "--logical", "--db-url", c.url(), "-d", "app")
    c.sql("DROP TABLE orders CASCADE", dbname="app")  # drops items' foreign key too

    out = pg_env.keepwell("restore", "--logical", "--db-url", c.url(), "-d", "app",
                          "-t", "orders")
    assert table_shape(c, "app", "orders") == shape
    assert c.scalar("SELECT count(*) FROM orders", dbname="app") == 500
    assert c.scalar("SELECT last_value FROM orders_id_seq", dbname="app") == next_id
    new = c.scalar("INSERT INTO orders(customer) VALUES (1) RETURNING id", dbname="app")
    assert new == next_id + 1, "the sequence goes on where it was"
    assert c.scalar("SELECT note FROM orders WHERE id = %s", (new,), dbname="app") == "stamped"
    # the foreign key of items, a table that was not restored: reported with its statement
    assert "items_order_id_fkey" in out.stderr and "ADD CONSTRAINT" in out.stderr

    # a table whose referenced table is neither restored nor there: its key is skipped, said
    c.sql("CREATE DATABASE other")
    out = pg_env.keepwell("restore", "--logical", "--db-url", c.url(), "-d", "app", "--into",
                          "other", "-t", "orders", "--json")
    report = json.loads(out.stdout)["databases"][0]
    assert any("orders_customer_fkey" in s and "customers" in s for s in report["skipped"])
    assert "orders_pkey" in report["restored"]["constraints"]
    assert c.scalar("SELECT count(*) FROM orders", dbname="other") == 500
    # a table that is there already: pg_restore's reason, and what to do about it
    bad = pg_env.keepwell("restore", "--logical", "--db-url", c.url(), "-d", "app", "-t",
                          "orders", check=False)
    assert bad.returncode == 1 and "already exists" in bad.stderr, bad.stderr
    assert "--clean" in bad.stderr and "install" not in bad.stderr, bad.stderr
    assert bad.stderr.count("\n") == 1
    # a name that matches nothing is an error
    bad = pg_env.keepwell("restore", "--logical", "--db-url", c.url(), "-d", "app", "-t",
                          "nosuch", check=False)
    assert bad.returncode != 0 and "no table nosuch" in bad.stderr
    assert bad.stderr.count("\n") == 1
    # so is a schema (pg_restore -n of a schema the dump lacks restores nothing, silently)
    bad = pg_env.keepwell("restore", "--logical", "--db-url", c.url(), "-d", "app", "-n",
                          "nosuch", "--into", "other", check=False)
    assert bad.returncode == 2 and "holds no schema nosuch" in bad.stderr, bad.stderr
    assert bad.stderr.count("\n") == 1 and "public" in bad.stderr


def test_many_databases_in_one_command_and_options_given_twice(pg_env: PgEnv) -> None:
    c = PgCluster(pg_env.workdir).initdb().start()
    for db in ("a", "b", "c"):
        c.sql(f"CREATE DATABASE {db}")
        c.sql(f"CREATE TABLE t AS SELECT '{db}' AS v", dbname=db)
    c.sql("CREATE ROLE reporter LOGIN")
    pg_env.keepwell("backup", "--logical", "--db-url", c.url())
    for db in ("a", "b", "c"):
        c.sql(f"DROP DATABASE {db}")
    c.sql("DROP ROLE reporter")

    pg_env.keepwell("restore", "--logical", "--db-url", c.url(), "-d", "a", "-d", "b",
                    "--create")
    assert [c.scalar("SELECT v FROM t", dbname=db) for db in ("a", "b")] == ["a", "b"]
    assert c.scalar("SELECT count(*) FROM pg_database WHERE datname = 'c'") == 0
    c.sql("DROP DATABASE a")
    c.sql("DROP DATABASE b")
    # the whole cluster in one command: roles, then every database
    out = json.loads(pg_env.keepwell("restore", "--logical", "--db-url", c.url(), "--all",
                                     "--json").stdout)
    assert out["globals"] is True
    assert sorted(d["database"] for d in out["databases"]) == ["a", "b", "c", "postgres"]
    assert [c.scalar("SELECT v FROM t", dbname=db) for db in ("a", "b", "c")] == ["a", "b", "c"]
    assert c.scalar("SELECT count(*) FROM pg_roles WHERE rolname = 'reporter'") == 1

    # single-valued options given twice, and options of the other kind of restore: refused
    twice = pg_env.keepwell("restore", "--logical", "--db-url", c.url(), "--db-url",
                            c.url("a"), "-d", "a", check=False)
    assert twice.returncode == 2 and "--db-url is given more than once" in twice.stderr
    mixed = pg_env.keepwell("restore", "--logical", "--db-url", c.url(), "-d", "a",
                            "--target-time", "2026-01-01", check=False)
    assert mixed.returncode == 2 and "--target-time is not for a logical restore" in mixed.stderr
    many = pg_env.keepwell("restore", "--logical", "--db-url", c.url(), "-d", "a", "-d", "b",
                           "-t", "t", check=False)
    assert many.returncode == 2 and "apply to one database" in many.stderr
