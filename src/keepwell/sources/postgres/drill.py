"""PostgreSQL restore drills: a restored copy in scratch space with a temporary server on it.

A *physical* drill restores the newest complete base backup with the source's own restore code
(`keepwell.sources.postgres.restore.restore_physical`, recovering to the end of the archived WAL
through ``restore_command``), then starts a temporary server on that data directory
(`keepwell.sources.tempserver`): a free port, a private socket directory, no TCP listener, no
archiving, trust authentication on the socket only, and nothing written outside scratch space:
every tablespace, those of the backup and those the replayed WAL creates, stays inside the
restored data directory (the restore's default), the server's data directory, pid file and log
are pinned there whatever the restored configuration says (only the socket goes to a private
directory under the system's temporary directory when scratch space is too deep for a socket's
path, 107 bytes), and a restore that would touch a
path a running server uses is refused. Recovery that stops before the end of the archived WAL
fails the drill. A *logical* drill runs ``initdb`` into scratch space, starts that temporary
server and restores the newest logical dump (globals, then every database) with
`keepwell.sources.postgres.logicalrestore.restore_logical`.

Checks (`check_copy`): ``pg_amcheck --all`` passes (when the program is installed and the drill
does not turn it off); every table the drill names exists and holds at least its minimum of
rows (without names: every user table is counted; `keepwell.sources.rowcount`).

PostgreSQL refuses to run as root: then the server and its ``restore_command`` run as the
drill's ``run_as`` user (default ``postgres``), the restored files are handed to that user, and
that user must be able to read the repository (as its ``archive_command`` already must write it).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import psycopg
from psycopg import sql

from keepwell.errors import ConfigurationError, IntegrityError, SourceError
from keepwell.repository import Repository, Snapshot
from keepwell.sources.base import JobControl, RestoredCopy, SourceJob
from keepwell.sources.postgres.catalog import BaseBackup, Catalog
from keepwell.sources.postgres.connection import ConnSpec
from keepwell.sources.postgres.logicalrestore import LogicalRequest, restore_logical
from keepwell.sources.postgres.plan import Target
from keepwell.sources.postgres.restore import (
    RestoreOptions,
    check_reached_end,
    restore_physical,
    safe_start_arguments,
)
from keepwell.sources.postgres.tools import find_program
from keepwell.sources.rowcount import count_rows, figures
from keepwell.sources.tempserver import TempServer, free_port, hand_over, unreachable
from keepwell.sources.tools import ToolProcess, run_tool, socket_directory

_READY = "database system is ready to accept connections"
_SOCKDIR_PREFIX = "keepwell-pgdrill-"
_PROMOTED = ("selected new timeline ID", "archive recovery complete")
_FATAL_RE = re.compile(r"(?:FATAL|PANIC):\s+(.*)")


def server_user(drill: Mapping[str, Any]) -> str | None:
    """The OS user temporary servers run as: the drill's ``run_as``; as root by default
    ``postgres``; otherwise keepwell's own user (None)."""
    user = drill.get("run_as")
    if user is None and os.geteuid() == 0:
        user = "postgres"
    if user is None:
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigurationError(f"drill run_as user {user!r} does not exist on this host",
                                 hint="set the drill's run_as to an existing unprivileged user"
                                 ) from None
    if pw.pw_uid == 0:
        raise ConfigurationError("PostgreSQL refuses to run as root: the drill's run_as must "
                                 "be an unprivileged user")
    if os.geteuid() != 0 and pw.pw_uid != os.geteuid():
        raise ConfigurationError(f"drill run_as {user!r} needs keepwell to run as root",
                                 hint="leave run_as unset to run as keepwell's own user")
    return str(user)


def _me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


