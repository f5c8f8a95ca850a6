"""The activities of a run's steps: the job, its retention, its replica copy, its breaker.

`JobActivities.job` builds the job from the worker's configuration (`build_job`, with the run's
scheduled time, so every attempt and every worker refers to the same job id), runs it on a thread
through `keepwell.control.runner.run_job` (the job history, alerts and log events of a local
run), and heartbeats its progress (bytes read, files, packs and bytes uploaded) while it runs. A
backup job stops at its committed snapshot (``follow_ups`` off): `retention` and `replica` run
the source's retention and the repository's replica copy (`keepwell.control.backups`) as steps
of their own, each retried by Temporal apart from the backup; what they did, or why they failed,
goes to the backup's log in the job history when that history has the backup's row. A retry
(attempt 2 and later) of a backup is a ``recovery`` run: it first looks for the snapshot a lost
worker may have committed, and the repository reuses the packs it had already uploaded. A step
that does not succeed raises, so Temporal retries it with the run's policy. Every step holds
the leases of the job's budgets (`keepwell.fleet.budgets`) while it runs.

`breaker_ask` and `breaker_report` are the run's calls to its source's breaker
(`keepwell.fleet.breakers`), run as local activities; a run the breaker refuses is recorded
``skipped`` in the job history, as the daemon records it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError, CancelledError

from keepwell.control.alerts import Alerts
from keepwell.control.backups import run_follow_up
from keepwell.control.config import Config, LoadedConfig, load_config
from keepwell.control.history import open_history
from keepwell.control.jobs import JobContext, JobSpec, build_job
from keepwell.control.logs import log_event
from keepwell.control.runner import run_job
from keepwell.control.streamers import StreamSupervisor, source_stream, stop_orphan
from keepwell.errors import ConfigurationError, KeepwellError
from keepwell.fleet.breakers import SKIP_REASON, tell_breaker
from keepwell.fleet.budgets import Leases, SiteUpload, on_loop, scopes
from keepwell.fleet.messages import (
    BreakerAsk,
    BreakerVerdict,
    StepRequest,
    StepResult,
    StreamRequest,
)
from keepwell.fleet.target import site_of, stream_digest
from keepwell.fleet.workflows import (
    BREAKER_ASK_ACTIVITY,
    BREAKER_REPORT_ACTIVITY,
    JOB_ACTIVITY,
    REPLICA_ACTIVITY,
    RETENTION_ACTIVITY,
    STREAM_ACTIVITY,
)

T = TypeVar("T")


class _Progress:
    """Counts what the repository reports; read by the heartbeat loop."""

    def __init__(self) -> None:
        self.bytes_read = 0
        self.files = 0
        self.packs = 0
        self.ctx: JobContext | None = None
        self._lock = threading.Lock()

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        with self._lock:
            if name == "bytes":
                self.bytes_read += int(fields.get("n", 0))
            elif name == "file":
                self.files += 1
            elif name == "files":
                self.files += int(fields.get("n", 0))
            elif name == "pack_stored":
                self.packs += 1

    @property
    def uploaded(self) -> int:
        return self.ctx.uploaded if self.ctx is not None else 0

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {"bytes_read": self.bytes_read, "files": self.files, "packs": self.packs,
                    "bytes_uploaded": self.uploaded}


def _file_state(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class JobActivities:
    """The activities of one worker: its configuration, its site, its client to the cluster
    (for the leases of the fleet's budgets and the breakers)."""

    def __init__(self, loaded: LoadedConfig, site: str, identity: str,
                 log: logging.Logger, client: Client, loop: asyncio.AbstractEventLoop) -> None:
        self.loaded = loaded
        self.site = site
        self.identity = identity
        self.log = log
        self.client = client
        self.loop = loop
        self._read = _file_state(loaded.path)
        self._config_lock = threading.Lock()

    @property
    def config(self) -> Config:
        """The worker's configuration file as it is now: each step reads it again once it has
        changed (a source added and `fleet apply`'d runs without restarting the workers); a
        file that no longer validates is refused with a warning, and the last good one stays
        in force, as the daemon's reload does."""
        with self._config_lock:
            state = _file_state(self.loaded.path)
            if state != self._read:
                self._read = state
                try:
                    self.loaded = load_config(self.loaded.path)
                    log_event(self.log, "config_reloaded", path=str(self.loaded.path))
                except KeepwellError as exc:
                    log_event(self.log, "config_refused", level=logging.WARNING,
                              path=str(self.loaded.path), error=exc.line())
            return self.loaded.config

    def _spec(self, step: StepRequest, action: str, trigger: str) -> JobSpec:
        cfg = self.config
        site = site_of(cfg, action, step.name)
        if site != self.site:
            raise ApplicationError(f"{action} {step.name} belongs to site {site!r}, not to this "
                                   f"worker's site {self.site!r}", non_retryable=True)
        spec = build_job(cfg, action, step.name, step.scheduled_at, trigger=trigger)
        return dataclasses.replace(spec, attempt=activity.info().attempt, follow_ups=False)

    @activity.defn(name=JOB_ACTIVITY)
    def job(self, step: StepRequest) -> StepResult:
        attempt = activity.info().attempt
        trigger = "recovery" if attempt > 1 else ("probe" if step.probe else "fleet")
        spec = self._spec(step, step.action, trigger)
        progress = _Progress()
        cfg = self.config
        history = open_history(cfg)
        try:
            if attempt > 1:  # a lost worker's row of this job is not running any more
                for run in history.interrupted_runs():
                    if run.job_id == spec.job_id:
                        history.mark_interrupted(run.id, "its fleet worker was lost; retried")
            alerts = Alerts(history, cfg.alerts, list(cfg.notifications))
            run_id, outcome = self._leased(
                spec, step, progress, lambda ctx: run_job(spec, ctx, history, alerts, self.log))
        finally:
            history.close()
        if outcome.status != "succeeded":
            raise ApplicationError(f"{spec.action} {spec.name} {outcome.status}: {outcome.error}",
                                   type=outcome.error_type or "JobFailed")
        return StepResult(action=spec.action, name=spec.name, job_id=spec.job_id,
                          status=outcome.status, attempt=attempt, worker=self.identity,
                          snapshot_id=outcome.snapshot_id, bytes_read=outcome.bytes_read,
                          bytes_stored=outcome.bytes_stored,
                          bytes_uploaded=outcome.bytes_uploaded,
                          details={"progress": progress.as_dict(), "rto": outcome.rto,
                                   "rpo": outcome.rpo, "run_id": run_id})

    @activity.defn(name=RETENTION_ACTIVITY)
    def retention(self, step: StepRequest) -> StepResult:
        return self._follow_up(step)

    @activity.defn(name=REPLICA_ACTIVITY)
    def replica(self, step: StepRequest) -> StepResult:
        return self._follow_up(step)

    def _follow_up(self, step: StepRequest) -> StepResult:
        """A backup's retention or replica copy, as a step of its own."""
        attempt = activity.info().attempt
        spec = self._spec(step, "backup", "fleet")
        progress = _Progress()
        history = open_history(self.config)
        try:
            backup = next((r for r in reversed(history.runs_for_job(spec.job_id))
                           if r.status == "succeeded"), None)

            def note(level: str, message: str) -> None:
                if backup is not None:
                    history.add_log(backup.id, level, message)

            try:
                details = self._leased(spec, step, progress,
                                       lambda ctx: run_follow_up(spec, ctx, step.action))
            except ApplicationError:
                raise
            except Exception as exc:
                line = (exc.line() if isinstance(exc, KeepwellError)
                        else f"{type(exc).__name__}: {exc}")
                note("warning", f"{step.action} failed (attempt {attempt}): {line}")
                log_event(self.log, "step_failed", level=logging.WARNING, job=spec.job_id,
                          step=step.action, source=spec.source, attempt=attempt, error=line)
                raise ApplicationError(f"{step.action} of {spec.name} failed: {line}",
                                       type=type(exc).__name__,
                                       non_retryable=isinstance(exc, ConfigurationError)
                                       ) from None
            said = ", ".join(f"{k} {v}" for k, v in details.items() if v is not None)
            note("info", f"{step.action} succeeded (attempt {attempt})"
                         + (f": {said}" if said else ""))
            log_event(self.log, "step_finished", job=spec.job_id, step=step.action,
                      source=spec.source, attempt=attempt, **details)
        finally:
            history.close()
        return StepResult(action=step.action, name=spec.name, job_id=spec.job_id,
                          status="succeeded", attempt=attempt, worker=self.identity,
                          bytes_uploaded=progress.uploaded,
                          details={**details, "progress": progress.as_dict()})

    def _leased(self, spec: JobSpec, step: StepRequest, progress: _Progress,
                work: Callable[[JobContext], T]) -> T:
        """Run ``work`` on a thread inside the job's budgets: wait for its leases, heartbeat
        and renew them while it runs, release them at its end."""
        info = activity.info()
        cfg = self.config
        upload = SiteUpload(cfg, self.site)
        ctx = JobContext(shared_upload=upload.bucket, timeout=spec.timeout, listener=progress)
        progress.ctx = ctx
        leases = Leases(self.client, self.loop,
                        f"{info.workflow_id}/{info.activity_id}/{info.attempt}", self.identity,
                        ttl=max(3 * info.heartbeat_timeout.total_seconds(), 1.0)
                        if info.heartbeat_timeout else 90.0,
                        scopes=scopes(cfg, spec, self.site))

        def waiting(scope: str) -> bool:
            activity.heartbeat({"waiting_for": scope})
            return not (activity.is_cancelled() or activity.is_worker_shutdown())

        try:
            if not leases.acquire(step.heartbeat_every, waiting, ctx.cancel):
                raise ApplicationError(f"{step.action} {spec.name}: cancelled while waiting "
                                       "for a budget", type="Cancelled")
            upload.follow(leases.grants)
            return self._heartbeating(spec, ctx, progress, step.heartbeat_every,
                                      lambda: upload.follow(leases.renew()), work)
        finally:
            leases.release()

    def _heartbeating(self, spec: JobSpec, ctx: JobContext, progress: _Progress, every: float,
                      renew: Callable[[], None], work: Callable[[JobContext], T]) -> T:
        done: list[T] = []
        failed: list[BaseException] = []

        def run() -> None:
            try:
                done.append(work(ctx))
            except BaseException as exc:  # reported by the activity
                failed.append(exc)

        thread = threading.Thread(target=run, name=f"job-{spec.job_id}", daemon=True)
        thread.start()
        while True:
            thread.join(every)
            if not thread.is_alive():
                break
            if activity.is_cancelled() or activity.is_worker_shutdown():
                ctx.cancel.set()
            activity.heartbeat(progress.as_dict())
            renew()
        if failed:
            raise failed[0]
        return done[0]

    @activity.defn(name=STREAM_ACTIVITY, no_thread_cancel_exception=True)
    def stream(self, req: StreamRequest) -> None:
        """Run the source's streamer (`keepwell.control.streamers.source_stream`, as the daemon
        does) under a supervisor until the activity is cancelled, heartbeating its figures and
        raising the source's lag alert as the daemon does. A
        streamer a killed worker of this host left behind is stopped first (the job history
        has its pid). On the worker's shutdown the streamer stops and the activity fails, to
        be started again on another worker of the site."""
        # the file as it is now: `fleet apply` restarts a streamer when its source changed; a
        # worker whose file differs from the applied one refuses it
        cfg = self.config
        if req.name not in cfg.sources or site_of(cfg, "backup", req.name) != self.site:
            raise ApplicationError(f"stream {req.name}: not a source of this worker's site "
                                   f"{self.site!r}", non_retryable=True)
        if req.digest and stream_digest(cfg, req.name) != req.digest:
            log_event(self.log, "stream_refused", level=logging.WARNING, source=req.name,
                      reason="configuration differs")
            raise ApplicationError(f"stream {req.name}: this worker's {self.loaded.path} gives "
                                   "the source other settings than the file 'fleet apply' "
                                   "used: give the workers the same file", type="StaleConfig")
        found = source_stream(cfg, req.name)
        if found is None:
            raise ApplicationError(f"stream {req.name}: the source does not stream (no "
                                   "'stream', not 'mode: continuous') or is disabled",
                                   non_retryable=True)
        stream, env = found
        history = open_history(cfg)
        try:
            for source, pid, command in history.orphaned_streamers():
                if source == req.name and stop_orphan(pid, command):
                    log_event(self.log, "stream_orphan_stopped", level=logging.WARNING,
                              source=source, pid=pid)
            # the lag alert, as the daemon raises it (keepwell.control.alerts)
            limit = stream.lag_alert
            alerts = Alerts(history, cfg.alerts, list(cfg.notifications))
            sup = StreamSupervisor(
                req.name, stream, env, self.log, on_spawn=history.set_streamer,
                on_lag=None if limit is None else
                (lambda source, samples: alerts.check_lag(source, samples, limit)),
                on_down=None if limit is None else
                (lambda source, seconds, code: alerts.check_down(source, seconds, limit, code)),
                on_up=alerts.stream_up)
            sup.start()
            every = max(0.2, req.heartbeat_timeout / 4)
            try:
                while True:
                    figures = sup.figures
                    activity.heartbeat({"up": figures.up, "restarts": figures.restarts,
                                        "lag_seconds": figures.lag_seconds,
                                        "worker": self.identity})
                    activity.wait_for_cancelled_sync(every)
                    if activity.is_cancelled() or activity.is_worker_shutdown():
                        break
            finally:
                sup.stop()
                history.clear_streamer(req.name)
        finally:
            history.close()
        log_event(self.log, "stream_stopped", source=req.name, worker=self.identity)
        if activity.is_cancelled():
            raise CancelledError(f"stream {req.name}: stopped")
        raise ApplicationError(f"stream {req.name}: the worker is shutting down",
                               type="WorkerShutdown")

    @activity.defn(name=BREAKER_ASK_ACTIVITY)
    def breaker_ask(self, ask: BreakerAsk) -> BreakerVerdict:
        verdict = on_loop(self.loop, tell_breaker(self.client, ask))
        if verdict.allowed:
            return verdict
        spec = build_job(self.config, "backup", ask.source, ask.scheduled_at,
                         trigger="fleet")
        history = open_history(self.config)
        try:
            history.record_skip(job_id=spec.job_id, name=spec.name, source=spec.source,
                                action=spec.action, kind=spec.kind, attempt=1, trigger="fleet",
                                reason=SKIP_REASON)
        finally:
            history.close()
        log_event(self.log, "job_skipped", job=spec.job_id, source=spec.source,
                  reason="circuit open", retry_at=verdict.retry_at)
        return verdict

    @activity.defn(name=BREAKER_REPORT_ACTIVITY)
    def breaker_report(self, ask: BreakerAsk) -> BreakerVerdict:
        verdict = on_loop(self.loop, tell_breaker(self.client, ask))
        if verdict.state == verdict.was == "closed":
            return verdict
        cfg = self.config
        history = open_history(cfg)
        try:
            alerts = Alerts(history, cfg.alerts, list(cfg.notifications))
            if verdict.state == "closed":
                history.set_breaker(ask.source, "closed", 0)
                alerts.clear(ask.source, "circuit_open")
                log_event(self.log, "circuit_closed", source=ask.source)
                return verdict
            history.set_breaker(ask.source, "open", verdict.failures)
            if verdict.was == "closed":
                alerts.fire(ask.source, "circuit_open",
                            f"{ask.source} failed {verdict.failures} run(s) in a row and is "
                            f"paused: {ask.error}")
                log_event(self.log, "circuit_opened", level=logging.WARNING, source=ask.source)
        finally:
            history.close()
        return verdict
