"""Adaptive uploads over a real link: S3 (SeaweedFS) behind the proxy, whose upstream bandwidth
is capped for all connections together, then changed or freed again. The controller must take
fewer uploads at once when the cap falls and more when it is lifted, and its pacing rate must
follow the cap. Decisions, byte counts (the proxy's own) and rates are asserted, never
durations.
"""

# ruff: noqa: F811
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from keepwell.backends.adaptive import AimdController, Decision
from keepwell.backends.wrappers import AdaptiveBackend
from keepwell.errors import BackendError
from tests.fault.test_network_faults import Remote, retrying, s3_remote  # noqa: F401
from tests.servers.proxy import FaultProxy
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration]

SIZE = 128 * 1024  # small, so the backend does not measure the link itself (and wait longer)
CAP = 512 * 1024  # bytes per second: four uploads at once take a second each
CAP_FIRST = 3 * CAP  # sixteen at once take 1.3 s, well within the 3 s an answer is waited for


def upload_until(put: Callable[[str], None], done: Callable[[], bool], most: int,
                 threads: int = 4) -> int:
    """Upload batches of ``threads`` objects until ``done()`` or ``most`` uploads; how many."""
    n = 0
    with ThreadPoolExecutor(threads) as pool:
        while n < most and not done():
            list(pool.map(put, [f"data/{uuid.uuid4().hex}" for _ in range(threads)]))
            n += threads
    return n


def test_s3_uploads_follow_a_bandwidth_cap_down_and_up(s3_remote: Remote) -> None:
    proxy = s3_remote.proxy
    controller = AimdController(4, window=4, measured_from=SIZE)
    backend = retrying(AdaptiveBackend(s3_remote.via_proxy(f"aimd-{uuid.uuid4().hex[:8]}"),
                                       controller))
    payload = b"\xa5" * SIZE

    def put(name: str) -> None:
        backend.put(name, payload)

    try:
        # the free link: the baseline
        upload_until(put, lambda: controller.baseline is not None, 16)
        assert controller.baseline is not None
        assert controller.limit == 4

        proxy.throttle_link(CAP)
        before = len(controller.decisions)
        upload_until(put, lambda: controller.limit == 1, 64)
        capped = controller.decisions[before:]
        assert capped and all(d.direction == "down" for d in capped[:2]), capped
        assert controller.limit == 1, controller.decisions

        proxy.clear()
        before = len(controller.decisions)
        upload_until(put, lambda: controller.limit >= 3, 256)
        freed = controller.decisions[before:]
        assert freed and freed[0].direction == "up", freed
        assert controller.limit >= 3
    finally:
        proxy.clear()
    assert controller.errors == 0 and controller.timeouts == 0
    assert controller.slots.held == 0


def capped_uploads(remote: Remote, controller: AimdController, threads: int) -> AimdController:
    """Upload ``threads`` objects at a time: a batch on the free link, two on a link capped to
    `CAP_FIRST` (slower, no stall yet), two on one capped to `CAP` (each upload of ``threads``
    at once longer than the backend waits for an answer); ``controller`` counts what the
    uploads met."""
    backend = retrying(AdaptiveBackend(remote.via_proxy(f"aimd-{uuid.uuid4().hex[:8]}"),
                                       controller))
    payload = b"\x5a" * SIZE

    def put(name: str) -> None:
        try:
            backend.put(name, payload)
        except BackendError:
            pass  # given up after its attempts: the attempts are counted

    try:
        upload_until(put, lambda: controller.baseline is not None, threads, threads)
        remote.proxy.throttle_link(CAP_FIRST)
        upload_until(put, lambda: False, 2 * threads, threads)
        remote.proxy.throttle_link(CAP)
        upload_until(put, lambda: False, 2 * threads, threads)
    finally:
        remote.proxy.clear()
    assert controller.slots.held == 0
    return controller


def test_s3_fewer_failed_attempts_than_with_a_fixed_high_concurrency(s3_remote: Remote) -> None:
    """The first cap makes sixteen uploads at once slower without a stall: the adaptive number
    falls on their latency alone. Under the second cap, sixteen at once stall (each waits longer
    than the backend waits for an answer, 3 s): the fixed number meets those stalls, the
    adaptive one, already low, does not."""
    fixed = capped_uploads(s3_remote, AimdController(16, minimum=16, window=4, measured_from=SIZE,
                                                     pace=False), 16)
    adaptive = capped_uploads(s3_remote, AimdController(16, window=4, measured_from=SIZE), 16)
    print(f"fixed: {fixed.successes} ok, {fixed.errors} errors, {fixed.timeouts} stalls; "
          f"adaptive: {adaptive.successes} ok, {adaptive.errors} errors, "
          f"{adaptive.timeouts} stalls, decisions {adaptive.decisions}")
    assert fixed.decisions == []
    assert fixed.errors + fixed.timeouts > 0
    assert adaptive.decisions[0] == Decision("down", 8, "latency"), adaptive.decisions
    assert adaptive.errors + adaptive.timeouts < fixed.errors + fixed.timeouts
    assert adaptive.limit < 16


