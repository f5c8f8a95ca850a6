"""Adaptive transfer: how many uploads to a remote repository run at once, adapted to the link.

`AimdController` owns a concurrency limit (a `ResizableSemaphore`) and learns from every
upload's outcome: additive increase, multiplicative decrease (AIMD). After a window of
successful uploads whose cost has not risen it allows one more upload at once; a transient
error, a stall or a cost well above the baseline halves the limit. It never goes below
``minimum`` nor above ``maximum``, and it starts at ``start`` (today's number of upload
workers), so a healthy link is never slower than with a fixed number of uploads. The wrapper
that feeds it is `keepwell.backends.wrappers.AdaptiveBackend`; the configured rate limits and
shared budgets stay outside it (they are paid before an upload takes its slot).

Words:
    cost         seconds per byte of one successful upload (sizes below `SMALL` count as
                 `SMALL`: a tiny object costs a round trip whatever its size).
    measured     an upload of at least ``measured_from`` bytes (`MEASURED_FROM`: packs, not
                 index or snapshot objects). Only their costs are compared: a small object's
                 cost is mostly its round trip, many times a pack's cost per byte.
    window       ``window`` measured uploads started under the current limit; their mean
                 cost is compared with the baseline once the window is full.
    baseline     the lowest window cost seen, the link at its best. When the limit is at its
                 minimum and the cost is still well above the baseline, the link itself has
                 changed: the baseline becomes the cost of now.
    generation   counts the decreases. An outcome of an upload that started before the last
                 decrease says nothing about the new limit: it is counted, never acted on (one
                 decrease per congestion event, as TCP does once per round trip).
    decision     a change of the limit: ``("up" | "down", new limit, reason)``.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Literal

from keepwell.errors import ConfigurationError

SMALL = 64 * 1024
MEASURED_FROM = 1024 * 1024
OutcomeKind = Literal["ok", "error", "timeout"]
Reason = Literal["latency", "error", "timeout", "steady"]


@dataclass(frozen=True)
class Outcome:
    """How one upload ended: ``ok`` (with its latency in seconds and its size in bytes),
    ``error`` (a transient one) or ``timeout`` (a stall)."""

    kind: OutcomeKind
    latency: float = 0.0
    size: int = 0

    @property
    def cost(self) -> float:
        return self.latency / max(self.size, SMALL)


@dataclass(frozen=True)
class Decision:
    direction: Literal["up", "down"]
    limit: int
    reason: Reason


class ResizableSemaphore:
    """A counting semaphore whose number of slots may change while it is in use. A smaller
    limit takes effect as the uploads holding slots finish: none is interrupted."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._cond = threading.Condition()
        self._limit = limit
        self._held = 0

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def held(self) -> int:
        return self._held

    def resize(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        with self._cond:
            self._limit = limit
            self._cond.notify_all()

    def acquire(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._held < self._limit)
            self._held += 1

    def release(self) -> None:
        with self._cond:
            if self._held == 0:
                raise ValueError("released more often than acquired")
            self._held -= 1
            self._cond.notify()


class AimdController:
    """The concurrency limit of uploads and the rule that moves it (see the module docstring).

    ``rise``: a window whose cost is at most ``rise`` times the baseline may grow the limit;
    ``high``: a window above ``high`` times the baseline halves it. Between the two the limit
    holds. Thread-safe; `acquire` returns the generation to hand back to `release`.
    """

    def __init__(self, start: int, maximum: int | None = None, minimum: int = 1, *,
                 window: int = 8, rise: float = 1.5, high: float = 3.0,
                 measured_from: int = MEASURED_FROM) -> None:
        maximum = start if maximum is None else maximum
        if not 1 <= minimum <= start <= maximum:
            raise ValueError("need 1 <= minimum <= start <= maximum")
        if window < 1 or not 1.0 <= rise < high:
            raise ValueError("need window >= 1 and 1 <= rise < high")
        self.minimum, self.maximum = minimum, maximum
        self.window, self.rise, self.high = window, rise, high
        self.measured_from = measured_from
        self.slots = ResizableSemaphore(start)
        self._lock = threading.Lock()
        self._costs: list[float] = []
        self.baseline: float | None = None
        self.generation = 0
        self.decisions: list[Decision] = []
        self.successes = 0
        self.errors = 0
        self.timeouts = 0

    @property
    def limit(self) -> int:
        return self.slots.limit

    def acquire(self) -> int:
        self.slots.acquire()
        with self._lock:
            return self.generation

    def release(self, generation: int, outcome: Outcome | None) -> None:
        """Give the slot back; ``outcome`` None: the upload ended in a way that says nothing
        about the link (the object existed, a refusal of the job's own)."""
        try:
            if outcome is not None:
                self.record(generation, outcome)
        finally:
            self.slots.release()

    def record(self, generation: int, outcome: Outcome) -> None:
        """Learn from one upload that started in ``generation``."""
        with self._lock:
            if outcome.kind != "ok":
                if outcome.kind == "timeout":
                    self.timeouts += 1
                else:
                    self.errors += 1
                if generation == self.generation:
                    self._decrease(outcome.kind)
                return
            self.successes += 1
            if generation != self.generation or outcome.size < self.measured_from:
                return
            self._costs.append(outcome.cost)
            if len(self._costs) >= self.window:
                self._judge(sum(self._costs) / len(self._costs))

    def _judge(self, cost: float) -> None:
        self._costs.clear()
        if self.baseline is None or cost < self.baseline:
            self.baseline = cost
        if cost > self.high * self.baseline:
            if self.limit > self.minimum:
                self._decrease("latency")
            else:
                self.baseline = cost  # slow even alone: the link changed, this is its best now
        elif cost <= self.rise * self.baseline and self.limit < self.maximum:
            self._set(self.limit + 1, "up", "steady")

    def _decrease(self, reason: Reason) -> None:
        self._costs.clear()
        self.generation += 1
        if self.limit > self.minimum:
            self._set(max(self.minimum, self.limit // 2), "down", reason)

    def _set(self, limit: int, direction: Literal["up", "down"], reason: Reason) -> None:
        self.slots.resize(limit)
        self.decisions.append(Decision(direction, limit, reason))


def adaptive_enabled(option: object = None) -> bool:
    """Whether uploads adapt: the option (``adaptive``: False turns it off) beats
    ``KEEPWELL_ADAPTIVE`` (``0``/``false``/``off`` turn it off); on by default."""
    if option is not None:
        return bool(option)
    text = os.environ.get("KEEPWELL_ADAPTIVE", "").strip().lower()
    if text in ("", "1", "true", "on", "yes"):
        return True
    if text in ("0", "false", "off", "no"):
        return False
    raise ConfigurationError(f"KEEPWELL_ADAPTIVE={text!r} is neither on nor off",
                             hint="give 1 or 0")
