"""Job history: every run, alert and breaker state, kept in SQLite or PostgreSQL.

A *run* is one attempt at one job: its job id (stable across retries, so a job is identified and
idempotent), attempt number, status, times, error, byte counts, dedup ratio, snapshot id, and for
drills the RTO/RPO. The daemon, ``keepwell run`` and ``keepwell status`` may use the same history
at once. Runs found ``running`` whose writer is gone were interrupted by a crash;
`interrupted_runs` finds them so the daemon can mark and re-run them.

Two stores keep the same tables with the same behaviour:

* SQLite (a file path, the default): WAL mode and a busy timeout for concurrent writers; a
  run's writer is alive while its process id is.
* PostgreSQL (a ``postgresql://`` URL): every writer holds one connection, and a run records
  the server session that wrote it (backend pid and start time), so a run is alive while that
  session is, whichever host it came from. Transactions that read before they write (alerts)
  take a transaction-scoped advisory lock, as SQLite's ``BEGIN IMMEDIATE`` serialises them.

Statuses: ``running``, ``succeeded``, ``failed``, ``timeout``, ``interrupted``, ``skipped``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from keepwell.control.history_store import ADDED_COLUMNS, SCHEMA, Row, Store, Tx
from keepwell.errors import ConfigurationError, KeepwellError

FINAL_STATUSES = ("succeeded", "failed", "timeout", "interrupted", "skipped")
PG_SCHEMES = ("postgresql://", "postgres://")


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
    session: str | None = None

    @property
    def duration(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("spec", None)
        d.pop("session", None)
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
    acknowledged_at: float | None = None
    acknowledged_by: str | None = None

    @property
    def open(self) -> bool:
        """Active and not acknowledged: what still asks for an operator's attention."""
        return self.active and self.acknowledged_at is None

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "open": self.open}



class HistoryError(KeepwellError):
    """The job history cannot be read or written (its database is unreachable or broken)."""

    hint = "check the 'history' setting and that its database is reachable"


def is_postgres_url(location: str) -> bool:
    return location.startswith(PG_SCHEMES)


def describe_location(location: str) -> str:
    """The history's location without any password, fit for logs and errors."""
    if not is_postgres_url(location):
        return location
    scheme, _, rest = location.partition("://")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        cred, _, hostpart = netloc.rpartition("@")
        netloc = cred.split(":", 1)[0] + "@" + hostpart
    return f"{scheme}://{netloc}{slash}{path.split('?', 1)[0]}"


def _sqlite_hint(exc: Exception) -> str:
    """What to do about a SQLite history that cannot be opened."""
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return ("another process has held the job history locked for 30 s: try again, or find "
                "it with 'fuser' on the file")
    if "not a database" in text or "malformed" in text:
        return ("the file is damaged or is not a job history: move it aside (a new history is "
                "started) or put back a copy")
    return "check the 'history' path and its permissions"


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




