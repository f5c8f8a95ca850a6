"""Backup jobs: the source's backup, then its retention, then the replica.

The control plane knows no kind of source: `run_backup` looks the job's kind up
(`keepwell.sources.base.source_for`) and calls its `Source.backup` with the job's repository,
opened behind the job's budgets. After a crash, a re-run first looks for the snapshot its
interrupted run may have committed (a snapshot is written last and records the job's id).

Once the snapshot is committed, the source's retention runs (`apply_retention`): the policy of
its settings, given to the source's own forget plan, so a database keeps the bases its
point-in-time window needs and the log (WAL, binlogs) from their floor on, and forgets what lies
below; then the repository's replica, if any, is brought up to date. These two *follow-ups* run
inside the backup job (the daemon), or, for a spec with ``follow_ups`` off, as steps of their
own that an executor retries apart from the backup (`run_follow_up`: the fleet). Inside the
job, a follow-up that fails leaves the backup succeeded, with the failure in the outcome's
``follow_ups_failed`` (step name to error) and in the run's log.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from keepwell.control.jobs import (
    JobCancelled,
    JobContext,
    JobOutcome,
    JobSpec,
    mirror_to_replica,
    open_job_repository,
    source_job,
)
from keepwell.control.spans import PhaseClock
from keepwell.errors import KeepwellError
from keepwell.repository import Repository, Snapshot
from keepwell.repository.retention import Policy
from keepwell.sources.base import Source, SourceJob, source_for


def outcome_from_snapshot(snap: Snapshot) -> JobOutcome:
    summary = dict(snap.summary or {})
    read = summary.get("bytes_processed", summary.get("bytes_read"))
    added = summary.get("bytes_added")
    dedup = None
    if isinstance(read, int | float) and read > 0 and isinstance(added, int | float):
        dedup = round(max(0.0, 1.0 - added / read), 6)
    return JobOutcome(
        "succeeded",
        bytes_read=int(read) if read is not None else None,
        bytes_stored=int(summary.get("bytes_stored", 0)),
        dedup_ratio=dedup,
        snapshot_id=snap.id,
        details={"summary": summary, "bytes_added": added},
    )


def retention_policy(retention: Mapping[str, Any] | None) -> Policy | None:
    """The policy of a source's ``retention`` settings; None when it keeps everything."""
    if not retention:
        return None
    policy = Policy.from_options(**retention)
    return None if policy.empty() else policy


def apply_retention(source: Source[Any], job: SourceJob, repo: Repository,
                    outcome: JobOutcome) -> None:
    """Forget what the source's retention does not keep (through the source's forget plan)."""
    policy = retention_policy(job.settings.get("retention"))
    if policy is None:
        return
    plan = source.forget_plan(job, repo, policy)
    if plan.ids():
        repo.forget(plan.ids())
    outcome.details["forgotten"] = [i[:8] for i in plan.bases]
    if source.point_in_time:
        outcome.details["forgotten_logs"] = len(plan.logs)
        outcome.details["log_floor"] = plan.log_floor


def _recovered(repo: Repository, spec: JobSpec) -> JobOutcome | None:
    """After a crash: the snapshot of this job may already be committed (it is written last)."""
    if spec.trigger != "recovery":
        return None
    for snap in reversed(repo.list_snapshots()):
        if (snap.source or {}).get("keepwell_job") == spec.job_id:
            outcome = outcome_from_snapshot(snap)
            outcome.details["recovered"] = True
            return outcome
    return None


class _Counts:
    """Feeds the repository's events into the job's progress and log."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        ctx = self.ctx
        if name == "stored_by_workers":  # packs that worker processes uploaded themselves
            ctx.count_upload(fields["bytes"])
        elif name == "bytes":
            ctx.bytes_read += int(fields.get("n", 0))
        elif name == "file":
            ctx.files += 1
        elif name == "files":
            ctx.files += int(fields.get("n", 0))
            ctx.bytes_read += int(fields.get("bytes", 0))
        elif name == "warning":
            ctx.log("warning", str(fields.get("message", "")))
        elif name == "error":
            ctx.log("error", f"{fields.get('path', '')}: {fields.get('message', '')}")


def _open(spec: JobSpec, ctx: JobContext) -> Repository:
    with ctx.trace.phase("open repository"):
        repo = open_job_repository(spec, ctx)
    repo.events.subscribe(_Counts(ctx))
    if ctx.listener is not None:
        repo.events.subscribe(ctx.listener)
    return repo


def _retention(spec: JobSpec, ctx: JobContext, repo: Repository, outcome: JobOutcome) -> None:
    with ctx.trace.phase("retention"):
        apply_retention(source_for(spec.kind), source_job(spec), repo, outcome)


def _replica(spec: JobSpec, ctx: JobContext, repo: Repository, outcome: JobOutcome) -> None:
    if spec.params["repository"].get("replica"):
        with ctx.trace.phase("replica"):
            outcome.details["replica"] = mirror_to_replica(spec, ctx, repo.backend)


FollowUp = Callable[[JobSpec, JobContext, Repository, JobOutcome], None]
FOLLOW_UPS: dict[str, FollowUp] = {"retention": _retention, "replica": _replica}  # in order


def run_backup(spec: JobSpec, ctx: JobContext) -> JobOutcome:
    """One backup of the job's source, then (``spec.follow_ups``) its retention and replica."""
    source = source_for(spec.kind)
    job = source_job(spec)
    repo = _open(spec, ctx)
    clock = PhaseClock()
    repo.events.subscribe(clock.on_event)
    try:
        done = _recovered(repo, spec)
        if done is not None:
            return done
        with ctx.trace.phase(source.backup_phase(job)):
            try:
                report = source.backup(job, repo, ctx)
            finally:
                clock.place(ctx.trace, ctx.upload_started, ctx.upload_ended)
        outcome = outcome_from_snapshot(report.snapshot)
        if report.problems:
            outcome.details["partial"] = report.problems
        if spec.follow_ups:
            for name, follow_up in FOLLOW_UPS.items():
                try:
                    follow_up(spec, ctx, repo, outcome)
                except JobCancelled:
                    raise
                except (KeepwellError, OSError) as exc:
                    # the snapshot is committed: the backup stands (a retry would make another
                    # one, and its success must count for the last-success figures); the step
                    # that failed is said, in the run's log and its details, and a one-shot
                    # `keepwell run` exits 3 (as `fleet run --wait` for a partial run)
                    failed = outcome.details.setdefault("follow_ups_failed", {})
                    failed[name] = str(exc)
                    ctx.log("error", f"{name} failed after snapshot {outcome.snapshot_id or ''}"
                                     f" was committed: {exc}")
        return outcome
    finally:
        repo.close()


def run_follow_up(spec: JobSpec, ctx: JobContext, step: str) -> dict[str, Any]:
    """One follow-up of a backup job (``retention`` or ``replica``) as a step of its own; what
    it did. Raises what goes wrong."""
    outcome = JobOutcome("succeeded")
    repo = _open(spec, ctx)
    try:
        FOLLOW_UPS[step](spec, ctx, repo, outcome)
    finally:
        repo.close()
    return outcome.details
