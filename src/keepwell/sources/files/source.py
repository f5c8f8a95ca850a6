"""File trees behind the `Source` interface (`keepwell.sources.base`).

Backup: the configured ``paths`` (minus ``excludes``) into one snapshot, recording the job's id
so a re-run after a crash can find a snapshot that was already committed. Restore: the newest
snapshot of the source into scratch space; a file that could not be restored fails it.
Verify: every file of the snapshot's tree must be there with its recorded size, and its content
is hashed into a SHA-256 manifest (every blob was also verified against its keyed id while it
was read, so damaged storage fails the restore itself).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from keepwell.errors import IntegrityError
from keepwell.repository import Repository
from keepwell.repository.tree import FILE
from keepwell.sources.base import (
    BackupReport,
    JobControl,
    RestoredCopy,
    Source,
    SourceJob,
    newest_snapshot,
)
from keepwell.sources.files.archiver import backup_paths
from keepwell.sources.files.restorer import restore_snapshot

PROBLEMS_SHOWN = 20


class FilesSource(Source[RestoredCopy]):
    kind = "files"

    def backup(self, job: SourceJob, repo: Repository, ctl: JobControl) -> BackupReport:
        s = job.settings
        result = backup_paths(repo, list(s["paths"]), excludes=s.get("excludes") or (),
                              tags=job.tags, host=s.get("host"),
                              source={"keepwell_job": job.job_id},
                              fs_snapshot=s.get("fs_snapshot"))
        return BackupReport(result.snapshot,
                            [f"{p}: {m}" for p, m in result.errors[:PROBLEMS_SHOWN]])

    def backup_phase(self, job: SourceJob) -> str:
        return "backup files"

    def describe(self, job: SourceJob) -> str:
        excludes = job.settings.get("excludes")
        snapshot = job.settings.get("fs_snapshot")
        return (f"files {', '.join(job.settings['paths'])}"
                + (f" excluding {', '.join(excludes)}" if excludes else "")
                + (f" from a filesystem snapshot ({snapshot})" if snapshot else ""))

    @contextmanager
    def restore(self, job: SourceJob, repo: Repository, ctl: JobControl,
                scratch: str) -> Iterator[RestoredCopy]:
        snap = newest_snapshot(repo, job)
        result = restore_snapshot(repo, snap, scratch)
        if result.errors:
            path, msg = result.errors[0]
            raise IntegrityError(f"restore of snapshot {snap.short_id} failed for "
                                 f"{len(result.errors)} item(s); first: {path}: {msg}")
        yield RestoredCopy(snap.id, snap.time.timestamp(), scratch, bytes=result.bytes)

    def verify(self, job: SourceJob, repo: Repository, copy: RestoredCopy,
               ctl: JobControl) -> dict[str, Any]:
        ctl.check()
        snap = repo.load_snapshot(copy.snapshot_id)
        expected = {path: int(node.size) for path, node in repo.walk(snap) if node.type == FILE}
        manifest = hashlib.sha256()
        for path in sorted(expected):
            local = _restored_path(copy.path, path)
            if local is None:
                raise IntegrityError(f"drill: {path} is missing from the restore of "
                                     f"{snap.short_id}")
            size = os.path.getsize(local)
            if size != expected[path]:
                raise IntegrityError(f"drill: {path} restored with {size} bytes, the snapshot "
                                     f"says {expected[path]}")
            manifest.update(path.encode() + b"\0" + _hash_file(local).encode() + b"\n")
        return {"files": len(expected), "manifest_sha256": manifest.hexdigest()}


def _restored_path(scratch: str, path: str) -> str | None:
    """Where ``path`` of the snapshot landed (restores keep the absolute path under target)."""
    for candidate in (os.path.join(scratch, path), os.path.join(scratch, path.lstrip("/"))):
        if os.path.isfile(candidate):
            return candidate
    return None


def _hash_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
