"""The values a run carries between the client, the workflow and the activities.

Plain dataclasses with no keepwell imports: the workflow sandbox re-imports the workflow's module
on every run and must not pull the control plane in with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunRequest:
    """One run: an action on a configured source or drill, and how its steps are retried."""

    action: str  # backup | drill
    name: str
    site: str
    scheduled_at: float | None = None  # None: the time the workflow starts (scheduled runs)
    drill: str | None = None  # a drill to run after a successful backup
    attempts: int = 3
    retry_base: float = 30.0
    retry_cap: float = 1800.0
    timeout: float = 6 * 3600.0
    heartbeat_timeout: float = 30.0
    drill_timeout: float = 6 * 3600.0


@dataclass(frozen=True)
class StepRequest:
    action: str
    name: str
    scheduled_at: float
    site: str
    heartbeat_every: float


@dataclass
class StepResult:
    action: str
    name: str
    job_id: str
    status: str
    attempt: int
    worker: str
    snapshot_id: str | None = None
    bytes_read: int | None = None
    bytes_stored: int | None = None
    bytes_uploaded: int = 0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    steps: list[StepResult] = field(default_factory=list)


@dataclass
class Lease:
    """One holder of (or candidate for) a budget's slot, until ``expires`` unless renewed."""

    lease: str
    holder: str
    since: float
    expires: float
    granted: float | None = None


@dataclass(frozen=True)
class LeaseRequest:
    lease: str
    holder: str
    ttl: float
    cap: int | None  # None: no cap on holders (a bandwidth budget shared by all of them)


@dataclass(frozen=True)
class LeaseGrant:
    granted: bool
    holders: int
    waiting: int


@dataclass
class BudgetState:
    held: list[Lease] = field(default_factory=list)
    waiting: list[Lease] = field(default_factory=list)
