"""Budgets: a priority queue of ready jobs and the concurrency caps that admit them.

`JobQueue` holds jobs that are due: the highest ``priority`` first, then the earliest scheduled.
`Slots` counts running jobs overall, per repository and per host; `JobQueue.pop_admissible`
returns the best job that fits every cap, so a job blocked by its repository's cap does not hold
back a job for another repository. One job per identity is queued or running at a time (a job
that is still running when its next firing comes is not queued twice).
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from keepwell.control.jobs import JobSpec


@dataclass(frozen=True)
class Caps:
    total: int
    per_repository: int | None = None
    per_host: int | None = None
    repository_overrides: tuple[tuple[str, int], ...] = ()

    def repository_cap(self, repo: str) -> int | None:
        for name, cap in self.repository_overrides:
            if name == repo:
                return cap
        return self.per_repository


class Slots:
    """Running jobs by repository and host, checked against `Caps` (thread-safe)."""

    def __init__(self, caps: Caps) -> None:
        self.caps = caps
        self._lock = threading.Lock()
        self.running = 0
        self.by_repo: Counter[str] = Counter()
        self.by_host: Counter[str] = Counter()
        self.peak = 0
        self.peak_by_repo: Counter[str] = Counter()
        self.peak_by_host: Counter[str] = Counter()

    def fits(self, job: JobSpec) -> bool:
        with self._lock:
            return self._fits(job)

    def _fits(self, job: JobSpec) -> bool:
        if self.running >= self.caps.total:
            return False
        repo_cap = self.caps.repository_cap(job.repository)
        if repo_cap is not None and self.by_repo[job.repository] >= repo_cap:
            return False
        return not (self.caps.per_host is not None
                    and self.by_host[job.host] >= self.caps.per_host)

    def try_take(self, job: JobSpec) -> bool:
        with self._lock:
            if not self._fits(job):
                return False
            self.running += 1
            self.by_repo[job.repository] += 1
            self.by_host[job.host] += 1
            self.peak = max(self.peak, self.running)
            self.peak_by_repo[job.repository] = max(self.peak_by_repo[job.repository],
                                                    self.by_repo[job.repository])
            self.peak_by_host[job.host] = max(self.peak_by_host[job.host],
                                              self.by_host[job.host])
            return True

    def release(self, job: JobSpec) -> None:
        with self._lock:
            self.running -= 1
            self.by_repo[job.repository] -= 1
            self.by_host[job.host] -= 1

    def full(self) -> bool:
        with self._lock:
            return self.running >= self.caps.total


class JobQueue:
    """Ready jobs, best first: higher priority, then earlier scheduled time, then FIFO."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, JobSpec]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._heap)

    def push(self, job: JobSpec) -> None:
        with self._lock:
            heapq.heappush(self._heap, (-job.priority, job.scheduled_at, next(self._seq), job))

    def contains(self, action: str, name: str) -> bool:
        with self._lock:
            return any(j.action == action and j.name == name for *_, j in self._heap)

    def pop_admissible(self, slots: Slots) -> JobSpec | None:
        """Remove and return the best job that fits the caps (its slot already taken)."""
        with self._lock:
            if slots.full():
                return None
            for entry in sorted(self._heap):
                job = entry[3]
                if slots.try_take(job):
                    self._heap.remove(entry)
                    heapq.heapify(self._heap)
                    return job
            return None

    def remove(self, unwanted: Callable[[JobSpec], bool]) -> list[tuple[str, str]]:
        """Drop the queued jobs ``unwanted`` picks; their (action, name)."""
        with self._lock:
            dropped = [entry for entry in self._heap if unwanted(entry[3])]
            for entry in dropped:
                self._heap.remove(entry)
            heapq.heapify(self._heap)
            return [(e[3].action, e[3].name) for e in dropped]

    def drain(self) -> list[JobSpec]:
        with self._lock:
            jobs = [entry[3] for entry in sorted(self._heap)]
            self._heap.clear()
            return jobs
