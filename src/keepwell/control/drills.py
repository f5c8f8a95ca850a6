"""Restore drills: prove that the newest snapshot of a source restores and is sound.

A drill restores the newest snapshot of a source into scratch space (a temporary directory under
``scratch``, removed afterwards), checks it, and reports:

* RTO: the seconds the restore took;
* RPO: the age of the newest restorable point (now minus the snapshot's time).

Checks per kind: files compare every restored file's size with the snapshot's tree and hash its
content (every blob is also verified against its keyed id while it is read); SQLite runs
``PRAGMA integrity_check`` on the restored database; PostgreSQL and MySQL run the source's
``drill_command`` (with the same environment as its backups) when one is configured. A drill
with ``max_rpo`` also fails when the newest point is older than that.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import tempfile
import time
from typing import Any

from keepwell.control.jobs import JobContext, JobOutcome, JobSpec, open_job_repository
from keepwell.control.kinds import database_env, newest_snapshot, run_child
from keepwell.errors import IntegrityError, SourceError


def _scratch(spec: JobSpec) -> str:
    root = spec.params.get("scratch") or tempfile.gettempdir()
    os.makedirs(root, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"drill-{spec.source}-", dir=root)


def _check_rpo(spec: JobSpec, outcome: JobOutcome) -> None:
    max_rpo = spec.params.get("max_rpo")
    if max_rpo and outcome.rpo is not None and outcome.rpo > max_rpo:
        raise SourceError(f"newest restorable point of {spec.source} is {outcome.rpo:.0f}s old,"
                          f" over the drill's max_rpo of {max_rpo:.0f}s")


def _hash_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _snapshot_time(snap: Any) -> float:
    return float(snap.time.timestamp())


def drill_files(spec: JobSpec, ctx: JobContext) -> JobOutcome:
    from keepwell.repository.tree import FILE
    from keepwell.sources.files import restore_snapshot

    repo = open_job_repository(spec, ctx)
    scratch = _scratch(spec)
    try:
        snap = newest_snapshot(repo, spec.source)
        t0 = time.monotonic()
        result = restore_snapshot(repo, snap, scratch)
        rto = time.monotonic() - t0
        if result.errors:
            path, msg = result.errors[0]
            raise IntegrityError(f"restore of snapshot {snap.short_id} failed for "
                                 f"{len(result.errors)} item(s); first: {path}: {msg}")
        ctx.check()
        expected: dict[str, int] = {}
        for path, node in repo.walk(snap):
            if node.type == FILE:
                expected[path] = int(node.size)
        manifest = hashlib.sha256()
        checked = 0
        for path in sorted(expected):
            local = _restored_path(scratch, path)
            if local is None:
                raise IntegrityError(f"drill: {path} is missing from the restore of "
                                     f"{snap.short_id}")
            size = os.path.getsize(local)
            if size != expected[path]:
                raise IntegrityError(f"drill: {path} restored with {size} bytes, the snapshot "
                                     f"says {expected[path]}")
            manifest.update(path.encode() + b"\0" + _hash_file(local).encode() + b"\n")
            checked += 1
        outcome = JobOutcome("succeeded", snapshot_id=snap.id, rto=round(rto, 3),
                             rpo=round(time.time() - _snapshot_time(snap), 3),
                             bytes_read=result.bytes,
                             details={"files": checked, "manifest_sha256": manifest.hexdigest()})
        _check_rpo(spec, outcome)
        return outcome
    finally:
        repo.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _restored_path(scratch: str, path: str) -> str | None:
    """Where ``path`` of the snapshot landed (restores keep the absolute path under target)."""
    for candidate in (os.path.join(scratch, path), os.path.join(scratch, path.lstrip("/"))):
        if os.path.isfile(candidate):
            return candidate
    return None


def drill_sqlite(spec: JobSpec, ctx: JobContext) -> JobOutcome:
    try:
        from keepwell.sources.sqlite import restore_database
    except ImportError:
        raise SourceError("the sqlite source is not installed in this keepwell") from None
    repo = open_job_repository(spec, ctx)
    scratch = _scratch(spec)
    try:
        snap = newest_snapshot(repo, spec.source)
        target = os.path.join(scratch, "restored.db")
        t0 = time.monotonic()
        restore_database(repo, snap, target)
        rto = time.monotonic() - t0
        db = sqlite3.connect(target)
        try:
            rows = [r[0] for r in db.execute("PRAGMA integrity_check").fetchall()]
            tables = db.execute(
                "SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise IntegrityError(f"drill: restored database of {spec.source} is unreadable: "
                                 f"{exc}") from None
        finally:
            db.close()
        if rows != ["ok"]:
            raise IntegrityError(f"drill: integrity_check of {spec.source} failed: {rows[:3]}")
        outcome = JobOutcome("succeeded", snapshot_id=snap.id, rto=round(rto, 3),
                             rpo=round(time.time() - _snapshot_time(snap), 3),
                             details={"tables": tables, "integrity_check": "ok"})
        _check_rpo(spec, outcome)
        return outcome
    finally:
        repo.close()
        shutil.rmtree(scratch, ignore_errors=True)


def drill_database(spec: JobSpec, ctx: JobContext) -> JobOutcome:
    src = spec.params["source"]
    argv = src.get("drill_command")
    if not argv:
        raise SourceError(f"no restore drill for {spec.kind} source {spec.source}: set its "
                          "drill_command")
    repo = open_job_repository(spec, ctx)
    try:
        snap = newest_snapshot(repo, spec.source)
    finally:
        repo.close()
    env = database_env(spec)
    env["KEEPWELL_DRILL_SNAPSHOT"] = snap.id
    env["KEEPWELL_DRILL_SCRATCH"] = scratch = _scratch(spec)
    try:
        t0 = time.monotonic()
        run_child(list(argv), env, ctx, f"drill of {spec.source}")
        rto = time.monotonic() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    outcome = JobOutcome("succeeded", snapshot_id=snap.id, rto=round(rto, 3),
                         rpo=round(time.time() - _snapshot_time(snap), 3))
    _check_rpo(spec, outcome)
    return outcome
