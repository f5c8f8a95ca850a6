"""The SQLite source: a consistent online copy through SQLite's backup API.

The backup API copies pages while writers keep writing (it restarts steps that a writer
disturbed), into a private temporary file that is then stored as one stream. A restore writes
the database next to its target, checks it with ``PRAGMA integrity_check``, then renames it.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from typing import Any

from keepwell.errors import SourceError, UsageError
from keepwell.repository import Repository, Snapshot
from keepwell.sources.files.archiver import BackupResult


def backup_database(repo: Repository, path: str, *, tags: list[str] | tuple[str, ...] = (),
                    host: str | None = None) -> BackupResult:
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such SQLite database")
    name = os.path.basename(path)
    with tempfile.TemporaryDirectory(prefix="kw-sqlite-") as tmp:
        copy = os.path.join(tmp, name)
        try:
            src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            dst = sqlite3.connect(copy)
            with dst:
                src.backup(dst, pages=1024)
            src.close()
            dst.close()
        except sqlite3.Error as exc:
            raise SourceError(f"{path}: SQLite backup failed: {exc}") from None
        source: dict[str, Any] = {"database": path, "size": os.path.getsize(copy)}
        with repo.new_snapshot("sqlite", [path], host=host, tags=tags, source=source) as w, \
                open(copy, "rb") as f:
            w.add_stream(name, f, mode=os.stat(path).st_mode & 0o7777)
            snap = w.commit()
    return BackupResult(snap)


def restore_database(repo: Repository, snap: Snapshot, target: str) -> None:
    name = os.path.basename(snap.paths[0])
    target = os.path.abspath(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kw-", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in repo.iter_file(snap, name):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        con = sqlite3.connect(tmp)
        try:
            result = con.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            con.close()
        if result != "ok":
            raise SourceError(f"restored database fails integrity_check: {result}")
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