# --- the pacing rate follows a cap that changes under a running transfer -------------------------

LINK = CAP_FIRST  # the cap of the first and last phase (1.5 MiB/s); the middle one is a third
MIB = 1024 * 1024


@dataclass
class Phase:
    cap: float
    rate: float | None  # the pacing rate at the end of the phase
    throughput: float  # what crossed the proxy over the last third of the phase, bytes/s
    sent: int  # bytes that crossed the proxy in the phase


def sent_since(proxy: FaultProxy, start: int, size: int) -> Callable[[], bool]:
    return lambda: proxy.bytes_up - start >= size


def changing_cap(remote: Remote, controller: AimdController,
                 phases: list[tuple[float, int]], threads: int = 16) -> list[Phase]:
    """``threads`` workers upload without pause while the link's cap takes each ``(cap, bytes)``
    of ``phases`` in turn: the cap is changed once that many bytes crossed the proxy under the
    one before, whatever the uploads in flight."""
    backend = retrying(AdaptiveBackend(remote.via_proxy(f"pace-{uuid.uuid4().hex[:8]}"),
                                       controller))
    payload = b"\x3c" * SIZE
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                backend.put(f"data/{uuid.uuid4().hex}", payload)
            except BackendError:
                pass  # given up after its attempts: the attempts are counted

    proxy = remote.proxy
    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    seen: list[Phase] = []
    try:
        for w in workers:
            w.start()
        wait_for(lambda: controller.baseline is not None, "a baseline on the free link")
        for cap, size in phases:
            proxy.throttle_link(cap)
            start = proxy.bytes_up
            wait_for(sent_since(proxy, start, size * 2 // 3), "two thirds of a phase", timeout=300)
            mark, began = proxy.bytes_up, time.monotonic()
            wait_for(sent_since(proxy, start, size), "the end of a phase", timeout=300)
            tail = (proxy.bytes_up - mark) / (time.monotonic() - began)
            seen.append(Phase(cap, controller.rate, tail, proxy.bytes_up - start))
    finally:
        stop.set()
        proxy.clear()
        for w in workers:
            w.join(timeout=120)
    assert not any(w.is_alive() for w in workers)
    assert controller.slots.held == 0
    return seen


def test_s3_pacing_rate_follows_a_cap_that_falls_and_rises(s3_remote: Remote) -> None:
    """A cap of LINK, then a third of it, then LINK again, changed under sixteen uploaders.
    The pacing rate comes down near the lower cap within 4 MiB and back up within 8 MiB, and
    the throughput follows; sixteen uploads at once without pacing meet stalls under the lower
    cap (sixteen of 128 KiB at 512 KiB/s take longer than the backend waits), the adaptive
    uploads fewer."""
    phases = [(LINK, 8 * MIB), (LINK / 3, 4 * MIB), (LINK, 8 * MIB)]
    fixed = AimdController(16, minimum=16, window=4, measured_from=SIZE, pace=False)
    fixed_seen = changing_cap(s3_remote, fixed, phases)
    adaptive = AimdController(16, window=4, measured_from=SIZE)
    seen = changing_cap(s3_remote, adaptive, phases)
    print(f"fixed: {fixed.successes} ok, {fixed.errors} errors, {fixed.timeouts} stalls, "
          f"phases {fixed_seen}; adaptive: {adaptive.successes} ok, {adaptive.errors} errors, "
          f"{adaptive.timeouts} stalls, phases {seen}, rate decisions {adaptive.rate_decisions}")
    first, low, high = seen
    # the free link and the first cap: pacing, if any, does not hold the uploads below the cap
    assert first.rate is None or first.rate >= 0.5 * LINK, first
    # a third of the cap: the pacing rate came down near it, the throughput is the link's
    assert low.rate is not None and 0.25 * low.cap <= low.rate <= 1.6 * low.cap, low
    assert 0.4 * low.cap <= low.throughput <= 1.2 * low.cap, low
    assert any(d.direction == "down" for d in adaptive.rate_decisions)
    # the cap back up: so is the pacing rate (or it is gone), and the throughput with it
    assert high.rate is None or high.rate >= 0.6 * LINK, high
    assert any(d.direction == "up" for d in adaptive.rate_decisions)
    assert high.throughput >= 0.5 * LINK, high
    # fewer failed attempts than sixteen at once without pacing
    assert fixed.rate_decisions == [] and fixed.decisions == []
    assert fixed.errors + fixed.timeouts > 0
    assert adaptive.errors + adaptive.timeouts < fixed.errors + fixed.timeouts
