"""What both stores of the job history share: the tables, a row, and the shape of a store.

`keepwell.control.history` holds the SQLite store and the `History` built on a store;
`keepwell.control.history_pg` the PostgreSQL one. Both import this module, never each other's
internals.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

Row = dict[str, Any]

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    name TEXT NOT NULL,
    source TEXT NOT NULL,
    action TEXT NOT NULL,
    kind TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 1,
    trigger TEXT NOT NULL DEFAULT 'schedule',
    status TEXT NOT NULL,
    scheduled_at REAL,
    started_at REAL NOT NULL,
    ended_at REAL,
    error TEXT,
    bytes_read INTEGER,
    bytes_stored INTEGER,
    bytes_uploaded INTEGER,
    dedup_ratio REAL,
    snapshot_id TEXT,
    rto REAL,
    rpo REAL,
    pid INTEGER,
    spec TEXT,
    details TEXT,
    session TEXT
);
CREATE INDEX IF NOT EXISTS runs_source ON runs(source, action, started_at);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
CREATE INDEX IF NOT EXISTS runs_job ON runs(job_id);
CREATE TABLE IF NOT EXISTS alerts (
    key TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    active INTEGER NOT NULL,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL,
    notified_at REAL,
    resolved_at REAL,
    acknowledged_at REAL,
    acknowledged_by TEXT
);
CREATE TABLE IF NOT EXISTS run_log (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    at REAL NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS run_log_run ON run_log(run_id, id);
CREATE TABLE IF NOT EXISTS streamers (
    source TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    daemon_pid INTEGER NOT NULL,
    command TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS breakers (
    source TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    failures INTEGER NOT NULL,
    updated_at REAL NOT NULL
)
"""

# columns added after the first release: (table, column, type), added to older histories on open
ADDED_COLUMNS = (
    ("runs", "session", "TEXT"),
    ("alerts", "acknowledged_at", "REAL"),
    ("alerts", "acknowledged_by", "TEXT"),
)


class Tx(Protocol):
    def q(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    def x(self, sql: str, args: Sequence[Any] = ()) -> int: ...

    def insert(self, sql: str, args: Sequence[Any] = ()) -> int: ...

    def serialize(self) -> None: ...


class Store(Protocol):
    engine: str

    def tx(self, write: bool) -> AbstractContextManager[Tx]: ...

    def session(self) -> str | None: ...

    def live_sessions(self) -> set[str] | None: ...

    def close(self) -> None: ...
