"""Adaptive transfer: how many uploads to a remote repository run at once, and how fast they
are sent, adapted to the link.

`AimdController` owns a concurrency limit (a `ResizableSemaphore`) and a pacing rate (a
`keepwell.backends.resilience.TokenBucket`) and learns from every upload's outcome: additive
increase, multiplicative decrease (AIMD).

* Concurrency: after a window of successful uploads whose cost has not risen it allows one
  more upload at once; a transient error, a stall or a cost well above the baseline halves the
  limit. It never goes below ``minimum`` nor above ``maximum``, and it starts at ``start``
  (today's number of upload workers), so a healthy link is never slower than with a fixed
  number of uploads.
* Pacing (of measured uploads: packs): unlimited until the first congestion event, so a
  healthy link is never slowed.
  A congestion event sets the rate to ``back_off`` times the throughput of the last window
  (never more than ``back_off`` times the rate in force); each good window in which the link
  delivered what the rate allowed adds ``increase`` times that throughput. The rate never goes
  above ``ceiling`` (the configured rate limits and budgets): where it would, pacing stops and
  the budgets alone hold.

The wrapper that feeds it is `keepwell.backends.wrappers.AdaptiveBackend`: an upload pays the
pacing rate, then takes its slot; the configured rate limits and shared budgets stay outside it
(they are paid before). Every decision is logged (logger ``keepwell.backends.adaptive``) and
kept in `AimdController.decisions` and `AimdController.rate_decisions`.

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
    congestion   what lowers the pacing rate: a transient error, a stall, or a window whose
                 cost is more than ``slow`` times the baseline while the limit is at its
                 minimum (the link itself got slower). A cost well above the baseline with
                 more uploads at once only lowers their number. Errors and stalls after the
                 first, with no success between them, are one outage: they lower the number
                 of uploads, not the rate again.
    throughput   bytes per second that the link delivered over the last window: the bytes of
                 the uploads that ended since the earliest start among the last ``window``
                 successful uploads (or the end of the one before them, if earlier), divided
                 by the time since then. Only measured uploads count: a few small objects
                 spread over minutes would make a fast link look slow. For an error or a stall
                 the time ends with the last successful upload: what the link delivered while
                 it worked, not diluted by the outage.
    good window  a full window whose cost is at most ``rise`` times the baseline; the pacing
                 rate grows only if the throughput also reached ``fill`` times the rate (else
                 the link or the data, not the pacing, set the pace).
    rate decision  a change of the pacing rate: ``("up" | "down", new rate or None for
                 unlimited, reason, throughput it was based on)``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Literal

from keepwell.backends.resilience import Clock, Sleep, TokenBucket
from keepwell.errors import ConfigurationError

log = logging.getLogger(__name__)

SMALL = 64 * 1024
MEASURED_FROM = 1024 * 1024
MIN_RATE = 16 * 1024  # bytes per second: the pacing rate never goes below it
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


@dataclass(frozen=True)
class RateDecision:
    direction: Literal["up", "down"]
    rate: float | None  # bytes per second; None: unlimited (the configured budgets hold)
    reason: Reason
    throughput: float | None  # what the link delivered over the last window (bytes/s)


def _rate_text(rate: float | None) -> str:
    return "unlimited" if rate is None else f"{rate / 1024:.0f} KiB/s"


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
    """The concurrency limit and the pacing rate of uploads, and the rule that moves them (see
    the module docstring).

    ``rise``: a window whose cost is at most ``rise`` times the baseline may grow the limit;
    ``high``: a window above ``high`` times the baseline halves it. Between the two the limit
    holds. ``slow``: at the minimum limit, a window above ``slow`` times the baseline is a
    congestion event and its cost the new baseline (default: 2, within ``rise`` and ``high``).
    ``back_off``, ``increase``, ``fill``, ``ceiling``: the pacing rule (module docstring,
    bytes per second for ``ceiling``). ``pace`` False: no pacing (only the number of uploads
    adapts). ``name``: the repository, as the metrics label it. Thread-safe; `acquire` returns
    the generation to hand back to `release`. ``clock`` and ``sleep`` are injected for tests.
    """

    def __init__(self, start: int, maximum: int | None = None, minimum: int = 1, *,
                 window: int = 8, rise: float = 1.5, high: float = 3.0, slow: float | None = None,
                 measured_from: int = MEASURED_FROM, pace: bool = True,
                 back_off: float = 0.8, increase: float = 0.25, fill: float = 0.85,
                 ceiling: float | None = None, clock: Clock = time.monotonic,
                 sleep: Sleep = time.sleep, name: str = "") -> None:
        maximum = start if maximum is None else maximum
        slow = min(max(2.0, rise), high) if slow is None else slow
        if not 1 <= minimum <= start <= maximum:
            raise ValueError("need 1 <= minimum <= start <= maximum")
        if window < 1 or not 1.0 <= rise <= slow <= high or rise == high:
            raise ValueError("need window >= 1 and 1 <= rise <= slow <= high, rise < high")
        if not 0 < back_off < 1 or increase <= 0 or not 0 < fill <= 1:
            raise ValueError("need 0 < back_off < 1, increase > 0 and 0 < fill <= 1")
        self.minimum, self.maximum = minimum, maximum
        self.window, self.rise, self.high, self.slow = window, rise, high, slow
        self.measured_from = measured_from
        self.pace_uploads = pace
        self.back_off, self.increase, self.fill = back_off, increase, fill
        self.ceiling = ceiling if ceiling and ceiling > 0 else None
        self.slots = ResizableSemaphore(start)
        self.pacing = TokenBucket(None, clock=clock, sleep=sleep)
        self.clock = clock  # what latencies and the throughput are timed with
        self._lock = threading.Lock()
        self._costs: list[float] = []
        # (start, end, bytes) of recent successful uploads, in the order they ended
        self._done: deque[tuple[float, float, int]] = deque(maxlen=256)
        self.baseline: float | None = None
        self.generation = 0
        self.decisions: list[Decision] = []
        self.rate_decisions: list[RateDecision] = []
        self.successes = 0
        self.errors = 0
        self.timeouts = 0
        self.name = name  # the repository it uploads to, for the metrics
        _LIVE.add(self)
        self._failing = False  # failures since the last success lowered the rate already

    @property
    def limit(self) -> int:
        return self.slots.limit

    @property
    def rate(self) -> float | None:
        """The pacing rate in bytes per second; None: unlimited."""
        return self.pacing.rate

    def pace(self, size: int) -> None:
        """Pay for ``size`` bytes at the pacing rate (at once while it is unlimited). Uploads
        below ``measured_from`` pass free: a session's heartbeat, an index or a snapshot object
        never waits behind the packs' turn (a heartbeat held back would let the session look
        stale), and their few bytes do not count in the throughput either."""
        if self.pace_uploads and size >= self.measured_from:
            self.pacing.acquire(size)

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

    def throughput(self) -> float | None:
        """Bytes per second the link delivered over the last window (None: nothing yet)."""
        with self._lock:
            return self._throughput()

    def _throughput(self, until: float | None = None) -> float | None:
        done = list(self._done)
        if not done:
            return None
        since = min(start for start, _, _ in done[-self.window:])
        if len(done) > self.window:
            since = min(since, done[-self.window - 1][1])
        span = (self.clock() if until is None else until) - since
        if span <= 0:
            return None
        return sum(size for _, end, size in done if end > since) / span

    def record(self, generation: int, outcome: Outcome) -> None:
        """Learn from one upload that started in ``generation``."""
        with self._lock:
            if outcome.kind != "ok":
                if outcome.kind == "timeout":
                    self.timeouts += 1
                else:
                    self.errors += 1
                if generation == self.generation:
                    # a link that fails again before anything got through says nothing new
                    # about its speed: the rate is lowered once per outage, not per retry
                    self._congestion(outcome.kind, pacing=not self._failing)
                    self._failing = True
                return
            self.successes += 1
            self._failing = False
            if outcome.size < self.measured_from:
                return
            now = self.clock()
            self._done.append((now - outcome.latency, now, outcome.size))
            if generation != self.generation:
                return
            self._costs.append(outcome.cost)
            if len(self._costs) >= self.window:
                self._judge(sum(self._costs) / len(self._costs))

    def _judge(self, cost: float) -> None:
        self._costs.clear()
        if self.baseline is None or cost < self.baseline:
            self.baseline = cost
        if cost > self.high * self.baseline and self.limit > self.minimum:
            self._congestion("latency", pacing=False)
        elif cost > self.slow * self.baseline and self.limit == self.minimum:
            self.baseline = cost  # slow even alone: the link changed, this is its best now
            self._congestion("latency", pacing=True)
        elif cost <= self.rise * self.baseline:
            if self.limit < self.maximum:
                self._set(self.limit + 1, "up", "steady")
            self._faster()

    def _congestion(self, reason: Reason, *, pacing: bool) -> None:
        self._costs.clear()
        self.generation += 1
        if self.limit > self.minimum:
            self._set(max(self.minimum, self.limit // 2), "down", reason)
        if pacing and self.pace_uploads:
            self._slower(reason)

    def _set(self, limit: int, direction: Literal["up", "down"], reason: Reason) -> None:
        self.slots.resize(limit)
        self.decisions.append(Decision(direction, limit, reason))
        log.info("uploads at once: %d (%s: %s)", limit, direction, reason)

    def _slower(self, reason: Reason) -> None:
        # What the link delivered while it delivered: up to the end of the last upload that got
        # through, so that the time a stall or a cut has lasted is not taken for a slow link
        # (measured up to now, a stall's own minutes would bring the rate down to its floor, and
        # each retry would wait its turn at that rate before it is even sent).
        until = self._done[-1][1] if reason in ("error", "timeout") and self._done else None
        measured, rate = self._throughput(until), self.rate
        if measured is None and rate is None:
            return  # nothing measured yet: no rate to fall back from
        basis = min(r for r in (measured, rate) if r is not None)
        new = max(MIN_RATE, self.back_off * basis)
        self._set_rate(min(new, self.ceiling) if self.ceiling else new, "down", reason, measured)

    def _faster(self) -> None:
        rate = self.rate
        if rate is None:
            return
        measured = self._throughput()
        if measured is None or measured < self.fill * rate:
            return  # the link or the data set the pace, not the pacing: more would not help
        new: float | None = rate + self.increase * measured
        if self.ceiling is not None and new is not None and new >= self.ceiling:
            new = None  # the configured budgets hold from here
        self._set_rate(new, "up", "steady", measured)

    def _set_rate(self, rate: float | None, direction: Literal["up", "down"], reason: Reason,
                  measured: float | None) -> None:
        self.pacing.rate = rate
        self.rate_decisions.append(RateDecision(direction, rate, reason, measured))
        log.info("upload pacing: %s (%s: %s; link delivered %s)", _rate_text(rate), direction,
                 reason, "nothing yet" if measured is None else _rate_text(measured))


_LIVE: weakref.WeakSet[AimdController] = weakref.WeakSet()


def live_controllers() -> list[AimdController]:
    """The controllers of this process's open repositories (for the daemon's metrics)."""
    return list(_LIVE)


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
