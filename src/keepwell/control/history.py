"""Job history: every run, alert and breaker state, kept in SQLite.

A *run* is one attempt at one job: its job id (stable across retries, so a job is identified and
idempotent), attempt number, status, times, error, byte counts, dedup ratio, snapshot id, and for
drills the RTO/RPO. The daemon, ``keepwell run`` and ``keepwell status`` may use the same file at
once (WAL mode, busy timeout). Runs found ``running`` whose process is gone were interrupted by a
crash; `interrupted_runs` finds them so the daemon can mark and re-run them.

Statuses: ``running``, ``succeeded``, ``failed``, ``timeout``, ``interrupted``, ``skipped``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from keepwell.errors import ConfigurationError

_SCHEMA = """
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
    details TEXT
);
CREATE INDEX IF NOT EXISTS runs_source ON runs(source, action, started_at);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
CREATE TABLE IF NOT EXISTS alerts (
    key TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    active INTEGER NOT NULL,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL,
    notified_at REAL,
    resolved_at REAL
);
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
);
"""

FINAL_STATUSES = ("succeeded", "failed", "timeout", "interrupted", "skipped")


@dataclass
class Run:
    id: int
    job_id: str
    name: str
    source: str
    action: str
    kind: str
    attempt: int
    trigger: str
    status: str
    scheduled_at: float | None
    started_at: float
    ended_at: float | None
    error: str | None
    bytes_read: int | None
    bytes_stored: int | None
    bytes_uploaded: int | None
    dedup_ratio: float | None
    snapshot_id: str | None
    rto: float | None
    rpo: float | None
    pid: int | None
    spec: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("spec", None)
        d["duration"] = self.duration
        return d


@dataclass
class Alert:
    key: str
    source: str
    kind: str
    message: str
    active: bool
    first_at: float
    last_at: float
    notified_at: float | None
    resolved_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class History:
    """The SQLite store of runs, alerts and breaker states (thread-safe)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30.0, check_same_thread=False,
                                       isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigurationError(f"cannot open the job history {path}: {exc}",
                                     hint="check the 'history' path and its permissions"
                                     ) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # runs -------------------------------------------------------------------------------------
    def start_run(self, *, job_id: str, name: str, source: str, action: str, kind: str,
                  attempt: int, trigger: str, scheduled_at: float | None,
                  spec: dict[str, Any] | None, started_at: float | None = None) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO runs (job_id, name, source, action, kind, attempt, trigger, status,"
                " scheduled_at, started_at, pid, spec) VALUES (?,?,?,?,?,?,?,'running',?,?,?,?)",
                (job_id, name, source, action, kind, attempt, trigger, scheduled_at,
                 started_at if started_at is not None else time.time(), os.getpid(),
                 json.dumps(spec) if spec is not None else None),
            )
            return int(cur.lastrowid or 0)

    def finish_run(self, run_id: int, status: str, *, error: str | None = None,
                   bytes_read: int | None = None, bytes_stored: int | None = None,
                   bytes_uploaded: int | None = None, dedup_ratio: float | None = None,
                   snapshot_id: str | None = None, rto: float | None = None,
                   rpo: float | None = None, details: dict[str, Any] | None = None,
                   ended_at: float | None = None) -> bool:
        """Record the end of a run; False if it was already recorded as ended (e.g. timeout)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE runs SET status=?, ended_at=?, error=?, bytes_read=?, bytes_stored=?,"
                " bytes_uploaded=?, dedup_ratio=?, snapshot_id=?, rto=?, rpo=?, details=?"
                " WHERE id=? AND status='running'",
                (status, ended_at if ended_at is not None else time.time(), error, bytes_read,
                 bytes_stored, bytes_uploaded, dedup_ratio, snapshot_id, rto, rpo,
                 json.dumps(details or {}, default=str), run_id),
            )
            return cur.rowcount > 0

    def record_skip(self, *, job_id: str, name: str, source: str, action: str, kind: str,
                    attempt: int, trigger: str, reason: str) -> None:
        now = time.time()
        run_id = self.start_run(job_id=job_id, name=name, source=source, action=action,
                                kind=kind, attempt=attempt, trigger=trigger, scheduled_at=now,
                                spec=None, started_at=now)
        self.finish_run(run_id, "skipped", error=reason, ended_at=now)

    @staticmethod
    def _run(row: sqlite3.Row) -> Run:
        d = dict(row)
        d["spec"] = json.loads(d["spec"]) if d.get("spec") else None
        d["details"] = json.loads(d["details"]) if d.get("details") else {}
        return Run(**d)

    def runs(self, *, source: str | None = None, action: str | None = None,
             status: str | None = None, limit: int = 50) -> list[Run]:
        """Newest first."""
        where, args = [], []
        for col, val in (("source", source), ("action", action), ("status", status)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        sql = "SELECT * FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [self._run(r) for r in rows]

    def last_run(self, source: str, action: str, status: str | None = None) -> Run | None:
        found = self.runs(source=source, action=action, status=status, limit=1)
        return found[0] if found else None

    def successes(self, source: str, action: str = "backup", limit: int = 30) -> list[Run]:
        """Newest first."""
        return self.runs(source=source, action=action, status="succeeded", limit=limit)

    def count_by_status(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT source, action, status, COUNT(*) FROM runs GROUP BY 1,2,3").fetchall()
        return {(r[0], r[1], r[2]): int(r[3]) for r in rows}

    def interrupted_runs(self) -> list[Run]:
        """Runs left ``running`` by a process that no longer exists."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM runs WHERE status='running'").fetchall()
        return [self._run(r) for r in rows if not _pid_alive(r["pid"]) or r["pid"] == os.getpid()]

    def mark_interrupted(self, run_id: int, reason: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE runs SET status='interrupted', ended_at=?, error=? WHERE id=?",
                       (time.time(), reason, run_id))

    def job_succeeded(self, job_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM runs WHERE job_id=? AND status='succeeded' LIMIT 1", (job_id,)
            ).fetchone()
        return row is not None

    # alerts -----------------------------------------------------------------------------------
    def raise_alert(self, key: str, source: str, kind: str, message: str) -> bool:
        """Activate an alert; True when it was not already active (so notify once)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT active FROM alerts WHERE key=?", (key,)).fetchone()
            if row is not None and row["active"]:
                db.execute("UPDATE alerts SET last_at=?, message=? WHERE key=?",
                           (now, message, key))
                return False
            db.execute(
                "INSERT INTO alerts (key, source, kind, message, active, first_at, last_at)"
                " VALUES (?,?,?,?,1,?,?) ON CONFLICT(key) DO UPDATE SET active=1, message=?,"
                " first_at=?, last_at=?, notified_at=NULL, resolved_at=NULL",
                (key, source, kind, message, now, now, message, now, now),
            )
            return True

    def mark_notified(self, key: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE alerts SET notified_at=? WHERE key=?", (time.time(), key))

    def resolve_alert(self, key: str) -> bool:
        with self._tx() as db:
            cur = db.execute("UPDATE alerts SET active=0, resolved_at=? WHERE key=? AND active=1",
                             (time.time(), key))
            return cur.rowcount > 0

    def alerts(self, *, active_only: bool = True) -> list[Alert]:
        sql = "SELECT * FROM alerts" + (" WHERE active=1" if active_only else "")
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY first_at").fetchall()
        return [Alert(**{**dict(r), "active": bool(r["active"])}) for r in rows]

    # breakers ---------------------------------------------------------------------------------
    def set_breaker(self, source: str, state: str, failures: int) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO breakers (source, state, failures, updated_at) VALUES (?,?,?,?)"
                " ON CONFLICT(source) DO UPDATE SET state=?, failures=?, updated_at=?",
                (source, state, failures, time.time(), state, failures, time.time()),
            )

    def breakers(self) -> dict[str, tuple[str, int, float]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM breakers").fetchall()
        return {r["source"]: (r["state"], r["failures"], r["updated_at"]) for r in rows}

    # streamers ----------------------------------------------------------------------------------
    def set_streamer(self, source: str, pid: int, command: list[str]) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO streamers (source, pid, daemon_pid, command) VALUES (?,?,?,?)"
                " ON CONFLICT(source) DO UPDATE SET pid=?, daemon_pid=?, command=?",
                (source, pid, os.getpid(), json.dumps(command), pid, os.getpid(),
                 json.dumps(command)),
            )

    def orphaned_streamers(self) -> list[tuple[str, int, list[str]]]:
        """Streamers recorded by a daemon that is gone (it was killed): (source, pid, argv)."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM streamers").fetchall()
        return [(r["source"], r["pid"], json.loads(r["command"])) for r in rows
                if not _pid_alive(r["daemon_pid"])]

    def clear_streamer(self, source: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM streamers WHERE source=?", (source,))
