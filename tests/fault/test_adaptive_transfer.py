"""Adaptive uploads over a real link: S3 (SeaweedFS) behind the proxy, whose upstream bandwidth
is capped for all connections together, then freed again. The controller must take fewer
uploads at once when the cap falls and more when it is lifted. Decisions and counts are
asserted, never durations.
"""

# ruff: noqa: F811
from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from keepwell.backends.adaptive import AimdController, Decision
from keepwell.backends.wrappers import AdaptiveBackend
from keepwell.errors import BackendError
from tests.fault.test_network_faults import Remote, retrying, s3_remote  # noqa: F401

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
    fixed = capped_uploads(s3_remote, AimdController(16, minimum=16, window=4, measured_from=SIZE), 16)
    adaptive = capped_uploads(s3_remote, AimdController(16, window=4, measured_from=SIZE), 16)
    print(f"fixed: {fixed.successes} ok, {fixed.errors} errors, {fixed.timeouts} stalls; "
          f"adaptive: {adaptive.successes} ok, {adaptive.errors} errors, "
          f"{adaptive.timeouts} stalls, decisions {adaptive.decisions}")
    assert fixed.decisions == []
    assert fixed.errors + fixed.timeouts > 0
    assert adaptive.decisions[0] == Decision("down", 8, "latency"), adaptive.decisions
    assert adaptive.errors + adaptive.timeouts < fixed.errors + fixed.timeouts
    assert adaptive.limit < 16
