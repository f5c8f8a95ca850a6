"""The workflow of one run: its job as an activity on the site's workers, then its drill.

Retries are Temporal's: each step is an activity with the source's retry policy (attempts,
exponential backoff from ``base`` capped at ``cap``) and a heartbeat timeout, so a step whose
worker disappears is retried on another worker of the same site. The workflow holds no
keepwell logic beyond the order of its steps (it runs in the SDK's sandbox).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from keepwell.fleet.messages import RunRequest, RunResult, StepRequest, StepResult

WORKFLOW = "keepwell-run"
JOB_ACTIVITY = "keepwell-job"


@workflow.defn(name=WORKFLOW)
class FleetRun:
    def __init__(self) -> None:
        self.done: list[StepResult] = []

    @workflow.run
    async def run(self, req: RunRequest) -> RunResult:
        scheduled = req.scheduled_at if req.scheduled_at is not None else workflow.now().timestamp()
        retry = RetryPolicy(initial_interval=timedelta(seconds=req.retry_base),
                            backoff_coefficient=2.0,
                            maximum_interval=timedelta(seconds=max(req.retry_cap, req.retry_base)),
                            maximum_attempts=req.attempts)
        steps = [(req.action, req.name, req.timeout)]
        if req.action == "backup" and req.drill:
            steps.append(("drill", req.drill, req.drill_timeout))
        for action, name, timeout in steps:
            step = StepRequest(action=action, name=name, scheduled_at=scheduled, site=req.site,
                               heartbeat_every=max(0.2, req.heartbeat_timeout / 4))
            result = await workflow.execute_activity(
                JOB_ACTIVITY, step, result_type=StepResult,
                start_to_close_timeout=timedelta(seconds=timeout),
                heartbeat_timeout=timedelta(seconds=req.heartbeat_timeout),
                retry_policy=retry,
            )
            self.done.append(result)
        return RunResult(steps=self.done)

    @workflow.query(name="steps")
    def steps(self) -> list[StepResult]:
        return self.done
