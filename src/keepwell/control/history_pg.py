"""The PostgreSQL store of the job history (see `keepwell.control.history`).

The tables are those of the SQLite store with PostgreSQL types (``BIGSERIAL`` ids, ``DOUBLE
PRECISION`` times). One connection per `History` (psycopg 3, autocommit; explicit transactions
for writes); the connection's server session (backend pid and start time) identifies the writer
of a run, so liveness is asked of the server itself. Advisory locks: a transaction-scoped one
serialises read-then-write transactions (as SQLite's ``BEGIN IMMEDIATE``), a session one keeps
one daemon per history.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from keepwell.control.history_store import ADDED_COLUMNS, SCHEMA, Row, Tx

LOCK_ALERTS = 0x6B77_0001  # advisory lock keys (pg_advisory_*): "kw" and a number
LOCK_DAEMON = 0x6B77_0002


class _PgTx:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    def q(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return list(self.conn.execute(self._sql(sql), tuple(args)).fetchall())

    def x(self, sql: str, args: Sequence[Any] = ()) -> int:
        return int(self.conn.execute(self._sql(sql), tuple(args)).rowcount)

    def insert(self, sql: str, args: Sequence[Any] = ()) -> int:
        row = self.conn.execute(self._sql(sql) + " RETURNING id", tuple(args)).fetchone()
        return int(row["id"])

    def serialize(self) -> None:
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ALERTS,))


def _pg_schema() -> list[str]:
    ddl = (SCHEMA.replace("id INTEGER PRIMARY KEY", "id BIGSERIAL PRIMARY KEY")
           .replace(" REAL", " DOUBLE PRECISION").replace(" INTEGER", " BIGINT"))
    return [s.strip() for s in ddl.split(";") if s.strip()]


class PgStore:
    """One PostgreSQL database (psycopg 3), one connection per History."""

    engine = "postgres"

    def __init__(self, url: str, password: str | None) -> None:
        import psycopg
        from psycopg.rows import dict_row

        self._psycopg = psycopg
        kwargs: dict[str, Any] = {"autocommit": True, "row_factory": dict_row,
                                  "connect_timeout": 10, "application_name": "keepwell"}
        if password is not None:
            kwargs["password"] = password
        self._url, self._kwargs = url, kwargs
        self.conn = psycopg.connect(url, **kwargs)
        self._session = self._whoami()
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ALERTS,))
            for stmt in _pg_schema():
                self.conn.execute(stmt)
            for table, column, kind in ADDED_COLUMNS:
                kind = kind.replace("REAL", "DOUBLE PRECISION")
                self.conn.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")

    _SESSION = "pid::text || '@' || extract(epoch FROM backend_start)::text"

    def _whoami(self) -> str:
        row = self.conn.execute(f"SELECT {self._SESSION} AS s FROM pg_stat_activity"
                                " WHERE pid = pg_backend_pid()").fetchone()
        return str(row["s"]) if row is not None else "?"

    @contextmanager
    def tx(self, write: bool) -> Iterator[Tx]:
        if self.conn.closed or self.conn.broken:
            self.conn = self._psycopg.connect(self._url, **self._kwargs)
            self._session = self._whoami()
        if not write:
            yield _PgTx(self.conn)
            return
        with self.conn.transaction():
            yield _PgTx(self.conn)

    def session(self) -> str | None:
        return self._session

    def live_sessions(self) -> set[str]:
        rows = self.conn.execute(f"SELECT {self._SESSION} AS s FROM pg_stat_activity"
                                 " WHERE backend_start IS NOT NULL").fetchall()
        return {str(r["s"]) for r in rows}

    def try_lock_daemon(self) -> bool:
        row = self.conn.execute("SELECT pg_try_advisory_lock(%s) AS ok",
                                (LOCK_DAEMON,)).fetchone()
        return row is not None and bool(row["ok"])

    def close(self) -> None:
        self.conn.close()
