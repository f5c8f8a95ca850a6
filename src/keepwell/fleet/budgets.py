"""Budgets across the fleet: a job's leases on the `Budget` workflows of its scopes.

The settings are the daemon's, with the same meaning, counted over every worker of the fleet
instead of one daemon: ``limits.max_concurrent_per_repository`` (or a repository's own
``max_concurrent_jobs``) caps the jobs at once on one repository, ``limits.max_concurrent_per_host``
the jobs at once on one database host (a local host or socket counts per machine), and
``limits.upload`` is the upload budget of each site, shared by the jobs running on its workers:
each job holding a lease of its site's budget uploads at ``upload / N``, N the holders of the
budget's live leases, recomputed at every renewal.

A job asks for its leases before it starts, in one fixed order (so two jobs never wait on each
other), renews them while it runs (every heartbeat) and releases them at its end; a lease
not renewed within its ``ttl`` expires, so a killed worker's leases are freed.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy

from keepwell.backends.resilience import TokenBucket
from keepwell.control.config import Config
from keepwell.control.jobs import JobSpec
from keepwell.fleet.messages import BudgetState, LeaseGrant, LeaseRequest
from keepwell.fleet.workflows import BUDGET_QUEUE, Budget

BUDGET_PREFIX = "keepwell-budget-"
_LOCAL = ("localhost", "127.0.0.1", "::1", "")
T = TypeVar("T")


def on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run a call to the cluster on the worker's event loop from a job's thread."""
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)


@dataclass(frozen=True)
class Scope:
    workflow_id: str
    cap: int | None  # None: the site's upload budget (no cap on holders)


def scopes(cfg: Config, spec: JobSpec, site: str) -> list[Scope]:
    """The budgets a job must hold leases of, in the order they are asked for."""
    out = []
    cap = next((r.max_concurrent_jobs for n, r in cfg.repositories.items()
                if n == spec.repository and r.max_concurrent_jobs),
               cfg.limits.max_concurrent_per_repository)
    if cap is not None and spec.repository:
        out.append(Scope(f"{BUDGET_PREFIX}repository-{spec.repository}", cap))
    if cfg.limits.max_concurrent_per_host is not None:
        host = spec.host
        if host in _LOCAL or host.startswith("/"):
            host = f"{socket.gethostname()}:{host}"
        out.append(Scope(f"{BUDGET_PREFIX}host-{host}", cfg.limits.max_concurrent_per_host))
    if cfg.limits.upload:
        out.append(Scope(f"{BUDGET_PREFIX}upload-{site}", None))
    return sorted(out, key=lambda s: s.workflow_id)


class Leases:
    """A job's leases, asked, renewed and released from the job's thread through the worker's
    client on the worker's event loop."""

    def __init__(self, client: Client, loop: asyncio.AbstractEventLoop, lease: str, holder: str,
                 ttl: float, scopes: list[Scope]) -> None:
        self.client = client
        self.loop = loop
        self.lease = lease
        self.holder = holder
        self.ttl = ttl
        self.scopes = scopes
        self.held: list[Scope] = []
        self.grants: dict[str, LeaseGrant] = {}

    def _call(self, coro: Any) -> Any:
        return on_loop(self.loop, coro)

    async def _acquire(self, scope: Scope) -> LeaseGrant:
        start = WithStartWorkflowOperation(
            Budget.run, BudgetState(), id=scope.workflow_id, task_queue=BUDGET_QUEUE,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING)
        grant: LeaseGrant = await self.client.execute_update_with_start_workflow(
            Budget.acquire, LeaseRequest(lease=self.lease, holder=self.holder, ttl=self.ttl,
                                         cap=scope.cap),
            start_workflow_operation=start)
        return grant

    def acquire(self, every: float, waiting: Callable[[str], bool],
                cancelled: threading.Event) -> bool:
        """Take every scope's lease in order, asking again every ``every`` seconds; ``waiting``
        is told the scope waited for (it heartbeats) and returns False to give up."""
        for scope in self.scopes:
            while True:
                try:
                    grant: LeaseGrant | None = self._call(self._acquire(scope))
                except Exception:  # the server away for a while: ask again
                    grant = None
                if grant is not None and grant.granted:
                    self.held.append(scope)
                    self.grants[scope.workflow_id] = grant
                    break
                if not waiting(scope.workflow_id) or cancelled.wait(every):
                    return False
        return True

    def renew(self) -> dict[str, LeaseGrant]:
        """Renew the leases held; the grants that came back (a failed renewal is tried again
        at the next one, the lease's ttl leaves room for a few)."""
        for scope in self.held:
            try:
                self.grants[scope.workflow_id] = self._call(self._acquire(scope))
            except Exception:
                continue
        return self.grants

    def release(self) -> None:
        async def give_back(scope: Scope) -> None:
            await self.client.get_workflow_handle(scope.workflow_id).execute_update(
                Budget.release, self.lease)

        for scope in reversed(self.held):
            try:
                self._call(give_back(scope))
            except Exception:  # it expires after its ttl
                continue
        self.held.clear()


class SiteUpload:
    """The job's share of its site's upload budget: a token bucket whose rate follows the
    number of holders of the site budget's leases."""

    def __init__(self, cfg: Config, site: str) -> None:
        self.rate = cfg.limits.upload
        self.scope = f"{BUDGET_PREFIX}upload-{site}"
        self.bucket = TokenBucket(self.rate, burst=cfg.limits.upload_burst) if self.rate else None

    def follow(self, grants: dict[str, LeaseGrant]) -> None:
        grant = grants.get(self.scope)
        if self.bucket is not None and self.rate and grant is not None and grant.holders:
            self.bucket.rate = self.rate / grant.holders
