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

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from keepwell.control.alerts import Alerts
from keepwell.control.config import LoadedConfig
from keepwell.control.history import open_history
from keepwell.control.jobs import JobContext, JobOutcome, JobSpec, build_job
from keepwell.control.runner import run_job
from keepwell.fleet.budgets import Leases, SiteUpload, scopes
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
    """The activities of one worker: its configuration, its site, its client to the cluster
    (for the leases of the fleet's budgets, `keepwell.fleet.budgets`)."""

    def __init__(self, loaded: LoadedConfig, site: str, identity: str,
                 log: logging.Logger, client: Client, loop: asyncio.AbstractEventLoop) -> None:
        self.loaded = loaded
        self.site = site
        self.identity = identity
        self.log = log
        self.client = client
        self.loop = loop

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
        upload = SiteUpload(cfg, self.site)
        ctx = JobContext(shared_upload=upload.bucket, timeout=spec.timeout, listener=progress)
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
                raise ApplicationError(f"{spec.action} {spec.name}: cancelled while waiting "
                                       "for a budget", type="Cancelled")
            upload.follow(leases.grants)
            outcome = self._run(spec, ctx, progress, step.heartbeat_every,
                                lambda: upload.follow(leases.renew()))
        finally:
            leases.release()
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
             every: float, renew: Callable[[], None]) -> JobOutcome:
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
                renew()
            if failed:
                raise failed[0]
            return done[0]
        finally:
            history.close()
