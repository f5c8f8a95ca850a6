"""Running one job: `execute` (the work) and `run_job` (with its history row, alerts, log event).

`execute(spec, context)` runs a spec's action through its source (`keepwell.control.backups`,
`keepwell.control.drills`) and returns a `JobOutcome`; it is what any executor calls. Both the
daemon's workers and ``keepwell run``/``keepwell drill`` go through `run_job`, so a job run by
hand is recorded, judged and alerted on exactly like a scheduled one.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Protocol

from keepwell.backends.resilience import TokenBucket
from keepwell.control.alerts import Alerts
from keepwell.control.backups import run_backup
from keepwell.control.checks import run_check
from keepwell.control.config import LoadedConfig
from keepwell.control.confined import JobChild, run_confined
from keepwell.control.drills import run_drill
from keepwell.control.history import History, open_history
from keepwell.control.jobs import JobCancelled, JobContext, JobOutcome, JobSpec, build_job
from keepwell.control.logs import log_event
from keepwell.control.spans import Tracing
from keepwell.control.tracing import open_tracing
from keepwell.errors import KeepwellError, UsageError


def execute(spec: JobSpec, ctx: JobContext) -> JobOutcome:
    """Run one job to its end; never raises for a job's own failure. A job with hard resource
    limits runs in a job process of its own, inside its cgroup (`keepwell.control.confined`)."""
    started = time.monotonic()
    try:
        ctx.check()
        if spec.resources:
            outcome = run_confined(spec, ctx)
            outcome.details.setdefault("elapsed", round(time.monotonic() - started, 3))
            return outcome
        if spec.action == "check":
            outcome = run_check(spec, ctx)
        else:
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


def serve_confined(down_fd: int, up_fd: int) -> None:
    """The job process of `keepwell.control.confined`: run the job it is given, report back."""
    child = JobChild(down_fd, up_fd)
    child.finish(execute(child.spec, child.ctx))


def run_job(spec: JobSpec, ctx: JobContext, history: History, alerts: Alerts,
            log: logging.Logger, tracing: Tracing | None = None) -> tuple[int, JobOutcome]:
    """Record, execute and judge one job (an attempt's span of its trace when ``tracing``);
    returns (run id, outcome)."""
    run_id = history.start_run(
        job_id=spec.job_id, name=spec.name, source=spec.source, action=spec.action,
        kind=spec.kind, attempt=spec.attempt, trigger=spec.trigger,
        scheduled_at=spec.scheduled_at, spec=spec.to_dict(),
    )
    log_event(log, "job_started", job=spec.job_id, action=spec.action, source=spec.source,
              attempt=spec.attempt, trigger=spec.trigger, requested_by=spec.requested_by)
    ctx.on_log = lambda level, message: history.add_log(run_id, level, message)
    by = f" by {spec.requested_by}" if spec.requested_by else ""
    ctx.log("info", f"{spec.action} of {spec.name} started (attempt {spec.attempt}, "
                    f"{spec.trigger}{by})")
    if tracing is not None:
        ctx.trace = tracing.start(spec.job_id, f"{spec.action} {spec.name}", action=spec.action,
                                  source=spec.source, kind=spec.kind, attempt=spec.attempt,
                                  trigger=spec.trigger, run_id=run_id)
    outcome = execute(spec, ctx)
    ctx.trace.finish(outcome.status, outcome.error, snapshot=outcome.snapshot_id,
                     bytes_read=outcome.bytes_read, bytes_uploaded=outcome.bytes_uploaded)
    ctx.on_log = None
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
    history.add_log(run_id, "info" if outcome.status == "succeeded" else "error",
                    _summary(spec, outcome))
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


def _summary(spec: JobSpec, outcome: JobOutcome) -> str:
    """The closing line of a run's log."""
    if outcome.status != "succeeded":
        return f"{spec.action} {outcome.status}: {outcome.error}"
    parts = [f"{spec.action} succeeded"]
    if outcome.snapshot_id:
        parts.append(f"snapshot {outcome.snapshot_id[:8]}")
    if outcome.bytes_read is not None:
        parts.append(f"read {outcome.bytes_read} bytes")
    if outcome.bytes_stored is not None:
        parts.append(f"stored {outcome.bytes_stored} bytes")
    if outcome.rto is not None:
        parts.append(f"RTO {outcome.rto:.2f}s, RPO {outcome.rpo or 0:.0f}s")
    return ", ".join(parts)


def run_now(loaded: LoadedConfig, action: str, name: str, log: logging.Logger,
            read_data_subset: str | None = None) -> tuple[JobSpec, JobOutcome]:
    """Run one job immediately in this process (``keepwell run`` / ``drill`` /
    ``check-repository``).

    Ctrl-C stops the job at its next storage call (recorded ``interrupted``); a second Ctrl-C
    stops at once.
    """
    cfg = loaded.config
    spec = build_job(cfg, action, name, time.time(), trigger="manual",
                     read_data_subset=read_data_subset)
    tracing = open_tracing(cfg.tracing)
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
            _, outcome = run_job(spec, ctx, history, alerts, log, tracing)
        finally:
            signal.signal(signal.SIGINT, previous)
        return spec, outcome
    finally:
        history.close()
        if tracing is not None:
            tracing.close()


class LiveJobs(Protocol):
    """What starts jobs by hand and shows the running ones (the daemon, or `BackgroundJobs`)."""

    def submit(self, action: str, name: str, requested_by: str | None) -> str:
        """Queue or start ``action`` on ``name`` now; the job's id. `UsageError` when the same
        job is already queued or running."""
        ...

    def running(self) -> list[dict[str, Any]]:
        """The jobs running now, with their progress (`JobContext.progress`)."""
        ...


def live_entry(spec: JobSpec, ctx: JobContext) -> dict[str, Any]:
    return {"job_id": spec.job_id, "action": spec.action, "name": spec.name,
            "source": spec.source, "trigger": spec.trigger, "requested_by": spec.requested_by,
            "started_at": ctx.started, **ctx.progress()}


class BackgroundJobs:
    """Jobs asked for by hand, each run on a thread of this process (the web app without a
    daemon): recorded in the history and judged like any other run, inside the config's shared
    upload budget, but not inside a daemon's concurrency caps."""

    def __init__(self, loaded: LoadedConfig, history: History, log: logging.Logger) -> None:
        cfg = self.cfg = loaded.config
        self.history = history
        self.log = log
        self.alerts = Alerts(history, cfg.alerts, list(cfg.notifications))
        self.shared = (TokenBucket(cfg.limits.upload, burst=cfg.limits.upload_burst)
                       if cfg.limits.upload else None)
        self._lock = threading.Lock()
        self._running: dict[str, tuple[JobSpec, JobContext, threading.Thread]] = {}

    def submit(self, action: str, name: str, requested_by: str | None) -> str:
        spec = build_job(self.cfg, action, name, time.time(), trigger="manual",
                         requested_by=requested_by)
        ctx = JobContext(shared_upload=self.shared, timeout=spec.timeout)
        with self._lock:
            if any(s.action == action and s.name == name for s, _c, _t in
                   self._running.values()):
                raise UsageError(f"{action} of {name} is already running")
            thread = threading.Thread(target=self._work, args=(spec, ctx), daemon=True,
                                      name=f"job-{name}")
            self._running[spec.job_id] = (spec, ctx, thread)
        thread.start()
        return spec.job_id

    def _work(self, spec: JobSpec, ctx: JobContext) -> None:
        try:
            run_job(spec, ctx, self.history, self.alerts, self.log)
        except Exception as exc:  # bookkeeping failed: keep serving
            log_event(self.log, "job_error", level=logging.ERROR, job=spec.job_id,
                      error=f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._running.pop(spec.job_id, None)

    def running(self) -> list[dict[str, Any]]:
        with self._lock:
            return [live_entry(s, c) for s, c, _t in self._running.values()]

    def stop(self, grace: float = 10.0) -> None:
        """Cancel the running jobs (recorded ``interrupted``) and wait for them a while."""
        with self._lock:
            jobs = list(self._running.values())
        for _s, ctx, _t in jobs:
            ctx.cancel.set()
        for _s, _c, thread in jobs:
            thread.join(grace)
