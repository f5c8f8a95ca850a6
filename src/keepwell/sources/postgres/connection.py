"""Connections to a PostgreSQL server and the facts keepwell records about it.

Connection settings come from a libpq URL or conninfo string (``--db-url``) or, like every
PostgreSQL tool, from the libpq environment (``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGDATABASE``,
``PGPASSWORD``, ``.pgpass``). A `ConnSpec` is that setting; it connects with psycopg and it hands
the same setting to the PostgreSQL client programs as ``--dbname``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo

from keepwell.sources.postgres.errors import ConnectionFailedError, PostgresError
from keepwell.sources.postgres.walnames import Lsn


@dataclass(frozen=True)
class ConnSpec:
    """A libpq connection setting; empty means "the libpq environment only"."""

    conninfo: str = ""

    @classmethod
    def from_url(cls, url: str | None) -> ConnSpec:
        if not url:
            return cls("")
        try:
            return cls(pg_conninfo.make_conninfo(url))
        except psycopg.ProgrammingError as exc:
            raise ConnectionFailedError(f"invalid --db-url: {exc}") from None

    def with_dbname(self, dbname: str) -> ConnSpec:
        return ConnSpec(pg_conninfo.make_conninfo(self.conninfo, dbname=dbname))

    def replication(self) -> ConnSpec:
        """The same setting for a physical replication connection (pg_basebackup's kind)."""
        return ConnSpec(pg_conninfo.make_conninfo(self.conninfo, replication="true"))

    def describe(self) -> str:
        """Host/port/database for messages, never the password."""
        try:
            params = pg_conninfo.conninfo_to_dict(self.conninfo)
        except psycopg.ProgrammingError:
            params = {}
        host = params.get("host") or "(libpq default host)"
        port = params.get("port") or ""
        db = params.get("dbname") or ""
        return f"{host}{':' + str(port) if port else ''}{'/' + str(db) if db else ''}"

    def dbname_arg(self) -> list[str]:
        """The ``--dbname=...`` argument for client programs (none when the env says it all)."""
        return [f"--dbname={self.conninfo}"] if self.conninfo else []


@contextmanager
def connect(spec: ConnSpec, *, autocommit: bool = True) -> Iterator[psycopg.Connection[Any]]:
    try:
        conn = psycopg.connect(spec.conninfo, autocommit=autocommit, connect_timeout=10)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "connection refused"
        raise ConnectionFailedError(
            f"cannot connect to PostgreSQL at {spec.describe()}: {first}"
        ) from None
    try:
        yield conn
    finally:
        conn.close()


@dataclass(frozen=True)
class ServerFacts:
    system_identifier: int
    version: str
    version_num: int
    timeline: int
    in_recovery: bool
    segment_size: int
    data_directory: str | None

    @property
    def major(self) -> int:
        return self.version_num // 10000

    def as_source(self) -> dict[str, Any]:
        return {
            "system_identifier": str(self.system_identifier),
            "version": self.version,
            "version_num": self.version_num,
            "segment_size": self.segment_size,
        }


def server_facts(conn: psycopg.Connection[Any]) -> ServerFacts:
    try:
        row = conn.execute(
            "SELECT (SELECT system_identifier FROM pg_control_system()),"
            " current_setting('server_version'), current_setting('server_version_num')::int,"
            " (SELECT timeline_id FROM pg_control_checkpoint()), pg_is_in_recovery(),"
            " (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')"
        ).fetchone()
    except psycopg.Error as exc:
        raise PostgresError(f"cannot read the server's identity: {exc}".strip()) from None
    assert row is not None
    try:
        ddir = conn.execute("SELECT current_setting('data_directory')").fetchone()
        data_directory = str(ddir[0]) if ddir else None
    except psycopg.Error:
        data_directory = None
    sysid, version, vnum, tli, in_rec, segsize = row
    return ServerFacts(
        int(sysid), str(version).split()[0], int(vnum), int(tli), bool(in_rec), int(segsize),
        data_directory,
    )


def current_wal_lsn(conn: psycopg.Connection[Any]) -> Lsn:
    row = conn.execute(
        "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
        " ELSE pg_current_wal_lsn() END::text"
    ).fetchone()
    assert row is not None
    return Lsn.parse(str(row[0]))


def next_xid(conn: psycopg.Connection[Any]) -> int:
    """Every transaction id at or above this one started after now."""
    row = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()
    assert row is not None
    return int(row[0])
