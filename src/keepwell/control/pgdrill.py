"""PostgreSQL restore drills: restore into scratch space, start a temporary server, check it.

A *physical* drill restores the newest complete base backup with the source's own restore code
(`keepwell.sources.postgres.restore.restore_physical`, recovering to the end of the archived WAL
through ``restore_command``), then starts a temporary server on that data directory: a free
port, a private socket directory, no TCP listener, no archiving, trust authentication on the
socket only, and nothing written outside scratch space: every tablespace, those of the backup
and those the replayed WAL creates, stays inside the restored data directory (the restore's
default), the server's data directory, pid file and log are pinned there whatever the restored
configuration says, and a restore that would touch a path a running server uses is refused. A *logical* drill runs ``initdb`` into scratch space, starts that temporary server
and restores the newest logical dump (globals, then every database) with
`keepwell.sources.postgres.logicalrestore.restore_logical`.

Checks: the server recovers and accepts connections; ``pg_amcheck --all`` passes (when the
program is installed and the drill does not turn it off); every table the drill names exists
and holds at least its minimum of rows (without names: every user table is counted). The
server is stopped and the scratch directory removed whatever happens.

*RTO* is the time from the start of the restore until the server accepts connections; *RPO*
the age of the newest point restored (the end of the reachable archived WAL, or the dump's
time). PostgreSQL refuses to run as root: then the server and its ``restore_command`` run as
the drill's ``run_as`` user (default ``postgres``) through ``runuser``, the restored files are
handed to that user, and that user must be able to read the repository (as its
``archive_command`` already must write it).
"""

from __future__ import annotations

import os
import pwd
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from keepwell.control.jobs import JobContext, JobOutcome, JobSpec, open_job_repository
from keepwell.control.secrets import resolve
from keepwell.errors import ConfigurationError, IntegrityError, SourceError

_READY = "database system is ready to accept connections"
_FATAL_RE = re.compile(r"(?:FATAL|PANIC):\s+(.*)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_user(drill: dict[str, Any]) -> str | None:
    """The OS user temporary servers run as: the drill's ``run_as``; as root by default
    ``postgres``; otherwise keepwell's own user (None)."""
    user = drill.get("run_as")
    if user is None and os.geteuid() == 0:
        user = "postgres"
    if user is None:
        return None
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise ConfigurationError(f"drill run_as user {user!r} does not exist on this host",
                                 hint="set the drill's run_as to an existing unprivileged user"
                                 ) from None
    if user == "root" or pwd.getpwnam(user).pw_uid == 0:
        raise ConfigurationError("PostgreSQL refuses to run as root: the drill's run_as must "
                                 "be an unprivileged user")
    if os.geteuid() != 0 and pwd.getpwnam(user).pw_uid != os.geteuid():
        raise ConfigurationError(f"drill run_as {user!r} needs keepwell to run as root",
                                 hint="leave run_as unset to run as keepwell's own user")
    return user


def as_user(user: str | None, argv: list[str]) -> list[str]:
    if user is None or pwd.getpwnam(user).pw_uid == os.geteuid():
        return argv
    return ["runuser", "-u", user, "--", *argv]


def hand_over(path: str, user: str | None) -> None:
    """Give a restored tree to the server's user (only needed when keepwell runs as root)."""
    if user is None or os.geteuid() != 0:
        return
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    for root, dirs, files in os.walk(path):
        for n in (*dirs, *files):
            os.lchown(os.path.join(root, n), pw.pw_uid, pw.pw_gid)


def check_reachable(path: str, user: str | None) -> None:
    """The server's user must reach scratch space; say so plainly if it cannot."""
    if user is None or os.geteuid() != 0:
        return
    res = subprocess.run(as_user(user, ["test", "-w", path, "-a", "-x", path]),
                         capture_output=True)
    if res.returncode != 0:
        raise ConfigurationError(f"user {user} cannot enter the drill's scratch directory {path}",
                                 hint="set 'scratch' to a directory whose parents that user can "
                                      "traverse (e.g. /var/tmp/keepwell-drills)")


@dataclass
class TempServer:
    """A PostgreSQL server on a data directory in scratch space, reachable on a socket only."""

    datadir: str
    sockdir: str
    port: int
    user: str | None
    bindir: str
    log: str
    started: bool = False

    def _run(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(as_user(self.user, argv), capture_output=True, text=True,
                              timeout=timeout)

    def start(self, ctx: JobContext, timeout: float, *, recovery: bool) -> None:
        hba = os.path.join(os.path.dirname(self.datadir), "drill_hba.conf")
        with open(hba, "w", encoding="utf-8") as f:
            f.write("local all all trust\n")
        conf = os.path.join(self.datadir, "postgresql.conf")
        if not os.path.exists(conf):  # layouts that keep it outside the data directory
            open(conf, "w").close()
        os.makedirs(self.sockdir, 0o700, exist_ok=True)
        for p in (hba, conf, self.sockdir):
            hand_over(p, self.user)
        from keepwell.sources.postgres.restore import safe_start_options

        opts = (f"{safe_start_options(self.datadir, self.port)} -c listen_addresses=''"
                f" -c unix_socket_directories='{self.sockdir}' -c hba_file='{hba}'"
                " -c archive_mode=off")
        res = self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir, "-l",
                         self.log, "-o", opts, "-W", "start"])
        if res.returncode != 0:
            raise SourceError(f"the drill's server did not start: "
                              f"{(res.stderr or res.stdout).strip().splitlines()[-1:]}")
        self.started = True
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            ready = _READY in text and (not recovery or "selected new timeline ID" in text
                                        or "archive recovery complete" in text)
            if ready and self._accepts():
                return
            fatal = _FATAL_RE.findall(text)
            if fatal and not self.running():
                raise SourceError(f"the restored server did not start: {fatal[-1]}")
            if time.monotonic() > deadline:
                raise SourceError(f"the restored server did not finish recovery within "
                                  f"{timeout:.0f} s (log: {fatal[-1] if fatal else 'no error'})")
            ctx.check()
            time.sleep(0.2)

    def _accepts(self) -> bool:
        res = subprocess.run([os.path.join(self.bindir, "pg_isready"), "-h", self.sockdir, "-p",
                              str(self.port), "-t", "2"], capture_output=True)
        return res.returncode == 0

    def running(self) -> bool:
        return self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir,
                          "status"]).returncode == 0

    def stop(self) -> None:
        if not self.started:
            return
        res = self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir, "-m", "fast",
                         "-w", "-t", "60", "stop"], timeout=90)
        if res.returncode != 0 and self.running():
            self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir, "-m",
                       "immediate", "-w", "stop"])
        self.started = False

    def log_text(self) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def conninfo(self, user: str, dbname: str = "postgres") -> str:
        return f"host={self.sockdir} port={self.port} user={user} dbname={dbname}"


