"""Restore drills: prove that the newest backup of a source restores and is sound.

A drill restores the newest backup of a source into scratch space (a fresh directory under
``scratch``, removed afterwards whatever happens) through the source's own `Source.restore`,
checks the copy with its `Source.verify` (files: sizes and a hash of every file; SQLite:
``integrity_check``; PostgreSQL: a temporary server, ``pg_amcheck``; MySQL: a temporary
server, ``CHECK TABLE``; and row counts), and reports:

* RTO: the seconds from the start of the restore until the copy is usable (for a database:
  until its temporary server accepts connections);
* RPO: the age of the newest point restored (the copy's `RestoredCopy.point`).

A source with a ``drill_command`` runs that command instead of its own restore and check (with
the source's environment, plus ``KEEPWELL_DRILL_SNAPSHOT`` and ``KEEPWELL_DRILL_SCRATCH``). A
drill with ``max_rpo`` also fails when the newest point is older than that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from keepwell.control.jobs import (
    JobContext,
    JobOutcome,
    JobSpec,
    open_job_repository,
    source_job,
)
from keepwell.errors import SourceError
from keepwell.sources.base import newest_snapshot, source_for
from keepwell.sources.tools import run_tool


@contextmanager
def _scratch(spec: JobSpec) -> Iterator[str]:
    root = spec.params.get("scratch") or tempfile.gettempdir()
    os.makedirs(root, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f"drill-{spec.source}-", dir=root)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _check_rpo(spec: JobSpec, outcome: JobOutcome) -> None:
    max_rpo = spec.params.get("max_rpo")
    if max_rpo and outcome.rpo is not None and outcome.rpo > max_rpo:
        raise SourceError(f"newest restorable point of {spec.source} is {outcome.rpo:.0f}s old,"
                          f" over the drill's max_rpo of {max_rpo:.0f}s")


def run_drill(spec: JobSpec, ctx: JobContext) -> JobOutcome:
    """Restore and check the newest backup of the job's source (see the module's words)."""
    source = source_for(spec.kind)
    job = source_job(spec)
    command = job.settings.get("drill_command")
    repo = open_job_repository(spec, ctx)
    try:
        with _scratch(spec) as scratch:
            t0 = time.monotonic()
            if command:
                snap = newest_snapshot(repo, job)
                env = source.environment(job, ctx)
                env.update(KEEPWELL_DRILL_SNAPSHOT=snap.id, KEEPWELL_DRILL_SCRATCH=scratch)
                run_tool(list(command), what=f"drill of {spec.source}", env=env,
                         stop=ctx.check, new_session=True)
                outcome = JobOutcome("succeeded", snapshot_id=snap.id,
                                     rto=round(time.monotonic() - t0, 3),
                                     rpo=round(max(0.0, time.time() - snap.time.timestamp()), 3))
            else:
                with source.restore(job, repo, ctx, scratch) as copy:
                    rto = time.monotonic() - t0
                    ctx.check()
                    details = {**copy.details, **source.verify(job, repo, copy, ctx)}
                outcome = JobOutcome("succeeded", snapshot_id=copy.snapshot_id,
                                     rto=round(rto, 3),
                                     rpo=round(max(0.0, time.time() - copy.point), 3),
                                     bytes_read=copy.bytes, details=details)
    finally:
        repo.close()
    _check_rpo(spec, outcome)
    return outcome
