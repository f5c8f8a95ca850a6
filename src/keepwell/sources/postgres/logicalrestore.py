"""Restoring logical backups into a running server: globals, whole databases, tables.

`restore_logical` restores from one dump snapshot (the newest holding every database asked for,
unless one is named): the globals (roles and tablespaces, ``psql`` of ``globals.sql``), then each
database asked for (``--database`` repeated, or all of them), streamed from the repository into
``pg_restore``. Tables (``--table``, repeated) are restored completely (`tablepick`): their
dump's table of contents and definitions are read first (``pg_restore -l`` and ``-s``, which stop
after the table of contents), and ``pg_restore -L`` restores exactly the chosen entries. A name
that matches nothing is an error, never an empty success.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from keepwell.errors import UsageError
from keepwell.sources.postgres import KIND_LOGICAL
from keepwell.sources.postgres.catalog import Catalog
from keepwell.sources.postgres.connection import ConnSpec, connect, server_facts
from keepwell.sources.postgres.errors import RestoreIntoError, ToolError
from keepwell.sources.postgres.logical import GLOBALS_PATH, dump_path
from keepwell.sources.postgres.tablepick import (
    Selection,
    Target,
    parse_definitions,
    parse_list,
    select_tables,
)
from keepwell.sources.postgres.tools import find_program, pg_tool
from keepwell.sources.tools import ToolProcess, run_program


@dataclass(frozen=True)
class LogicalRequest:
    """What to restore: `databases` (empty with `all_databases`: every one), the globals, and
    within a single database only some schemas or tables."""

    databases: list[str] = field(default_factory=list)
    all_databases: bool = False
    restore_globals: bool = False
    into: str | None = None
    schemas: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    create: bool = False
    clean: bool = False


def find_logical(repo: Any, cluster: str, ref: str, databases: list[str]) -> Any:
    """The logical snapshot `ref` of `cluster`; 'latest': the newest holding all `databases`."""
    if ref != "latest":
        snap = repo.find_snapshot(ref, kind=KIND_LOGICAL)
        if (snap.source or {}).get("cluster") != cluster:
            raise UsageError(f"snapshot {snap.short_id} is not a backup of cluster {cluster}")
        return snap
    cat = Catalog.build(repo.list_snapshots(KIND_LOGICAL), cluster)
    for lb in reversed(cat.logical):
        if all(d in lb.databases for d in databases):
            return repo.find_snapshot(lb.snapshot_id)
    what = f" of database {', '.join(databases)}" if databases else ""
    raise UsageError(f"no logical backup{what} of cluster {cluster} in the repository",
                     hint="list the backups with 'keepwell postgres info'")


def _check_request(req: LogicalRequest) -> None:
    if req.all_databases and req.databases:
        raise UsageError("give --all or --database, not both")
    if not (req.databases or req.all_databases or req.restore_globals):
        raise UsageError("name the databases to restore (--database, repeat), or --all")
    many = req.all_databases or len(req.databases) > 1
    if many and (req.into or req.tables or req.schemas):
        raise UsageError("--into, --schema and --table apply to one database",
                         hint="restore the databases one at a time for those")


def restore_logical(repo: Any, spec: ConnSpec, cluster: str, req: LogicalRequest, *,
                    snapshot: str = "latest") -> dict[str, Any]:
    """Restore what `req` asks for from one dump snapshot into the server at `spec`."""
    _check_request(req)
    snap = find_logical(repo, cluster, snapshot, req.databases)
    src = snap.source or {}
    held = list(src.get("databases", []))
    missing = [d for d in req.databases if d not in held]
    if missing:
        raise UsageError(f"snapshot {snap.short_id} holds no database {missing[0]!r}",
                         hint=f"it holds {', '.join(held)}")
    with_globals = req.restore_globals or (req.all_databases and bool(src.get("globals")))
    done: dict[str, Any] = {"snapshot": snap.short_id, "globals": False, "databases": []}
    with connect(spec) as conn:
        major = server_facts(conn).major
    if with_globals:
        if not src.get("globals"):
            raise UsageError(f"snapshot {snap.short_id} holds no globals")
        data = b"".join(repo.iter_file(snap, GLOBALS_PATH))
        run_program([find_program("psql", major), *spec.dbname_arg(), "-q", "-v",
                     "ON_ERROR_STOP=0", "-f", "-"], "restore of globals", input_data=data,
                    error=ToolError)
        done["globals"] = True
    pg_restore = find_program("pg_restore", major)
    for db in held if req.all_databases else dict.fromkeys(req.databases):
        done["databases"].append(_restore_database(repo, snap, spec, db, req, pg_restore,
                                                   create=req.create or req.all_databases))
    return done


def _restore_database(repo: Any, snap: Any, spec: ConnSpec, database: str,
                      req: LogicalRequest, pg_restore: str, *, create: bool) -> dict[str, Any]:
    target_db = req.into or database
    if create:
        with connect(spec) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                  (target_db,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target_db)))
    target_spec = spec.with_dbname(target_db)
    argv = [pg_restore, *target_spec.dbname_arg(), "--no-owner", "--exit-on-error"]
    if req.clean:
        argv += ["--clean", "--if-exists"]
    result: dict[str, Any] = {"database": database, "into": target_db}
    listing = None
    if req.tables:
        selection = _select(repo, snap, database, pg_restore, req, target_spec)
        listing = "".join(e.line + "\n" for e in selection.entries)
        result.update(tables=[f"{s}.{t}" for s, t in selection.tables],
                      restored=selection.restored, skipped=selection.skipped)
    else:
        if req.schemas:
            _check_schemas(repo, snap, database, pg_restore, req.schemas)
        for schema in req.schemas:
            argv += ["-n", schema]
        result["schemas"] = list(req.schemas)
    _stream_into(repo, snap, database, argv, listing, f"restore of database {database} into"
                 f" {target_db}")
    return result


def _check_schemas(repo: Any, snap: Any, database: str, pg_restore: str,
                   schemas: list[str]) -> None:
    """Every schema named is in the dump (``pg_restore -n`` of one that is not restores
    nothing, and says nothing)."""
    toc = parse_list(_head_output(repo, snap, database, [pg_restore, "-l"]))
    held = {e.tag for e in toc if e.type == "SCHEMA"} | {e.schema for e in toc
                                                          if e.schema != "-"}
    missing = [s for s in schemas if s not in held]
    if missing:
        raise UsageError(f"the dump of database {database} holds no schema {missing[0]}",
                         hint=f"it holds {', '.join(sorted(held)) or 'none'}")


def _select(repo: Any, snap: Any, database: str, pg_restore: str, req: LogicalRequest,
            spec: ConnSpec) -> Selection:
    toc = parse_list(_head_output(repo, snap, database, [pg_restore, "-l"]))
    defs = parse_definitions(_head_output(repo, snap, database, [pg_restore, "-s", "-f", "-"]))
    with connect(spec) as conn:
        target = Target(
            relations={(str(s), str(n)) for s, n in conn.execute(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n"
                " ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p', 'S', 'v', 'm', 'f')")},
            schemas={str(r[0]) for r in conn.execute("SELECT nspname FROM pg_namespace")},
            functions={(str(s), str(n)) for s, n in conn.execute(
                "SELECT n.nspname, p.proname FROM pg_proc p JOIN pg_namespace n"
                " ON n.oid = p.pronamespace")})
    return select_tables(toc, defs, req.tables, req.schemas, target)


def _feed(proc: ToolProcess, repo: Any, snap: Any, database: str) -> None:
    """Stream the dump into the program until it has read what it wants."""
    try:
        for block in repo.iter_file(snap, dump_path(database)):
            proc.stdin.write(block)
        proc.stdin.close()
    except BrokenPipeError:
        pass


def _head_output(repo: Any, snap: Any, database: str, argv: list[str]) -> str:
    """What `argv` prints reading the dump of `database` (it stops after the table of
    contents, so the rest of the dump is not read)."""
    out: list[bytes] = []
    with pg_tool(argv, stdin=-1, stdout=-1) as proc:
        reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
        reader.start()
        _feed(proc, repo, snap, database)
        reader.join()
        proc.check(f"reading the dump of database {database}")
    return b"".join(out).decode("utf-8", "replace")


def _stream_into(repo: Any, snap: Any, database: str, argv: list[str], listing: str | None,
                 what: str) -> None:
    list_file = None
    if listing is not None:
        fd, list_file = tempfile.mkstemp(prefix="keepwell-restore-", suffix=".list")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(listing)
        argv = [*argv, "-L", list_file]
    try:
        with ToolProcess(argv, error=RestoreIntoError, stdin=-1, stdout=-3) as proc:
            _feed(proc, repo, snap, database)
            proc.check(what)
    finally:
        if list_file:
            os.unlink(list_file)