def _superuser(server: TempServer, candidates: list[str | None]) -> str:
    """A role that exists in the restored cluster (trust on the socket: no password)."""
    import psycopg

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


def _parse_table(name: str, default_db: str) -> tuple[str, str, str]:
    parts = name.split(".")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return default_db, parts[0], parts[1]
    return default_db, "public", parts[0]


def count_rows(server: TempServer, user: str, wanted: dict[str, int],
               default_db: str) -> dict[str, int]:
    """Rows per table (``db.schema.table``): the named ones, or every user table."""
    import psycopg
    from psycopg import sql

    counts: dict[str, int] = {}
    with psycopg.connect(server.conninfo(user), autocommit=True) as conn:
        dbs = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate"
            " ORDER BY 1").fetchall()]
    targets: dict[str, list[tuple[str, str]]] = {}
    if wanted:
        for name in wanted:
            db, schema, table = _parse_table(name, default_db)
            if db not in dbs:
                raise IntegrityError(f"drill: database {db} is missing from the restore "
                                     f"(for table {name})")
            targets.setdefault(db, []).append((schema, table))
    for db in dbs:
        with psycopg.connect(server.conninfo(user, db), autocommit=True) as conn:
            tables = targets.get(db) if wanted else [
                (r[0], r[1]) for r in conn.execute(
                    "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n"
                    " ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p')"
                    " AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
                    " AND n.nspname NOT LIKE 'pg_toast%%' ORDER BY 1, 2").fetchall()]
            for schema, table in tables or []:
                key = f"{db}.{schema}.{table}"
                try:
                    row = conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(
                        sql.Identifier(schema), sql.Identifier(table))).fetchone()
                except psycopg.errors.UndefinedTable:
                    raise IntegrityError(f"drill: table {key} is missing from the restore"
                                         ) from None
                except psycopg.Error as exc:
                    raise IntegrityError(f"drill: reading {key} failed: "
                                         f"{str(exc).strip().splitlines()[0]}") from None
                counts[key] = int(row[0]) if row else 0
    for name, minimum in wanted.items():
        db, schema, table = _parse_table(name, default_db)
        have = counts.get(f"{db}.{schema}.{table}", 0)
        if have < minimum:
            raise IntegrityError(f"drill: table {db}.{schema}.{table} holds {have} rows, "
                                 f"fewer than the {minimum} the drill expects")
    return counts


