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
    retention: bool = False  # the source has a retention policy: a step after the backup
    replica: bool = False  # its repository has a replica: a step after the retention
    breaker_threshold: int = 3  # circuit_breaker.failure_threshold
    breaker_reset: float = 900.0  # circuit_breaker.reset_after


@dataclass(frozen=True)
class StreamRequest:
    """One source's streamer kept running on a worker of its site (`FleetStream`)."""

    name: str
    site: str
    queue: str  # the site's streamer queue (keepwell.fleet.target.stream_queue)
    heartbeat_timeout: float = 30.0
    digest: str = ""  # of the source's configuration: a changed one is a new request


@dataclass(frozen=True)
class StepRequest:
    action: str
    name: str
    scheduled_at: float
    site: str
    heartbeat_every: float
    probe: bool = False  # the trial run of a half-open breaker


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


@dataclass(frozen=True)
class BreakerAsk:
    """A run's word to its source's breaker: may it start (``outcome`` None), or how it ended
    (``succeeded``/``failed``). The policy travels with it, so a changed configuration applies
    to the next run."""

    source: str
    site: str
    scheduled_at: float
    failure_threshold: int
    reset_after: float
    probe_ttl: float  # a trial run not reported within this long counts as a failed one
    outcome: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class BreakerVerdict:
    allowed: bool
    state: str  # closed | open | half-open, after the call
    was: str  # the state before it
    failures: int
    retry_at: float | None = None  # open: when a trial run may start


@dataclass
class BreakerMemory:
    """What a breaker carries over when its workflow continues as new."""

    failures: int = 0
    opened_at: float | None = None
    probe_in_flight: bool = False
    probe_started: float | None = None