@dataclass
class PgServer:
    """A PostgreSQL server on a data directory in scratch space, reachable on a socket only."""

    scratch: str
    user: str | None
    bindir: str
    port: int = field(default_factory=free_port)
    server: TempServer | None = None

    @property
    def datadir(self) -> str:
        return os.path.join(self.scratch, "data")

    @cached_property
    def sockdir(self) -> str:
        """In scratch space where the socket's path fits (else a private directory under the
        temporary directory, removed by `stop`)."""
        return socket_directory(os.path.join(self.scratch, "sock"), f".s.PGSQL.{self.port}",
                                _SOCKDIR_PREFIX)

    def start(self, timeout: float, stop: Callable[[], None], *, recovery: bool) -> None:
        hba = os.path.join(self.scratch, "drill_hba.conf")
        with open(hba, "w", encoding="utf-8") as f:
            f.write("local all all trust\n")
        conf = os.path.join(self.datadir, "postgresql.conf")
        if not os.path.exists(conf):  # layouts that keep it outside the data directory
            open(conf, "w").close()
        os.makedirs(self.sockdir, 0o700, exist_ok=True)
        for p in (hba, conf, self.sockdir):
            hand_over(p, self.user)
        argv = [os.path.join(self.bindir, "postgres"), "-D", self.datadir,
                *safe_start_arguments(self.datadir, self.port), "-c", "listen_addresses=",
                "-c", f"unix_socket_directories={self.sockdir}", "-c", f"hba_file={hba}",
                "-c", "archive_mode=off"]
        self.server = TempServer(argv, ready=lambda: self._ready(recovery), why=self._why,
                                 user=self.user, stop_signal=signal.SIGINT)  # a fast shutdown
        self.server.start(timeout, stop)

    def _ready(self, recovery: bool) -> bool:
        text = self.log_text()
        if _READY not in text or recovery and not any(p in text for p in _PROMOTED):
            return False
        with ToolProcess([os.path.join(self.bindir, "pg_isready"), "-h", self.sockdir, "-p",
                          str(self.port), "-t", "2"], stdout=subprocess.DEVNULL) as probe:
            accepts = probe.wait(30) == 0
        probe.close()
        return accepts

    def _why(self) -> str | None:
        fatal = _FATAL_RE.findall(self.log_text())
        return fatal[-1] if fatal else None

    def log_text(self) -> str:
        return self.server.output() if self.server is not None else ""

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(60)
        if os.path.basename(self.sockdir).startswith(_SOCKDIR_PREFIX):
            shutil.rmtree(self.sockdir, ignore_errors=True)

    def conninfo(self, user: str, dbname: str = "postgres") -> str:
        return f"host={self.sockdir} port={self.port} user={user} dbname={dbname}"


@dataclass
class PgCopy(RestoredCopy):
    server: PgServer | None = None


@contextmanager
def restore_copy(job: SourceJob, repo: Repository, ctl: JobControl,
                 scratch: str) -> Iterator[PgCopy]:
    """The newest backup of the source's mode, restored and served (see the module's words)."""
    src, drill = job.settings, job.drill
    cluster = src.get("cluster") or "main"
    physical = src.get("mode") == "physical"
    user = server_user(drill)
    hand_over(scratch, user)
    if user is not None and (where := unreachable(scratch, user)) is not None:
        raise ConfigurationError(f"user {user} cannot enter the drill's scratch directory "
                                 f"{scratch}: {where}",
                                 hint="set 'scratch' to a directory whose parents that user can "
                                      "traverse (e.g. /var/tmp/keepwell-drills)")
    cat = Catalog.build(repo.list_snapshots(), cluster)
    timeout = float(drill.get("start_timeout") or 600.0)
    with ExitStack() as stack:
        if physical:
            complete = cat.complete_backups()
            if not complete:
                raise SourceError(f"no complete physical backup of cluster {cluster} to drill"
                                  f" for {job.name}")
            backup = max(complete, key=lambda b: b.stop_lsn)
            major = int(backup.version.split(".")[0]) if backup.version else None
            server = PgServer(scratch, user, os.path.dirname(find_program("postgres", major)))
            stack.callback(server.stop)
            copy = _physical(repo, job, cat, backup, server, ctl, timeout)
        else:
            if not cat.logical:
                raise SourceError(f"no logical backup of cluster {cluster} to drill for "
                                  f"{job.name}")
            snap = repo.find_snapshot(cat.logical[-1].snapshot_id)
            server = PgServer(scratch, user, os.path.dirname(find_program("postgres",
                                                                          _major_of(snap))))
            stack.callback(server.stop)
            copy = _logical(repo, cluster, snap, server, ctl, timeout)
        copy.details.update(mode="physical" if physical else "logical",
                            server_user=user or _me())
        yield copy


def _major_of(snap: Snapshot) -> int | None:
    version = str((snap.source or {}).get("version") or (snap.source or {}).get(
        "server_version") or "")
    m = re.match(r"(\d+)", version)
    return int(m.group(1)) if m else None


def _physical(repo: Repository, job: SourceJob, cat: Catalog, backup: BaseBackup,
              server: PgServer, ctl: JobControl, timeout: float) -> PgCopy:
    location = str(job.repository["location"])
    opts = RestoreOptions(
        target_dir=server.datadir, target=Target(), snapshot=backup.snapshot_id,
        repo_location=os.path.abspath(location) if "://" not in location else location,
        password=ctl.secret(job.repository["password"], f"repository password of {job.name}"),
    )
    result = restore_physical(repo, cat.cluster, opts)
    ctl.check()
    hand_over(server.datadir, server.user)
    server.start(timeout, ctl.check, recovery=True)
    check_reached_end(result.plan, server.log_text())  # a drill that stopped short failed
    end = cat.reach(result.plan.backup).end_time or backup.stop_time or backup.time
    return PgCopy(backup.snapshot_id, end.timestamp(), server.datadir, server=server)


