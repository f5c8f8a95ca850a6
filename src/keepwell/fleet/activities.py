"""The activity of a run's step: one job, run by the daemon's own `run_job`, with heartbeats.

`JobActivities.job` builds the job from the worker's configuration (`build_job`, with the run's
scheduled time, so every attempt and every worker refers to the same job id), runs it on a thread
through `keepwell.control.runner.run_job` (the job history, alerts and log events of a local
run), and heartbeats its progress (bytes read, files, packs and bytes uploaded) while it runs. A
retry (attempt 2 and later) is a ``recovery`` run: it first looks for the snapshot a lost worker
may have committed, and the repository reuses the packs it had already uploaded. A job that does
not succeed raises, so Temporal retries it with the run's policy.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from keepwell.backends.resilience import TokenBucket
from keepwell.control.alerts import Alerts
from keepwell.control.config import LoadedConfig
from keepwell.control.history import open_history
from keepwell.control.jobs import JobContext, JobOutcome, JobSpec, build_job
from keepwell.control.runner import run_job
from keepwell.fleet.messages import StepRequest, StepResult
from keepwell.fleet.target import site_of


class _Progress:
    """Counts what the repository reports; read by the heartbeat loop."""

    def __init__(self) -> None:
        self.bytes_read = 0
        self.files = 0
        self.packs = 0
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

    def as_dict(self, ctx: JobContext) -> dict[str, int]:
        with self._lock:
            return {"bytes_read": self.bytes_read, "files": self.files, "packs": self.packs,
                    "bytes_uploaded": ctx.uploaded}


class JobActivities:
    """The activities of one worker: its configuration, its site, its shared upload budget."""

    def __init__(self, loaded: LoadedConfig, site: str, identity: str,
                 log: logging.Logger) -> None:
        self.loaded = loaded
        self.site = site
        self.identity = identity
        self.log = log
        cfg = loaded.config
        self.shared = (TokenBucket(cfg.limits.upload, burst=cfg.limits.upload_burst)
                       if cfg.limits.upload else None)

    @activity.defn(name="keepwell-job")
    def job(self, step: StepRequest) -> StepResult:
        info = activity.info()
        cfg = self.loaded.config
        if site_of(cfg, step.action, step.name) != self.site:
            raise ApplicationError(
                f"{step.action} {step.name} belongs to site {site_of(cfg, step.action, step.name)!r}"
                f", not to this worker's site {self.site!r}", non_retryable=True)
        spec = build_job(cfg, step.action, step.name, step.scheduled_at,
                         trigger="fleet" if info.attempt == 1 else "recovery")
        spec = dataclasses.replace(spec, attempt=info.attempt)
        progress = _Progress()
        ctx = JobContext(shared_upload=self.shared, timeout=spec.timeout, listener=progress)
        outcome = self._run(spec, ctx, progress, step.heartbeat_every)
        result = StepResult(action=spec.action, name=spec.name, job_id=spec.job_id,
                            status=outcome.status, attempt=info.attempt,
                            worker=self.identity,
                            snapshot_id=outcome.snapshot_id, bytes_read=outcome.bytes_read,
                            bytes_stored=outcome.bytes_stored,
                            bytes_uploaded=outcome.bytes_uploaded,
                            details={"progress": progress.as_dict(ctx), "rto": outcome.rto,
                                     "rpo": outcome.rpo})
        if outcome.status != "succeeded":
            raise ApplicationError(f"{spec.action} {spec.name} {outcome.status}: {outcome.error}",
                                   type=outcome.error_type or "JobFailed")
        return result

    def _run(self, spec: JobSpec, ctx: JobContext, progress: _Progress,
             every: float) -> JobOutcome:
        history = open_history(self.loaded.config)
        try:
            if spec.attempt > 1:  # a lost worker's row of this job is not running any more
                for run in history.interrupted_runs():
                    if run.job_id == spec.job_id:
                        history.mark_interrupted(run.id, "its fleet worker was lost; retried")
            alerts = Alerts(history, self.loaded.config.alerts,
                            list(self.loaded.config.notifications))
            done: list[JobOutcome] = []
            failed: list[BaseException] = []

            def work() -> None:
                try:
                    done.append(run_job(spec, ctx, history, alerts, self.log)[1])
                except BaseException as exc:  # bookkeeping failed; reported by the activity
                    failed.append(exc)

            thread = threading.Thread(target=work, name=f"job-{spec.job_id}", daemon=True)
            thread.start()
            while True:
                thread.join(every)
                if not thread.is_alive():
                    break
                if activity.is_cancelled() or activity.is_worker_shutdown():
                    ctx.cancel.set()
                activity.heartbeat(progress.as_dict(ctx))
            if failed:
                raise failed[0]
            return done[0]
        finally:
            history.close()
