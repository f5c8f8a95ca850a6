"""Backoff, circuit breaker and token bucket, driven by a fake clock."""

from __future__ import annotations

import random
import threading

import pytest

from keepwell.backends.resilience import Backoff, CircuitBreaker, TokenBucket
from tests.fakeclock import FakeClock

# --- Backoff -------------------------------------------------------------------------------------


def test_backoff_full_jitter_bounds() -> None:
    b = Backoff(base=0.5, cap=30.0, rng=random.Random(7))
    for attempt in range(12):
        ceiling = min(30.0, 0.5 * 2**attempt)
        delays = [b.delay(attempt) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        # Full jitter: spread over the whole range, not clustered near the ceiling.
        assert min(delays) < ceiling * 0.1
        assert max(delays) > ceiling * 0.9


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    a = Backoff(rng=random.Random(3))
    b = Backoff(rng=random.Random(3))
    assert [a.delay(i) for i in range(10)] == [b.delay(i) for i in range(10)]


def test_backoff_huge_attempt_is_capped() -> None:
    b = Backoff(base=1.0, cap=5.0)
    assert b.ceiling(10_000) == 5.0
    assert 0.0 <= b.delay(10_000) <= 5.0


def test_backoff_rejects_negative() -> None:
    with pytest.raises(ValueError):
        Backoff(base=-1)
    with pytest.raises(ValueError):
        Backoff().delay(-1)


# --- CircuitBreaker ------------------------------------------------------------------------------


def test_breaker_opens_after_threshold_and_probes_after_reset() -> None:
    clock = FakeClock()
    br = CircuitBreaker(failure_threshold=3, reset_after=10.0, clock=clock)
    assert br.state == "closed"
    for _ in range(2):
        assert br.allow()
        br.record_failure()
    assert br.state == "closed"
    br.record_failure()
    assert br.state == "open"
    assert not br.allow()
    clock.advance(9.9)
    assert not br.allow()
    clock.advance(0.2)
    assert br.state == "half-open"
    assert br.allow()  # the probe
    assert not br.allow()  # only one probe at a time
    br.record_success()
    assert br.state == "closed"
    assert br.allow()


def test_breaker_failed_probe_reopens_for_a_full_period() -> None:
    clock = FakeClock()
    br = CircuitBreaker(failure_threshold=1, reset_after=5.0, clock=clock)
    br.record_failure()
    assert br.state == "open"
    clock.advance(5.0)
    assert br.allow()
    br.record_failure()
    assert br.state == "open"
    clock.advance(4.0)
    assert not br.allow()
    clock.advance(1.0)
    assert br.allow()


def test_breaker_success_resets_failure_count() -> None:
    br = CircuitBreaker(failure_threshold=2, clock=FakeClock())
    br.record_failure()
    br.record_success()
    br.record_failure()
    assert br.state == "closed"
    br.record_failure()
    assert br.state == "open"


def test_breaker_single_probe_under_threads() -> None:
    clock = FakeClock()
    br = CircuitBreaker(failure_threshold=1, reset_after=1.0, clock=clock)
    br.record_failure()
    clock.advance(1.0)
    results: list[bool] = []
    lock = threading.Lock()

    def probe() -> None:
        ok = br.allow()
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=probe) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1


# --- TokenBucket ---------------------------------------------------------------------------------


def test_bucket_burst_is_free_then_rate_applies() -> None:
    clock = FakeClock()
    tb = TokenBucket(rate=100.0, burst=50.0, clock=clock, sleep=clock.sleep)
    tb.acquire(50)
    assert clock.slept == []
    tb.acquire(100)
    assert clock.slept == [pytest.approx(1.0)]


def test_bucket_long_run_rate_holds_for_any_request_size() -> None:
    clock = FakeClock()
    tb = TokenBucket(rate=1000.0, clock=clock, sleep=clock.sleep)
    start = clock()
    total = 0
    rng = random.Random(1)
    for _ in range(500):
        n = rng.randint(1, 5000)  # many requests larger than the burst (1000)
        tb.acquire(n)
        total += n
    elapsed = clock() - start
    # The first burst (1000 tokens) is free; everything else is paid at the rate.
    assert elapsed == pytest.approx((total - 1000) / 1000.0, rel=1e-6)


def test_bucket_debt_makes_next_caller_wait() -> None:
    clock = FakeClock()
    tb = TokenBucket(rate=10.0, burst=10.0, clock=clock, sleep=clock.sleep)
    tb.acquire(30)  # 10 free, 20 in debt -> waits 2 s
    assert clock.slept == [pytest.approx(2.0)]
    tb.acquire(10)
    assert clock.slept[-1] == pytest.approx(1.0)


def test_bucket_refills_up_to_burst_only() -> None:
    clock = FakeClock()
    tb = TokenBucket(rate=10.0, burst=5.0, clock=clock, sleep=clock.sleep)
    tb.acquire(5)
    clock.advance(100.0)  # would be 1000 tokens without the cap
    tb.acquire(5)
    assert clock.slept == []
    tb.acquire(5)
    assert clock.slept == [pytest.approx(0.5)]


def test_bucket_unlimited_and_runtime_rate_change() -> None:
    clock = FakeClock()
    for unlimited in (None, 0, -1):
        tb = TokenBucket(rate=unlimited, clock=clock, sleep=clock.sleep)
        tb.acquire(10**12)
        assert clock.slept == []
    tb = TokenBucket(rate=None, clock=clock, sleep=clock.sleep)
    tb.rate = 100.0
    assert tb.rate == 100.0
    tb.acquire(100)  # the new burst is full
    tb.acquire(100)
    assert clock.slept == [pytest.approx(1.0)]
    tb.rate = 1000.0
    tb.acquire(1000)
    assert clock.slept[-1] == pytest.approx(1.0)
    tb.rate = None
    n = len(clock.slept)
    tb.acquire(10**9)
    assert len(clock.slept) == n


def test_bucket_is_thread_safe() -> None:
    # 8 threads take 12,000 tokens in 100s from a bucket of 20,000/s with a 2,000 burst while the
    # clock stands still: the first 20 takes fit the burst, and the other 100 each wait for their
    # own place in the debt, k * 100 / 20,000 s. A lost update would repeat or skip a place.
    clock = FakeClock()
    frozen = FakeClock()
    tb = TokenBucket(rate=20_000.0, burst=2_000.0, clock=frozen, sleep=clock.sleep)

    def worker() -> None:
        for _ in range(15):
            tb.acquire(100)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(clock.slept) == pytest.approx([k * 100 / 20_000 for k in range(1, 101)])
