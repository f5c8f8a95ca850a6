"""The fleet's circuit breakers: one `SourceBreaker` workflow per source, asked by every worker.

The setting is the daemon's, ``circuit_breaker`` (``failure_threshold``, ``reset_after``), with
the same rule (`keepwell.backends.resilience.CircuitBreaker`): after ``failure_threshold``
backup runs of a source failed in a row, its runs are skipped (recorded ``skipped``, no job
started) until ``reset_after`` has passed, then one trial run goes; its success closes the
breaker, its failure opens it again. In the fleet a run counts as failed when its backup step
failed after all its attempts (Temporal's retries of one run are not counted one by one). The
state is kept by Temporal in the workflow ``keepwell-breaker-SOURCE`` (its query ``state``), so
runs of one source landing on different workers see the same breaker.
"""

from __future__ import annotations

from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy

from keepwell.fleet.messages import BreakerAsk, BreakerMemory, BreakerVerdict
from keepwell.fleet.workflows import BUDGET_QUEUE, SourceBreaker

BREAKER_PREFIX = "keepwell-breaker-"
SKIP_REASON = "circuit open: the source is paused"  # the daemon's words for the same skip


def breaker_id(source: str) -> str:
    return f"{BREAKER_PREFIX}{source}"


async def tell_breaker(client: Client, ask: BreakerAsk) -> BreakerVerdict:
    """Ask the source's breaker whether a run may start (``ask.outcome`` None) or tell it how a
    run ended; the breaker's workflow is started on first use."""
    start = WithStartWorkflowOperation(
        SourceBreaker.run, BreakerMemory(), id=breaker_id(ask.source), task_queue=BUDGET_QUEUE,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING)
    update = SourceBreaker.ask if ask.outcome is None else SourceBreaker.report
    verdict: BreakerVerdict = await client.execute_update_with_start_workflow(
        update, ask, start_workflow_operation=start)
    return verdict
