"""Named restore points: made on the server, remembered in the repository with their position.

``pg_create_restore_point(NAME)`` writes a record into the WAL that recovery can stop at
(``recovery_target_name``). Only the WAL knows where it is, so to pick the right base backup
for a restore by name (the newest one consistent before the point) keepwell records every point
it creates itself: a snapshot of kind ``postgres-restore-point`` with no files whose ``source``
holds the cluster, its system identifier, the name, the LSN of the point, its time and
timeline. Points made with plain SQL are unknown to keepwell; a restore to one uses the newest
backup and says so (see `plan.choose`).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from keepwell.errors import UsageError
from keepwell.sources.postgres import KIND_RESTORE_POINT
from keepwell.sources.postgres.archive import WalArchive
from keepwell.sources.postgres.connection import ConnSpec, connect, server_facts
from keepwell.sources.postgres.errors import PostgresError
from keepwell.sources.postgres.walnames import Lsn

MAX_NAME = 63  # MAXFNAMELEN - 1: the longest name the server accepts


@dataclass(frozen=True)
class RestorePointResult:
    snapshot_id: str
    name: str
    lsn: Lsn
    time: datetime
    timeline: int

    def as_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot_id, "name": self.name, "lsn": str(self.lsn),
                "time": self.time.isoformat(), "timeline": self.timeline}


def create_restore_point(repo: Any, spec: ConnSpec, cluster: str, name: str,
                         host: str | None = None) -> RestorePointResult:
    """Create restore point `name` on the server at `spec` and record it in `repo`."""
    if not name or len(name.encode()) > MAX_NAME:
        raise UsageError(f"invalid restore point name {name!r}: 1 to {MAX_NAME} bytes")
    archive = WalArchive(repo, cluster, host)
    with connect(spec) as conn:
        facts = server_facts(conn)
        if facts.in_recovery:
            raise PostgresError(
                f"{spec.describe()} is in recovery: restore points can only be created on the"
                " primary", hint="pass --db-url of the primary")
        archive.check_identity(facts.system_identifier, "this server")
        try:
            row = conn.execute(
                "SELECT pg_create_restore_point(%s)::text, clock_timestamp(),"
                " pg_walfile_name(pg_current_wal_lsn())", (name,),
            ).fetchone()
        except psycopg.Error as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PostgresError(f"cannot create restore point {name!r}: {text}") from None
    assert row is not None
    lsn, when, walfile = Lsn.parse(str(row[0])), row[1], str(row[2])
    timeline = int(walfile[:8], 16)
    source = {"cluster": cluster, "system_identifier": str(facts.system_identifier),
              "segment_size": facts.segment_size, "name": name, "lsn": str(lsn),
              "time": when.isoformat(), "timeline": timeline}
    with repo.new_snapshot(KIND_RESTORE_POINT, [], host=host or socket.gethostname(),
                           source=source) as w:
        snap = w.commit(time_=when)
    return RestorePointResult(str(snap.id), name, lsn, when, timeline)
