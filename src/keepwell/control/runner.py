"""Running one job: `execute` (the work) and `run_job` (with its history row, alerts, log event).

`execute(spec, context)` runs a spec's action through its source (`keepwell.control.backups`,
`keepwell.control.drills`) and returns a `JobOutcome`; it is what any executor calls. Both the
daemon's workers and ``keepwell run``/``keepwell drill`` go through `run_job`, so a job run by
hand is recorded, judged and alerted on exactly like a scheduled one.
"""

from __future__ import annotations

import logging
import signal
import time

from keepwell.backends.resilience import TokenBucket
from keepwell.control.alerts import Alerts
from keepwell.control.backups import run_backup
from keepwell.control.config import LoadedConfig
from keepwell.control.drills import run_drill
from keepwell.control.history import History, open_history
from keepwell.control.jobs import JobCancelled, JobContext, JobOutcome, JobSpec, build_job
from keepwell.control.logs import log_event
from keepwell.errors import KeepwellError


def execute(spec: JobSpec, ctx: JobContext) -> JobOutcome:
    """Run one job to its end; never raises for a job's own failure."""
    started = time.monotonic()
    try:
        ctx.check()
        outcome = run_drill(spec, ctx) if spec.action == "drill" else run_backup(spec, ctx)
    except JobCancelled as exc:
        outcome = JobOutcome("timeout" if exc.timed_out else "interrupted", error=str(exc),
                             error_type=type(exc).__name__)
    except KeepwellError as exc:
        outcome = JobOutcome("failed", error=exc.line(), error_type=type(exc).__name__,
                             transient=bool(getattr(exc, "transient", False)))
    except Exception as exc:  # a job must not take the daemon down; record it as a failure
        outcome = JobOutcome("failed", error=f"{type(exc).__name__}: {exc}",
                             error_type=type(exc).__name__)
    if outcome.status == "failed":
        # Worker threads of a source may wrap the cancellation in their own error.
        try:
            ctx.check()
        except JobCancelled as exc:
            outcome.status = "timeout" if exc.timed_out else "interrupted"
            outcome.error = str(exc)
    outcome.bytes_uploaded = ctx.uploaded
    if ctx.upload_started is not None:
        outcome.details["upload_started"] = round(ctx.upload_started, 6)
        outcome.details["upload_ended"] = round(ctx.upload_ended or ctx.upload_started, 6)
    outcome.details.setdefault("elapsed", round(time.monotonic() - started, 3))
    return outcome


def run_job(spec: JobSpec, ctx: JobContext, history: History, alerts: Alerts,
            log: logging.Logger) -> tuple[int, JobOutcome]:
    """Record, execute and judge one job; returns (run id, outcome)."""
    run_id = history.start_run(
        job_id=spec.job_id, name=spec.name, source=spec.source, action=spec.action,
        kind=spec.kind, attempt=spec.attempt, trigger=spec.trigger,
        scheduled_at=spec.scheduled_at, spec=spec.to_dict(),
    )
    log_event(log, "job_started", job=spec.job_id, action=spec.action, source=spec.source,
              attempt=spec.attempt, trigger=spec.trigger)
    outcome = execute(spec, ctx)
    finish(run_id, spec, outcome, history, alerts, log)
    return run_id, outcome


def finish(run_id: int, spec: JobSpec, outcome: JobOutcome, history: History, alerts: Alerts,
           log: logging.Logger) -> None:
    details = dict(outcome.details)
    if outcome.error_type:
        details["error_type"] = outcome.error_type
    recorded = history.finish_run(
        run_id, outcome.status, error=outcome.error, bytes_read=outcome.bytes_read,
        bytes_stored=outcome.bytes_stored, bytes_uploaded=outcome.bytes_uploaded,
        dedup_ratio=outcome.dedup_ratio, snapshot_id=outcome.snapshot_id, rto=outcome.rto,
        rpo=outcome.rpo, details=details,
    )
    if not recorded:
        return  # already recorded as timed out by the daemon's watchdog
    level = logging.INFO if outcome.status == "succeeded" else logging.WARNING
    log_event(log, "job_finished", level=level, job=spec.job_id, action=spec.action,
              source=spec.source, status=outcome.status, error=outcome.error,
              snapshot=outcome.snapshot_id, bytes_read=outcome.bytes_read,
              bytes_stored=outcome.bytes_stored, uploaded=outcome.bytes_uploaded,
              rto=outcome.rto, rpo=outcome.rpo)
    if spec.action == "backup" and outcome.status == "succeeded":
        for kind in alerts.after_backup(spec.source):
            log_event(log, "alert", level=logging.WARNING, source=spec.source, kind=kind)
    elif spec.action == "drill" and outcome.status in ("succeeded", "failed", "timeout"):
        alerts.after_drill(spec.source, outcome.status == "succeeded", outcome.error)


def run_now(loaded: LoadedConfig, action: str, name: str, log: logging.Logger
            ) -> tuple[JobSpec, JobOutcome]:
    """Run one job immediately in this process (``keepwell run`` / ``keepwell drill``).

    Ctrl-C stops the job at its next storage call (recorded ``interrupted``); a second Ctrl-C
    stops at once.
    """
    cfg = loaded.config
    spec = build_job(cfg, action, name, time.time(), trigger="manual")
    history = open_history(cfg)
    try:
        alerts = Alerts(history, cfg.alerts, list(cfg.notifications))
        shared = (TokenBucket(cfg.limits.upload, burst=cfg.limits.upload_burst)
                  if cfg.limits.upload else None)
        ctx = JobContext(shared_upload=shared, timeout=spec.timeout)

        def stop(signum: int, frame: object) -> None:
            if ctx.cancel.is_set():
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            ctx.cancel.set()

        previous = signal.signal(signal.SIGINT, stop)
        try:
            _, outcome = run_job(spec, ctx, history, alerts, log)
        finally:
            signal.signal(signal.SIGINT, previous)
        return spec, outcome
    finally:
        history.close()