def _logical(repo: Repository, cluster: str, snap: Snapshot, server: PgServer,
             ctl: JobControl, timeout: float) -> PgCopy:
    os.makedirs(server.datadir, 0o700)
    hand_over(server.datadir, server.user)
    run_tool([os.path.join(server.bindir, "initdb"), "-D", server.datadir, "-A", "trust",
              "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"],
             what="initdb for the drill", user=server.user, timeout=300)
    server.start(timeout, ctl.check, recovery=False)
    source = snap.source or {}
    into = ConnSpec(server.conninfo("postgres"))
    if source.get("globals"):
        restore_logical(repo, into, cluster, LogicalRequest(restore_globals=True),
                        snapshot=snap.id)
    for db in source.get("databases") or []:
        ctl.check()
        restore_logical(repo, into, cluster,
                        LogicalRequest(databases=[db], create=db != "postgres"),
                        snapshot=snap.id)
    return PgCopy(snap.id, snap.time.timestamp(), server.datadir, server=server)


def check_copy(job: SourceJob, copy: PgCopy, ctl: JobControl) -> dict[str, Any]:
    """``pg_amcheck`` and the row counts of the served copy."""
    server = copy.server
    assert server is not None
    conn = job.settings.get("connection") or {}
    su = _superuser(server, [conn.get("user"), server.user, _me(), "postgres"])
    ctl.check()
    amcheck = _amcheck(server, su, ctl) if job.drill.get("amcheck", True) else "off"
    ctl.check()
    default_db = conn.get("database") or "postgres"
    with _Tables(server, su) as tables:
        counts = count_rows(tables, job.drill.get("tables") or {},
                            full_name=lambda n: ".".join(_parse_table(n, default_db)))
    return {"amcheck": amcheck, **figures(counts)}


def _superuser(server: PgServer, candidates: list[str | None]) -> str:
    """A role that exists in the restored cluster (trust on the socket: no password)."""
    seen: list[str] = []
    for name in candidates:
        if not name or name in seen:
            continue
        seen.append(name)
        try:
            with psycopg.connect(server.conninfo(name), connect_timeout=10):
                return name
        except psycopg.OperationalError:
            continue
    raise SourceError(f"cannot connect to the restored server as {', '.join(seen)}",
                      hint="give the source's connection.user a role of that cluster")


def _amcheck(server: PgServer, user: str, ctl: JobControl) -> str:
    """``pg_amcheck --all`` against the temporary server; 'ok', or 'unavailable'."""
    exe = os.path.join(server.bindir, "pg_amcheck")
    if not os.access(exe, os.X_OK):
        return "unavailable"
    with ToolProcess([exe, "-h", server.sockdir, "-p", str(server.port), "-U", user, "--all",
                      "--install-missing", "--no-strict-names"]) as proc:
        said = proc.stdout.read().decode("utf-8", "replace")
        rc = proc.wait(3600, check=ctl.check)
    if rc != 0:
        lines = (said + proc.stderr_text()).strip().splitlines()
        raise IntegrityError("drill: pg_amcheck found corruption: "
                             + (lines[0] if lines else f"exit {rc}"))
    return "ok"


def _parse_table(name: str, default_db: str) -> tuple[str, str, str]:
    parts = name.split(".")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return default_db, parts[0], parts[1]
    return default_db, "public", parts[0]


class _Tables:
    """The user tables of every database of the served copy (`rowcount.TableReader`)."""

    def __init__(self, server: PgServer, user: str) -> None:
        self.server = server
        self.user = user
        self._conns: dict[str, psycopg.Connection[Any]] = {}
        self._parts: dict[str, tuple[str, str, str]] = {}

    def _conn(self, db: str) -> psycopg.Connection[Any]:
        if db not in self._conns:
            self._conns[db] = psycopg.connect(self.server.conninfo(self.user, db),
                                              autocommit=True)
        return self._conns[db]

    def tables(self) -> list[str]:
        dbs = [str(r[0]) for r in self._conn("postgres").execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate"
            " ORDER BY 1").fetchall()]
        for db in dbs:
            for schema, table in self._conn(db).execute(
                    "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n"
                    " ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p')"
                    " AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
                    " AND n.nspname NOT LIKE 'pg_toast%%' ORDER BY 1, 2").fetchall():
                self._parts[f"{db}.{schema}.{table}"] = (db, str(schema), str(table))
        return list(self._parts)

    def count(self, table: str) -> int:
        db, schema, name = self._parts[table]
        try:
            row = self._conn(db).execute(sql.SQL("SELECT count(*) FROM {}.{}").format(
                sql.Identifier(schema), sql.Identifier(name))).fetchone()
        except psycopg.Error as exc:
            raise IntegrityError(f"drill: reading {table} failed: "
                                 f"{str(exc).strip().splitlines()[0]}") from None
        return int(row[0]) if row else 0

    def __enter__(self) -> _Tables:
        return self

    def __exit__(self, *exc: Any) -> None:
        for conn in self._conns.values():
            conn.close()
