"""The workflow of one run: its steps as activities on the site's workers.

A backup run asks its source's breaker first (`SourceBreaker`, through a local activity): an open
breaker skips the run (recorded ``skipped``, no job started). Then its steps: the backup job, the
source's retention, the replica copy, each an activity of its own, then the drill marked
``after_backup``, if any; a drill run is its drill job alone. The backup's end is told to the
breaker. A retention or replica step that fails for good is recorded in the run's result and
the run goes on: the backup stands, its snapshot is committed. Retention and replica only run
for a source that has them (the `RunRequest` says so).

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

`SourceBreaker` is the long-running workflow of one source's circuit breaker: the daemon's
`CircuitBreaker` on the workflow's clock, kept by Temporal, so every worker of the fleet sees
the same one. ``ask`` says whether a run may start (and makes a half-open breaker's trial run),
``report`` records how a run ended; the query ``state`` reads it. A trial run that never reports
(its run was terminated) counts as failed after its ``probe_ttl``.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from keepwell.backends.resilience import CircuitBreaker
    from keepwell.fleet.messages import (
        BreakerAsk,
        BreakerMemory,
        BreakerVerdict,
        BudgetState,
        Lease,
        LeaseGrant,
        LeaseRequest,
        RunRequest,
        RunResult,
        StepRequest,
        StepResult,
        StreamRequest,
    )

WORKFLOW = "keepwell-run"
STREAM_WORKFLOW = "keepwell-stream"
STREAM_ACTIVITY = "keepwell-stream"
STREAM_PREFIX = "keepwell-stream-"  # + the source's name: the id of its stream workflow
JOB_ACTIVITY = "keepwell-job"
RETENTION_ACTIVITY = "keepwell-retention"
REPLICA_ACTIVITY = "keepwell-replica"
BREAKER_ASK_ACTIVITY = "keepwell-breaker-ask"
BREAKER_REPORT_ACTIVITY = "keepwell-breaker-report"
BUDGET_WORKFLOW = "keepwell-budget"
BREAKER_WORKFLOW = "keepwell-breaker"
BUDGET_QUEUE = "keepwell-budgets"  # polled by every worker, whatever its site
BUDGET_UPDATES = 500  # then the budget continues as new, its leases carried over
_CALL = timedelta(seconds=60)  # a breaker call: a round trip to the cluster and the history


def _error(exc: ActivityError) -> str:
    return str(exc.cause) if exc.cause is not None and str(exc.cause) else str(exc)


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

        async def step(activity: str, action: str, name: str, timeout: float,
                       probe: bool = False) -> StepResult:
            request = StepRequest(action=action, name=name, scheduled_at=scheduled,
                                  site=req.site, probe=probe,
                                  heartbeat_every=max(0.2, req.heartbeat_timeout / 4))
            result: StepResult = await workflow.execute_activity(
                activity, request, result_type=StepResult,
                start_to_close_timeout=timedelta(seconds=timeout),
                heartbeat_timeout=timedelta(seconds=req.heartbeat_timeout),
                retry_policy=retry,
            )
            self.done.append(result)
            return result

        if req.action != "backup":
            await step(JOB_ACTIVITY, req.action, req.name, req.timeout)
            return RunResult(steps=self.done)

        ask = BreakerAsk(source=req.name, site=req.site, scheduled_at=scheduled,
                         failure_threshold=req.breaker_threshold, reset_after=req.breaker_reset,
                         probe_ttl=req.attempts * (req.timeout + req.retry_cap))
        verdict = await self._breaker(BREAKER_ASK_ACTIVITY, ask)
        if not verdict.allowed:
            self.done.append(StepResult(
                action="backup", name=req.name, job_id="", status="skipped", attempt=0,
                worker="", details={"reason": "circuit open: the source is paused",
                                    "breaker": verdict.state, "failures": verdict.failures,
                                    "retry_at": verdict.retry_at}))
            return RunResult(steps=self.done)
        try:
            backup = await step(JOB_ACTIVITY, "backup", req.name, req.timeout,
                                probe=verdict.state == "half-open")
        except ActivityError as exc:
            await self._breaker(BREAKER_REPORT_ACTIVITY,
                                replace(ask, outcome="failed", error=_error(exc)))
            raise
        await self._breaker(BREAKER_REPORT_ACTIVITY, replace(ask, outcome="succeeded"))
        follow_ups = [(RETENTION_ACTIVITY, "retention", req.retention),
                      (REPLICA_ACTIVITY, "replica", req.replica)]
        for activity, action, wanted in follow_ups:
            if not wanted:
                continue
            try:
                await step(activity, action, req.name, req.timeout)
            except ActivityError as exc:  # the backup stands: its snapshot is committed
                self.done.append(StepResult(action=action, name=req.name, job_id=backup.job_id,
                                            status="failed", attempt=req.attempts, worker="",
                                            details={"error": _error(exc)}))
        if req.drill:
            await step(JOB_ACTIVITY, "drill", req.drill, req.drill_timeout)
        return RunResult(steps=self.done)

    async def _breaker(self, activity: str, ask: BreakerAsk) -> BreakerVerdict:
        verdict: BreakerVerdict = await workflow.execute_local_activity(
            activity, ask, result_type=BreakerVerdict, start_to_close_timeout=_CALL,
            retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1),
                                     maximum_interval=timedelta(seconds=30),
                                     maximum_attempts=10))
        return verdict

    @workflow.query(name="steps")
    def steps(self) -> list[StepResult]:
        return self.done


@workflow.defn(name=STREAM_WORKFLOW)
class FleetStream:
    """One source's streamer (``keepwell watch`` of a continuous files source, or its ``stream``
    command) kept running as one long activity on a worker of its site, heartbeating; a worker
    that disappears has it started again on another (retries without end, backing off up to a
    minute). Cancelling the workflow stops the streamer (`keepwell fleet apply` does, for a
    source that no longer streams); it waits for the streamer to stop."""

    @workflow.run
    async def run(self, req: StreamRequest) -> None:
        await workflow.execute_activity(
            STREAM_ACTIVITY, req,
            task_queue=req.queue,
            start_to_close_timeout=timedelta(days=3650),
            heartbeat_timeout=timedelta(seconds=req.heartbeat_timeout),
            retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1),
                                     backoff_coefficient=2.0,
                                     maximum_interval=timedelta(seconds=60)),
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )


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


@workflow.defn(name=BREAKER_WORKFLOW)
class SourceBreaker:
    def __init__(self) -> None:
        self.breaker = CircuitBreaker(clock=lambda: workflow.now().timestamp())
        self.probe_started: float | None = None
        self.updates = 0

    @workflow.run
    async def run(self, memory: BreakerMemory) -> None:
        self.breaker.restore(memory.failures, memory.opened_at, memory.probe_in_flight)
        self.probe_started = memory.probe_started
        await workflow.wait_condition(
            lambda: self.updates >= BUDGET_UPDATES
            or workflow.info().is_continue_as_new_suggested())
        await workflow.wait_condition(workflow.all_handlers_finished)
        failures, opened_at, probing = self.breaker.saved()
        workflow.continue_as_new(BreakerMemory(failures, opened_at, probing, self.probe_started))

    def _follow(self, ask: BreakerAsk) -> str:
        """Take the run's policy, drop a trial run that never reported; the state now."""
        self.updates += 1
        self.breaker.failure_threshold = ask.failure_threshold
        self.breaker.reset_after = ask.reset_after
        now = workflow.now().timestamp()
        if (self.breaker.saved()[2] and self.probe_started is not None
                and now - self.probe_started > ask.probe_ttl):
            self.breaker.record_failure()
            self.probe_started = None
        return self.breaker.state

    def _verdict(self, allowed: bool, was: str) -> BreakerVerdict:
        failures, opened_at, _ = self.breaker.saved()
        state = self.breaker.state
        retry_at = opened_at + self.breaker.reset_after if opened_at is not None else None
        return BreakerVerdict(allowed=allowed, state=state, was=was, failures=failures,
                              retry_at=retry_at if state == "open" else None)

    @workflow.update(name="ask")
    def ask(self, ask: BreakerAsk) -> BreakerVerdict:
        was = self._follow(ask)
        allowed = self.breaker.allow()
        if allowed and was == "half-open":
            self.probe_started = workflow.now().timestamp()
        return self._verdict(allowed, was)

    @workflow.update(name="report")
    def report(self, ask: BreakerAsk) -> BreakerVerdict:
        was = self._follow(ask)
        if ask.outcome == "succeeded":
            self.breaker.record_success()
        else:
            self.breaker.record_failure()
        self.probe_started = None
        return self._verdict(True, was)

    @workflow.query(name="state")
    def state(self) -> BreakerVerdict:
        return self._verdict(self.breaker.state == "closed", self.breaker.state)