class _SqliteTx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def q(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return [dict(r) for r in self.db.execute(sql, tuple(args)).fetchall()]

    def x(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self.db.execute(sql, tuple(args)).rowcount

    def insert(self, sql: str, args: Sequence[Any] = ()) -> int:
        return int(self.db.execute(sql, tuple(args)).lastrowid or 0)

    def serialize(self) -> None:
        return  # BEGIN IMMEDIATE already holds the write lock


class _SqliteStore:
    """One SQLite file in WAL mode."""

    engine = "sqlite"

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        # created readable by its owner only, like the repository's files (SQLite gives its -wal
        # and -shm files the database file's mode). Only a new file is opened and closed here:
        # closing a descriptor of a file drops every POSIX lock this process holds on it, so
        # closing one of an existing history would take the locks of this process's other
        # connections to it, and other processes' writes would then corrupt it.
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except FileExistsError:
            pass
        self.db = sqlite3.connect(path, timeout=30.0, check_same_thread=False,
                                  isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=30000")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in SCHEMA.split(";"):
                if stmt.strip() and "runs_job" not in stmt:
                    self.db.execute(stmt)
            for table, column, kind in ADDED_COLUMNS:  # a history written by an older keepwell
                columns = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
                if column not in columns:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            self.db.execute("CREATE INDEX IF NOT EXISTS runs_job ON runs(job_id)")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @contextmanager
    def tx(self, write: bool) -> Iterator[Tx]:
        if not write:
            yield _SqliteTx(self.db)
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield _SqliteTx(self.db)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def session(self) -> str | None:
        return None

    def live_sessions(self) -> set[str] | None:
        return None

    def close(self) -> None:
        self.db.close()


class History:
    """The store of runs, alerts and breaker states (thread-safe).

    ``location`` is a SQLite file path or a ``postgresql://`` URL (``password`` is then used
    when the URL carries none).
    """

    def __init__(self, location: str, password: str | None = None) -> None:
        self.path = location
        self.where = describe_location(location)
        self._lock = threading.RLock()
        self._store: Store
        try:
            if is_postgres_url(location):
                from keepwell.control.history_pg import PgStore

                self._store = PgStore(location, password)
            else:
                self._store = _SqliteStore(location)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigurationError(f"cannot open the job history {self.where}: {exc}",
                                     hint=_sqlite_hint(exc)) from None
        except Exception as exc:
            if type(exc).__module__.startswith("psycopg"):
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigurationError(
                    f"cannot open the job history {self.where}: {msg}",
                    hint="check the 'history' URL, 'history_password' and that the database"
                         " server is reachable") from None
            raise

    @property
    def engine(self) -> str:
        return self._store.engine

    def is_mine(self, run: Run) -> bool:
        """Whether this process (this connection, for PostgreSQL) wrote ``run``."""
        if run.session is not None:
            return run.session == self._store.session()
        return run.pid == os.getpid()

    def close(self) -> None:
        with self._lock:
            self._store.close()

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[Tx]:
        with self._lock:
            try:
                with self._store.tx(write) as tx:
                    yield tx
            except (KeepwellError, GeneratorExit):
                raise
            except sqlite3.Error as exc:
                raise HistoryError(f"job history {self.where}: {exc}") from None
            except Exception as exc:
                if type(exc).__module__.startswith("psycopg"):
                    raise HistoryError(f"job history {self.where}: "
                                       f"{str(exc).strip().splitlines()[0]}") from None
                raise

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        with self._tx(write=False) as tx:
            return tx.q(sql, args)

    def try_lock_daemon(self) -> bool | None:
        """Take the one-daemon lock inside a PostgreSQL history (None: SQLite uses a file)."""
        take = getattr(self._store, "try_lock_daemon", None)
        if take is None:
            return None
        with self._lock:
            return bool(take())

    # runs -------------------------------------------------------------------------------------
    def start_run(self, *, job_id: str, name: str, source: str, action: str, kind: str,
                  attempt: int, trigger: str, scheduled_at: float | None,
                  spec: dict[str, Any] | None, started_at: float | None = None) -> int:
        with self._tx() as db:
            return db.insert(
                "INSERT INTO runs (job_id, name, source, action, kind, attempt, trigger, status,"
                " scheduled_at, started_at, pid, spec, session)"
                " VALUES (?,?,?,?,?,?,?,'running',?,?,?,?,?)",
                (job_id, name, source, action, kind, attempt, trigger, scheduled_at,
                 started_at if started_at is not None else time.time(), os.getpid(),
                 json.dumps(spec) if spec is not None else None, self._store.session()),
            )

    def finish_run(self, run_id: int, status: str, *, error: str | None = None,
                   bytes_read: int | None = None, bytes_stored: int | None = None,
                   bytes_uploaded: int | None = None, dedup_ratio: float | None = None,
                   snapshot_id: str | None = None, rto: float | None = None,
                   rpo: float | None = None, details: dict[str, Any] | None = None,
                   ended_at: float | None = None) -> bool:
        """Record the end of a run; False if it was already recorded as ended (e.g. timeout)."""
        with self._tx() as db:
            return db.x(
                "UPDATE runs SET status=?, ended_at=?, error=?, bytes_read=?, bytes_stored=?,"
                " bytes_uploaded=?, dedup_ratio=?, snapshot_id=?, rto=?, rpo=?, details=?"
                " WHERE id=? AND status='running'",
                (status, ended_at if ended_at is not None else time.time(), error, bytes_read,
                 bytes_stored, bytes_uploaded, dedup_ratio, snapshot_id, rto, rpo,
                 json.dumps(details or {}, default=str), run_id),
            ) > 0

    def record_skip(self, *, job_id: str, name: str, source: str, action: str, kind: str,
                    attempt: int, trigger: str, reason: str) -> None:
        now = time.time()
        run_id = self.start_run(job_id=job_id, name=name, source=source, action=action,
                                kind=kind, attempt=attempt, trigger=trigger, scheduled_at=now,
                                spec=None, started_at=now)
        self.finish_run(run_id, "skipped", error=reason, ended_at=now)

    @staticmethod
    def _run(row: Row) -> Run:
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
        return [self._run(r) for r in self._query(sql, (*args, limit))]

    def last_run(self, source: str, action: str, status: str | None = None) -> Run | None:
        found = self.runs(source=source, action=action, status=status, limit=1)
        return found[0] if found else None

    def successes(self, source: str, action: str = "backup", limit: int = 30) -> list[Run]:
        """Newest first."""
        return self.runs(source=source, action=action, status="succeeded", limit=limit)

    def count_by_status(self) -> dict[tuple[str, str, str], int]:
        rows = self._query("SELECT source, action, status, COUNT(*) AS n FROM runs"
                           " GROUP BY source, action, status")
        return {(r["source"], r["action"], r["status"]): int(r["n"]) for r in rows}

    def interrupted_runs(self) -> list[Run]:
        """Runs left ``running`` by a writer that no longer exists.

        SQLite: the writing process is gone (or it is this process, which has none running
        when it asks). PostgreSQL: the server session that wrote the run is gone (or it is this
        one), so a run written from any host is judged by the database itself.
        """
        with self._tx(write=False) as tx:
            rows = tx.q("SELECT * FROM runs WHERE status='running'")
            live = self._store.live_sessions()
            mine = self._store.session()
        out = []
        for r in rows:
            if live is not None and r.get("session"):
                dead = r["session"] not in live or r["session"] == mine
            else:
                dead = not _pid_alive(r["pid"]) or r["pid"] == os.getpid()
            if dead:
                out.append(self._run(r))
        return out

    def mark_interrupted(self, run_id: int, reason: str) -> None:
        with self._tx() as db:
            db.x("UPDATE runs SET status='interrupted', ended_at=?, error=?"
                 " WHERE id=? AND status='running'", (time.time(), reason, run_id))

    def run(self, run_id: int) -> Run | None:
        rows = self._query("SELECT * FROM runs WHERE id=?", (run_id,))
        return self._run(rows[0]) if rows else None

    def runs_for_job(self, job_id: str) -> list[Run]:
        """Every attempt of one job, oldest first."""
        return [self._run(r) for r in self._query(
            "SELECT * FROM runs WHERE job_id=? ORDER BY id", (job_id,))]

    # log lines of runs ------------------------------------------------------------------------
    def add_log(self, run_id: int, level: str, message: str, at: float | None = None) -> None:
        with self._tx() as db:
            db.x("INSERT INTO run_log (run_id, at, level, message) VALUES (?,?,?,?)",
                 (run_id, at if at is not None else time.time(), level, message))

    def run_log(self, run_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        """The log lines of one run, oldest first: ``at``, ``level``, ``message``."""
        return [{"at": r["at"], "level": r["level"], "message": r["message"]}
                for r in self._query("SELECT at, level, message FROM run_log WHERE run_id=?"
                                     " ORDER BY id LIMIT ?", (run_id, limit))]

    def job_succeeded(self, job_id: str) -> bool:
        rows = self._query("SELECT 1 AS one FROM runs WHERE job_id=? AND status='succeeded'"
                           " LIMIT 1", (job_id,))
        return bool(rows)

    # alerts -----------------------------------------------------------------------------------
    def raise_alert(self, key: str, source: str, kind: str, message: str) -> bool:
        """Activate an alert; True when it was not already active (so notify once)."""
        now = time.time()
        with self._tx() as db:
            db.serialize()
            rows = db.q("SELECT active FROM alerts WHERE key=?", (key,))
            if rows and rows[0]["active"]:
                db.x("UPDATE alerts SET last_at=?, message=? WHERE key=?", (now, message, key))
                return False
            db.x(
                "INSERT INTO alerts (key, source, kind, message, active, first_at, last_at)"
                " VALUES (?,?,?,?,1,?,?) ON CONFLICT(key) DO UPDATE SET active=1, message=?,"
                " first_at=?, last_at=?, notified_at=NULL, resolved_at=NULL,"
                " acknowledged_at=NULL, acknowledged_by=NULL",
                (key, source, kind, message, now, now, message, now, now),
            )
            return True

    def mark_notified(self, key: str) -> None:
        with self._tx() as db:
            db.x("UPDATE alerts SET notified_at=? WHERE key=?", (time.time(), key))

    def resolve_alert(self, key: str) -> bool:
        with self._tx() as db:
            return db.x("UPDATE alerts SET active=0, resolved_at=? WHERE key=? AND active=1",
                        (time.time(), key)) > 0

    def acknowledge_alert(self, key: str, by: str) -> bool:
        """Mark an active alert seen by an operator (``by``); it stays active, and open again
        when it resolves and is raised anew. False: no such active, unacknowledged alert."""
        with self._tx() as db:
            return db.x("UPDATE alerts SET acknowledged_at=?, acknowledged_by=?"
                        " WHERE key=? AND active=1 AND acknowledged_at IS NULL",
                        (time.time(), by, key)) > 0

    def alerts(self, *, active_only: bool = True) -> list[Alert]:
        sql = "SELECT * FROM alerts" + (" WHERE active=1" if active_only else "")
        rows = self._query(sql + " ORDER BY first_at")
        return [Alert(**{**r, "active": bool(r["active"])}) for r in rows]

    # breakers ---------------------------------------------------------------------------------
    def set_breaker(self, source: str, state: str, failures: int) -> None:
        now = time.time()
        with self._tx() as db:
            db.x(
                "INSERT INTO breakers (source, state, failures, updated_at) VALUES (?,?,?,?)"
                " ON CONFLICT(source) DO UPDATE SET state=?, failures=?, updated_at=?",
                (source, state, failures, now, state, failures, now),
            )

    def breakers(self) -> dict[str, tuple[str, int, float]]:
        rows = self._query("SELECT * FROM breakers")
        return {r["source"]: (r["state"], int(r["failures"]), float(r["updated_at"]))
                for r in rows}

    # streamers ----------------------------------------------------------------------------------
    def set_streamer(self, source: str, pid: int, command: list[str]) -> None:
        with self._tx() as db:
            db.x(
                "INSERT INTO streamers (source, pid, daemon_pid, command) VALUES (?,?,?,?)"
                " ON CONFLICT(source) DO UPDATE SET pid=?, daemon_pid=?, command=?",
                (source, pid, os.getpid(), json.dumps(command), pid, os.getpid(),
                 json.dumps(command)),
            )

    def orphaned_streamers(self) -> list[tuple[str, int, list[str]]]:
        """Streamers recorded by a daemon that is gone (it was killed): (source, pid, argv).

        Streamers run on the daemon's host, so a process id is what identifies them.
        """
        rows = self._query("SELECT * FROM streamers")
        return [(r["source"], int(r["pid"]), json.loads(r["command"])) for r in rows
                if not _pid_alive(r["daemon_pid"])]

    def clear_streamer(self, source: str) -> None:
        with self._tx() as db:
            db.x("DELETE FROM streamers WHERE source=?", (source,))


def open_history(cfg: Any) -> History:
    """The job history a validated `Config` names (its password read only now)."""
    from keepwell.control.secrets import resolve

    location = cfg.history
    if location.startswith(("env:", "file:")):
        location = resolve(location, what="job history URL")
    password = None
    if getattr(cfg, "history_password", None):
        password = resolve(cfg.history_password, what="job history password")
    return History(location, password)
