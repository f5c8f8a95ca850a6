"""Restore drills: prove that the newest snapshot of a source restores and is sound.

A drill restores the newest snapshot of a source into scratch space (a temporary directory under
``scratch``, removed afterwards), checks it, and reports:

* RTO: the seconds the restore took;
* RPO: the age of the newest restorable point (now minus the snapshot's time).

Checks per kind: files compare every restored file's size with the snapshot's tree and hash its
content (every blob is also verified against its keyed id while it is read); SQLite runs
``PRAGMA integrity_check`` on the restored database and counts the rows of every table;
PostgreSQL and MySQL restore into a temporary server and check it (`keepwell.control.pgdrill`,
`keepwell.control.mysqldrill`), or run the source's ``drill_command`` when one is configured. A
drill with ``max_rpo`` also fails when the newest point is older than that.
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
            names = [r[0] for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type='table'"
                " AND name NOT LIKE 'sqlite_%' ORDER BY name").fetchall()]
            counts = {n: int(db.execute(
                'SELECT count(*) FROM "' + n.replace('"', '""') + '"').fetchone()[0])
                for n in names}
        except sqlite3.DatabaseError as exc:
            raise IntegrityError(f"drill: restored database of {spec.source} is unreadable: "
                                 f"{exc}") from None
        finally:
            db.close()
        if rows != ["ok"]:
            raise IntegrityError(f"drill: integrity_check of {spec.source} failed: {rows[:3]}")
        wanted = dict((spec.params.get("drill") or {}).get("tables") or {})
        for name, minimum in wanted.items():
            if name not in counts:
                raise IntegrityError(f"drill: table {name} is missing from the restore of "
                                     f"{spec.source}")
            if counts[name] < minimum:
                raise IntegrityError(f"drill: table {name} holds {counts[name]} rows, fewer "
                                     f"than the {minimum} the drill expects")
        outcome = JobOutcome("succeeded", snapshot_id=snap.id, rto=round(rto, 3),
                             rpo=round(time.time() - _snapshot_time(snap), 3),
                             details={"tables": len(counts), "integrity_check": "ok",
                                      "rows": sum(counts.values()),
                                      "row_counts": dict(list(counts.items())[:200])})
        _check_rpo(spec, outcome)
        return outcome
    finally:
        repo.close()
        shutil.rmtree(scratch, ignore_errors=True)


def drill_database(spec: JobSpec, ctx: JobContext) -> JobOutcome:
    """A PostgreSQL or MySQL drill: the source's ``drill_command`` when it has one, else a
    restore into a temporary server (`keepwell.control.pgdrill`, `keepwell.control.mysqldrill`).
    """
    src = spec.params["source"]
    if src.get("drill_command"):
        return _drill_command(spec, ctx, list(src["drill_command"]))
    scratch = _scratch(spec)
    try:
        if spec.kind == "postgres":
            from keepwell.control.pgdrill import drill_postgres

            outcome = drill_postgres(spec, ctx, scratch)
        else:
            from keepwell.control.mysqldrill import drill_mysql

            outcome = drill_mysql(spec, ctx, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _check_rpo(spec, outcome)
    return outcome


def _drill_command(spec: JobSpec, ctx: JobContext, argv: list[str]) -> JobOutcome:
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
        run_child(argv, env, ctx, f"drill of {spec.source}")
        rto = time.monotonic() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    outcome = JobOutcome("succeeded", snapshot_id=snap.id, rto=round(rto, 3),
                         rpo=round(time.time() - _snapshot_time(snap), 3))
    _check_rpo(spec, outcome)
    return outcome
