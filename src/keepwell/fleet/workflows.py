"""The workflow of one run: its job as an activity on the site's workers, then its drill.

Retries are Temporal's: each step is an activity with the source's retry policy (attempts,
exponential backoff from ``base`` capped at ``cap``) and a heartbeat timeout, so a step whose
worker disappears is retried on another worker of the same site. The workflow holds no
keepwell logic beyond the order of its steps (it runs in the SDK's sandbox).

`Budget` is the long-running workflow of one budget scope (a repository, a database host, a
site's upload bandwidth): it grants leases through Updates. ``acquire`` grants a lease when fewer
than ``cap`` leases are held and the caller is among the first waiting (first come, first
served), or renews a lease already held; a lease not renewed within its ``ttl`` is dropped, so a
killed worker's lease is freed. ``release`` gives one back; the query ``leases`` lists the
holders.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from keepwell.fleet.messages import (
        BudgetState,
        Lease,
        LeaseGrant,
        LeaseRequest,
        RunRequest,
        RunResult,
        StepRequest,
        StepResult,
    )

WORKFLOW = "keepwell-run"
JOB_ACTIVITY = "keepwell-job"
BUDGET_WORKFLOW = "keepwell-budget"
BUDGET_QUEUE = "keepwell-budgets"  # polled by every worker, whatever its site
BUDGET_UPDATES = 500  # then the budget continues as new, its leases carried over


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


@workflow.defn(name=BUDGET_WORKFLOW)
class Budget:
    def __init__(self) -> None:
        self.held: dict[str, Lease] = {}
        self.waiting: dict[str, Lease] = {}
        self.updates = 0

    @workflow.run
    async def run(self, state: BudgetState) -> None:
        for lease in state.held:
            self.held.setdefault(lease.lease, lease)
        for lease in state.waiting:
            self.waiting.setdefault(lease.lease, lease)
        await workflow.wait_condition(
            lambda: self.updates >= BUDGET_UPDATES
            or workflow.info().is_continue_as_new_suggested())
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(BudgetState(held=list(self.held.values()),
                                             waiting=list(self.waiting.values())))

    def _expire(self, now: float) -> None:
        for table in (self.held, self.waiting):
            for key in [k for k, lease in table.items() if lease.expires < now]:
                del table[key]

    def _grant(self, req: LeaseRequest) -> LeaseGrant:
        return LeaseGrant(granted=req.lease in self.held, holders=len(self.held),
                          waiting=len(self.waiting))

    @workflow.update(name="acquire")
    def acquire(self, req: LeaseRequest) -> LeaseGrant:
        now = workflow.now().timestamp()
        self.updates += 1
        self._expire(now)
        held = self.held.get(req.lease)
        if held is not None:
            held.expires = now + req.ttl
            return self._grant(req)
        entry = self.waiting.setdefault(req.lease, Lease(lease=req.lease, holder=req.holder,
                                                         since=now, expires=now))
        entry.expires = now + req.ttl
        free = len(self.waiting) if req.cap is None else req.cap - len(self.held)
        first = sorted(self.waiting.values(), key=lambda lease: (lease.since, lease.lease))
        if req.lease in {lease.lease for lease in first[:max(free, 0)]}:
            del self.waiting[req.lease]
            entry.granted = now
            self.held[req.lease] = entry
        return self._grant(req)

    @workflow.update(name="release")
    def release(self, lease: str) -> None:
        self.updates += 1
        self.held.pop(lease, None)
        self.waiting.pop(lease, None)

    @workflow.query(name="leases")
    def leases(self) -> list[Lease]:
        return sorted(self.held.values(), key=lambda lease: lease.since)
