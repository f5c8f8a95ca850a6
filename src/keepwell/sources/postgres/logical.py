"""Logical backups: ``pg_dump`` per database and ``pg_dumpall --globals-only``, streamed.

Dumps are custom-format archives written *uncompressed* (``-Fc -Z0``) straight into a snapshot
(``databases/<name>.dump``, ``globals.sql``): the repository compresses them, and a daily dump of
a mostly unchanged database shares most of its chunks with the day before. A restore streams a
dump from the repository into ``pg_restore`` against a running server: a whole database, one
schema or one table.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from keepwell.errors import UsageError
from keepwell.sources.postgres import KIND_LOGICAL
from keepwell.sources.postgres.archive import WalArchive
from keepwell.sources.postgres.catalog import Catalog
from keepwell.sources.postgres.connection import ConnSpec, connect, server_facts
from keepwell.sources.postgres.tools import ToolProcess, find_program, run_program

GLOBALS_PATH = "globals.sql"


def dump_path(database: str) -> str:
    return f"databases/{database}.dump"


@dataclass(frozen=True)
class LogicalResult:
    snapshot_id: str
    short_id: str
    databases: list[str]
    globals_included: bool
    bytes: int
    seconds: float


def list_databases(conn: Any) -> list[str]:
    rows = conn.execute(
        "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1"
    ).fetchall()
    return [str(r[0]) for r in rows]


def backup_logical(
    repo: Any,
    spec: ConnSpec,
    cluster: str,
    *,
    databases: list[str] | None = None,
    include_globals: bool | None = None,
    tags: tuple[str, ...] = (),
    host: str | None = None,
) -> LogicalResult:
    """Dump `databases` (all when None, with globals unless told otherwise) into one snapshot."""
    began = time.monotonic()
    with connect(spec) as conn:
        facts = server_facts(conn)
        WalArchive(repo, cluster).check_identity(facts.system_identifier, "this server")
        existing = list_databases(conn)
    chosen = list(databases) if databases else existing
    unknown = [d for d in chosen if d not in existing]
    if unknown:
        raise UsageError(f"no database {unknown[0]!r} on {spec.describe()}",
                         hint=f"databases there: {', '.join(existing)}")
    with_globals = include_globals if include_globals is not None else not databases
    pg_dump = find_program("pg_dump", facts.major)
    source: dict[str, Any] = {"cluster": cluster, **facts.as_source(), "databases": chosen,
                              "globals": with_globals,
                              "start_time": datetime.now(UTC).isoformat()}
    paths = [dump_path(d) for d in chosen] + ([GLOBALS_PATH] if with_globals else [])
    total = 0
    with repo.new_snapshot(KIND_LOGICAL, paths, host=host or socket.gethostname(), tags=tags,
                           source=source) as w:
        for db in chosen:
            argv = [pg_dump, *spec.with_dbname(db).dbname_arg(), "-Fc", "-Z0"]
            with ToolProcess(argv) as proc:
                total += w.add_stream(dump_path(db), proc.stdout, mode=0o600)
                proc.check(f"dump of database {db}")
        if with_globals:
            pg_dumpall = find_program("pg_dumpall", facts.major)
            with ToolProcess([pg_dumpall, *spec.dbname_arg(), "--globals-only"]) as proc:
                total += w.add_stream(GLOBALS_PATH, proc.stdout, mode=0o600)
                proc.check("dump of globals (roles, tablespaces)")
        w.source["stop_time"] = datetime.now(UTC).isoformat()
        snap = w.commit()
    return LogicalResult(str(snap.id), str(snap.short_id), chosen, with_globals, total,
                         time.monotonic() - began)


def find_logical(repo: Any, cluster: str, ref: str, database: str | None) -> Any:
    """The logical snapshot `ref` ('latest' = newest holding `database`) of `cluster`."""
    if ref != "latest":
        snap = repo.find_snapshot(ref, kind=KIND_LOGICAL)
        if (snap.source or {}).get("cluster") != cluster:
            raise UsageError(f"snapshot {snap.short_id} is not a backup of cluster {cluster}")
        return snap
    cat = Catalog.build(repo.list_snapshots(KIND_LOGICAL), cluster)
    for lb in reversed(cat.logical):
        if database is None or database in lb.databases:
            return repo.find_snapshot(lb.snapshot_id)
    what = f" of database {database}" if database else ""
    raise UsageError(f"no logical backup{what} of cluster {cluster} in the repository",
                     hint="list the backups with 'keepwell postgres info'")


def restore_logical(
    repo: Any,
    spec: ConnSpec,
    cluster: str,
    *,
    snapshot: str = "latest",
    database: str | None = None,
    into: str | None = None,
    schema: str | None = None,
    table: str | None = None,
    create: bool = False,
    clean: bool = False,
    restore_globals: bool = False,
    jobs: int = 1,
) -> dict[str, Any]:
    """Restore one database (or one schema/table of it), or the globals, into a running server."""
    snap = find_logical(repo, cluster, snapshot, database)
    src = snap.source or {}
    dbs = list(src.get("databases", []))
    done: dict[str, Any] = {"snapshot": snap.short_id}
    with connect(spec) as conn:
        major = server_facts(conn).major
        if restore_globals:
            if not src.get("globals"):
                raise UsageError(f"snapshot {snap.short_id} holds no globals")
            psql = find_program("psql", major)
            data = b"".join(repo.iter_file(snap, GLOBALS_PATH))
            run_program([psql, *spec.dbname_arg(), "-q", "-v", "ON_ERROR_STOP=0", "-f", "-"],
                        "restore of globals", input_data=data)
            done["globals"] = True
        if database is None:
            if not restore_globals:
                raise UsageError("name the database to restore (--database)",
                                 hint=f"snapshot {snap.short_id} holds {', '.join(dbs)}")
            return done
        if database not in dbs:
            raise UsageError(f"snapshot {snap.short_id} holds no database {database!r}",
                             hint=f"it holds {', '.join(dbs)}")
        target_db = into or database
        if create:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                  (target_db,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target_db)))
    pg_restore = find_program("pg_restore", major)
    argv = [pg_restore, *spec.with_dbname(target_db).dbname_arg(), "--no-owner",
            "--exit-on-error"]
    if schema:
        argv += ["-n", schema]
    if table:
        argv += ["-t", table]
    if clean:
        argv += ["--clean", "--if-exists"]
    with ToolProcess(argv, stdin=-1, stdout=-3) as proc:
        try:
            for block in repo.iter_file(snap, dump_path(database)):
                proc.stdin.write(block)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        proc.check(f"restore of database {database} into {target_db}")
    done.update(database=database, into=target_db, schema=schema, table=table)
    return done