def run_amcheck(server: TempServer, user: str) -> str:
    """``pg_amcheck --all`` against the temporary server; 'ok', or 'unavailable'."""
    exe = os.path.join(server.bindir, "pg_amcheck")
    if not os.access(exe, os.X_OK):
        return "unavailable"
    res = subprocess.run([exe, "-h", server.sockdir, "-p", str(server.port), "-U", user,
                          "--all", "--install-missing", "--no-strict-names"],
                         capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        lines = (res.stdout + res.stderr).strip().splitlines()
        raise IntegrityError("drill: pg_amcheck found corruption: "
                             + (lines[0] if lines else f"exit {res.returncode}"))
    return "ok"


@contextmanager
def _server(server: TempServer) -> Iterator[TempServer]:
    try:
        yield server
    finally:
        with suppress(Exception):
            server.stop()


def drill_postgres(spec: JobSpec, ctx: JobContext, scratch: str) -> JobOutcome:
    from keepwell.sources.postgres.catalog import Catalog
    from keepwell.sources.postgres.tools import find_program

    src = spec.params["source"]
    drill = spec.params.get("drill") or {}
    cluster = src.get("cluster") or "main"
    user = server_user(drill)
    hand_over(scratch, user)
    check_reachable(scratch, user)
    repo = open_job_repository(spec, ctx)
    try:
        cat = Catalog.build(repo.list_snapshots(), cluster)
        physical = src.get("mode") == "physical"
        if physical and not cat.complete_backups():
            raise SourceError(f"no complete physical backup of cluster {cluster} to drill"
                              f" for {spec.source}")
        if not physical and not cat.logical:
            raise SourceError(f"no logical backup of cluster {cluster} to drill for "
                              f"{spec.source}")
        if physical:
            backup = sorted(cat.complete_backups(), key=lambda b: b.stop_lsn)[-1]
            major = int(backup.version.split(".")[0]) if backup.version else None
        else:
            snap = repo.find_snapshot(cat.logical[-1].snapshot_id)
            major = _major_of(snap)
        bindir = os.path.dirname(find_program("pg_ctl", major))
        server = TempServer(os.path.join(scratch, "data"), os.path.join(scratch, "sock"),
                            free_port(), user, bindir, os.path.join(scratch, "server.log"))
        timeout = float(drill.get("start_timeout") or 600.0)
        conn_user = (src.get("connection") or {}).get("user")
        t0 = time.monotonic()
        with _server(server):
            if physical:
                restored, point = _restore_physical(repo, spec, cluster, backup, server, ctx,
                                                    timeout, cat)
            else:
                restored, point = _restore_logical(repo, spec, cluster, snap, server, ctx,
                                                   timeout)
            rto = time.monotonic() - t0
            su = _superuser(server, [conn_user, user, _me(), "postgres"])
            ctx.check()
            amcheck = run_amcheck(server, su) if drill.get("amcheck", True) else "off"
            ctx.check()
            counts = count_rows(server, su, dict(drill.get("tables") or {}),
                                (src.get("connection") or {}).get("database") or "postgres")
        return JobOutcome(
            "succeeded", snapshot_id=restored, rto=round(rto, 3),
            rpo=round(max(0.0, time.time() - point), 3),
            details={"mode": "physical" if physical else "logical", "amcheck": amcheck,
                     "tables": len(counts), "rows": sum(counts.values()),
                     "row_counts": dict(list(counts.items())[:200]),
                     "server_user": user or _me()})
    finally:
        repo.close()


def _me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def _major_of(snap: Any) -> int | None:
    version = str((snap.source or {}).get("version") or (snap.source or {}).get(
        "server_version") or "")
    m = re.match(r"(\d+)", version)
    return int(m.group(1)) if m else None


def _restore_physical(repo: Any, spec: JobSpec, cluster: str, backup: Any, server: TempServer,
                      ctx: JobContext, timeout: float, cat: Any) -> tuple[str, float]:
    from keepwell.sources.postgres.plan import Target
    from keepwell.sources.postgres.restore import (
        RestoreOptions,
        check_reached_end,
        restore_physical,
    )

    repo_cfg = spec.params["repository"]
    location = repo_cfg["location"]
    opts = RestoreOptions(
        target_dir=server.datadir, target=Target(), snapshot=backup.snapshot_id,
        repo_location=os.path.abspath(location) if "://" not in location else location,
        password=resolve(repo_cfg["password"], what=f"repository {spec.repository} password"),
    )
    result = restore_physical(repo, cluster, opts)
    ctx.check()
    hand_over(server.datadir, server.user)
    server.start(ctx, timeout, recovery=True)
    check_reached_end(result.plan, server.log_text())  # a drill that stopped short failed
    reach = cat.reach(result.plan.backup)
    end = reach.end_time or backup.stop_time or backup.time
    return backup.snapshot_id, float(end.timestamp())


def _restore_logical(repo: Any, spec: JobSpec, cluster: str, snap: Any, server: TempServer,
                     ctx: JobContext, timeout: float) -> tuple[str, float]:
    from keepwell.sources.postgres.connection import ConnSpec
    from keepwell.sources.postgres.logicalrestore import LogicalRequest, restore_logical

    os.makedirs(server.datadir, 0o700)
    hand_over(server.datadir, server.user)
    su = "postgres"
    res = subprocess.run(as_user(server.user, [
        os.path.join(server.bindir, "initdb"), "-D", server.datadir, "-A", "trust", "-U", su,
        "--no-sync", "-E", "UTF8", "--locale=C"]), capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise SourceError(f"initdb for the drill failed: {res.stderr.strip()[-300:]}")
    server.start(ctx, timeout, recovery=False)
    source = snap.source or {}
    spec_conn = ConnSpec(server.conninfo(su))
    if source.get("globals"):
        restore_logical(repo, spec_conn, cluster, LogicalRequest(restore_globals=True),
                        snapshot=snap.id)
    for db in source.get("databases") or []:
        ctx.check()
        restore_logical(repo, spec_conn, cluster,
                        LogicalRequest(databases=[db], create=db != "postgres"),
                        snapshot=snap.id)
    return snap.id, float(snap.time.timestamp())

