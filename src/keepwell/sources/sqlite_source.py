"""SQLite databases behind the `Source` interface (`keepwell.sources.base`).

Backup: the configured ``path`` through SQLite's online backup (`keepwell.sources.sqlite`).
Restore: the newest snapshot of the source into scratch space, checked by the restore itself
(``PRAGMA quick_check`` before it is put in place, ``integrity_check`` after). Verify: ``PRAGMA
integrity_check`` again on the copy, and the rows of every table counted (`rowcount`: the tables
the drill names must be there with their minimums).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from keepwell.errors import IntegrityError
from keepwell.repository import Repository
from keepwell.sources.base import (
    BackupReport,
    JobControl,
    RestoredCopy,
    Source,
    SourceJob,
    newest_snapshot,
)
from keepwell.sources.rowcount import count_rows, figures
from keepwell.sources.sqlite import backup_database, restore_database


class SqliteTables:
    """The tables of an SQLite database (`rowcount.TableReader`)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def tables(self) -> list[str]:
        return [str(r[0]) for r in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
            " ORDER BY name").fetchall()]

    def count(self, table: str) -> int:
        quoted = '"' + table.replace('"', '""') + '"'
        return int(self.db.execute(f"SELECT count(*) FROM {quoted}").fetchone()[0])


class SqliteSource(Source[RestoredCopy]):
    kind = "sqlite"

    def backup(self, job: SourceJob, repo: Repository, ctl: JobControl) -> BackupReport:
        return BackupReport(backup_database(repo, job.settings["path"], tags=job.tags).snapshot)

    def backup_phase(self, job: SourceJob) -> str:
        return "copy database"

    def describe(self, job: SourceJob) -> str:
        return f"SQLite database {job.settings['path']}"

    @contextmanager
    def restore(self, job: SourceJob, repo: Repository, ctl: JobControl,
                scratch: str) -> Iterator[RestoredCopy]:
        snap = newest_snapshot(repo, job)
        target = os.path.join(scratch, "restored.db")
        restored = restore_database(repo, snap, target)
        yield RestoredCopy(snap.id, snap.time.timestamp(), target, bytes=restored.size)

    def verify(self, job: SourceJob, repo: Repository, copy: RestoredCopy,
               ctl: JobControl) -> dict[str, Any]:
        db = sqlite3.connect(copy.path)
        try:
            found = [str(r[0]) for r in db.execute("PRAGMA integrity_check").fetchall()]
            if found != ["ok"]:
                raise IntegrityError(f"drill: integrity_check of {job.name} failed: {found[:3]}")
            counts = count_rows(SqliteTables(db), job.drill.get("tables") or {}, every=True)
        except sqlite3.DatabaseError as exc:
            raise IntegrityError(f"drill: restored database of {job.name} is unreadable: "
                                 f"{exc}") from None
        finally:
            db.close()
        return {"integrity_check": "ok", **figures(counts)}
