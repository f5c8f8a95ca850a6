"""Resilience primitives: backoff with jitter, a circuit breaker and a token bucket.

They know nothing of backends; the wrappers in `keepwell.backends.wrappers` and the control plane
both build on them. Time is injected (``clock``, ``sleep``, ``rng``) so tests run without waiting.

Words:
    attempt       0 for the first retry, 1 for the second, ...
    full jitter   the delay is drawn uniformly from ``[0, min(cap, base * 2**attempt)]``, which
                  spreads retries of many clients best (AWS architecture blog, "Exponential
                  Backoff and Jitter").
    probe         the single call a half-open breaker lets through to test the service.
    debt          a token bucket may go below zero when one request is larger than the burst; the
                  next callers then wait until it is paid back.
    stall time    how long a request may go without progress before it counts as stalled
                  (``KEEPWELL_STALL_TIMEOUT``, default 30 s); the backends detect it, the retry
                  wrapper retries a stall a bounded number of times.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from typing import Literal

from keepwell.errors import ConfigurationError

STALL_TIMEOUT = 30.0  # seconds without progress on a request after which it counts as stalled


def stall_timeout() -> float:
    """The stall time: ``KEEPWELL_STALL_TIMEOUT`` (seconds), else `STALL_TIMEOUT`."""
    text = os.environ.get("KEEPWELL_STALL_TIMEOUT", "").strip()
    if not text:
        return STALL_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 86400:
        raise ConfigurationError(f"KEEPWELL_STALL_TIMEOUT={text!r} is not a number of seconds",
                                 hint="give a positive number, e.g. 30")
    return value


Clock = Callable[[], float]
Sleep = Callable[[float], None]
BreakerState = Literal["closed", "open", "half-open"]


class Backoff:
    """Exponential backoff with full jitter."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None):
        if base < 0 or cap < 0:
            raise ValueError("backoff base and cap must not be negative")
        self.base = base
        self.cap = cap
        self._rng = rng if rng is not None else random.Random()

    def ceiling(self, attempt: int) -> float:
        """The largest delay ``delay(attempt)`` can return."""
        if attempt < 0:
            raise ValueError("attempt must not be negative")
        # 2**attempt overflows a float only for absurd attempts; clamp before multiplying.
        return min(self.cap, self.base * 2.0 ** min(attempt, 64))

    def delay(self, attempt: int) -> float:
        return self._rng.uniform(0.0, self.ceiling(attempt))


class CircuitBreaker:
    """Stops calling a failing service for a while, then lets one probe through.

    closed: calls pass; ``failure_threshold`` consecutive failures open it.
    open: calls are refused until ``reset_after`` seconds have passed since it opened.
    half-open: one probe passes; its success closes the breaker, its failure opens it again.
    """

    def __init__(
        self, failure_threshold: int = 5, reset_after: float = 30.0, clock: Clock = time.monotonic
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.failure_threshold = failure_threshold
        self.reset_after = reset_after
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state_locked()

    def _state_locked(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        if self._probe_in_flight or self._clock() - self._opened_at >= self.reset_after:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        with self._lock:
            state = self._state_locked()
            if state == "closed":
                return True
            if state == "open" or self._probe_in_flight:
                return False
            self._probe_in_flight = True
            return True

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._probe_in_flight = False

    def record_failure(self, weight: int = 1) -> None:
        """A failure; ``weight`` counts it as that many (a costly one)."""
        with self._lock:
            self._failures += weight
            if self._probe_in_flight or self._opened_at is not None:
                # A failed probe (or a late failure while open) restarts the wait.
                self._opened_at = self._clock()
                self._probe_in_flight = False
            elif self._failures >= self.failure_threshold:
                self._opened_at = self._clock()

    def saved(self) -> tuple[int, float | None, bool]:
        """What the breaker remembers: consecutive failures, when it opened (on its clock),
        whether a probe is in flight; `restore` takes it back (a breaker kept elsewhere)."""
        with self._lock:
            return self._failures, self._opened_at, self._probe_in_flight

    def restore(self, failures: int, opened_at: float | None, probe_in_flight: bool) -> None:
        with self._lock:
            self._failures, self._opened_at = failures, opened_at
            self._probe_in_flight = probe_in_flight


class TokenBucket:
    """A thread-safe token bucket: ``rate`` tokens per second, at most ``burst`` saved up.

    ``acquire(n)`` takes ``n`` tokens, sleeping as long as needed. A request larger than the burst
    is allowed: the bucket goes into debt and later callers wait it off, so the long-run rate holds
    whatever the request sizes. ``rate`` may be changed at any time; ``None`` or ``<= 0`` means
    unlimited. The default burst is one second's worth of tokens.
    """

    def __init__(
        self,
        rate: float | None,
        burst: float | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._rate: float | None = None
        self._explicit_burst = burst
        self._burst = 0.0
        self._tokens = 0.0
        self._stamp = clock()
        self.rate = rate

    @property
    def rate(self) -> float | None:
        return self._rate

    @rate.setter
    def rate(self, value: float | None) -> None:
        with self._lock:
            self._refill_locked()
            was_unlimited = self._rate is None
            self._rate = value if value is not None and value > 0 else None
            if self._rate is None:
                self._burst = 0.0
                self._tokens = 0.0
            else:
                self._burst = self._explicit_burst if self._explicit_burst else self._rate
                # Leaving "unlimited" starts with a full bucket; a change of rate keeps any debt.
                self._tokens = self._burst if was_unlimited else min(self._tokens, self._burst)

    @property
    def burst(self) -> float:
        return self._burst

    def _refill_locked(self) -> None:
        now = self._clock()
        if self._rate is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def acquire(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self._refill_locked()
            if self._rate is None:
                return
            # Take the tokens now (possibly into debt) and wait until the balance is back to zero:
            # callers are served in order and the rate holds however large n is.
            self._tokens -= n
            wait = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
