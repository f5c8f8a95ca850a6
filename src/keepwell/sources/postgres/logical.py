"""Logical backups: ``pg_dump`` per database and ``pg_dumpall --globals-only``, streamed.

Dumps are custom-format archives written *uncompressed* (``-Fc -Z0``) straight into a snapshot
(``databases/<name>.dump``, ``globals.sql``): the repository compresses them, and a daily dump of
a mostly unchanged database shares most of its chunks with the day before. Restoring them is
`logicalrestore`'s work.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from keepwell.errors import UsageError
from keepwell.sources.postgres import KIND_LOGICAL
from keepwell.sources.postgres.archive import WalArchive
from keepwell.sources.postgres.connection import ConnSpec, connect, server_facts
from keepwell.sources.postgres.tools import find_program, pg_tool

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
    chosen = list(dict.fromkeys(databases)) if databases else existing  # each once
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
            with pg_tool(argv) as proc:
                total += w.add_stream(dump_path(db), proc.stdout, mode=0o600)
                proc.check(f"dump of database {db}")
        if with_globals:
            pg_dumpall = find_program("pg_dumpall", facts.major)
            with pg_tool([pg_dumpall, *spec.dbname_arg(), "--globals-only"]) as proc:
                total += w.add_stream(GLOBALS_PATH, proc.stdout, mode=0o600)
                proc.check("dump of globals (roles, tablespaces)")
        w.source["stop_time"] = datetime.now(UTC).isoformat()
        snap = w.commit()
    return LogicalResult(str(snap.id), str(snap.short_id), chosen, with_globals, total,
                         time.monotonic() - began)
