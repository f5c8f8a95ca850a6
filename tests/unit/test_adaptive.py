"""The AIMD controller of adaptive uploads, fed synthetic outcomes, and its wrapper and wiring."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from keepwell.backends.adaptive import (
    SMALL,
    AimdController,
    Decision,
    Outcome,
    ResizableSemaphore,
    adaptive_enabled,
)
from keepwell.backends.memory import MemoryBackend
from keepwell.backends.wrappers import AdaptiveBackend, RetryingBackend, wrap
from keepwell.cli.common import GLOBALS, repository_options
from keepwell.errors import ConfigurationError, StallError, TransientBackendError
from keepwell.repository.packer import UPLOAD_WORKERS
from keepwell.repository.repo import open_storage

MIB = 1024 * 1024


def ok(seconds: float, size: int = MIB) -> Outcome:
    return Outcome("ok", seconds, size)


def feed(c: AimdController, outcomes: list[Outcome]) -> None:
    """Each outcome as an upload started under the controller's current state."""
    for o in outcomes:
        c.record(c.generation, o)


def test_steady_link_grows_one_per_window_up_to_the_maximum() -> None:
    c = AimdController(4, maximum=6, window=4)
    feed(c, [ok(1.0)] * 4)
    assert c.limit == 5
    feed(c, [ok(1.0)] * 3)
    assert c.limit == 5  # a window is not full yet
    feed(c, [ok(1.0)] * 1 + [ok(1.0)] * 4 * 5)
    assert c.limit == 6
    assert c.decisions == [Decision("up", 5, "steady"), Decision("up", 6, "steady")]


def test_start_is_the_maximum_by_default_and_a_healthy_link_keeps_it() -> None:
    c = AimdController(4, window=4)
    feed(c, [ok(0.5)] * 40)
    assert c.limit == 4
    assert c.decisions == []


def test_an_error_halves_once_per_generation() -> None:
    c = AimdController(8, window=4)
    started = c.generation
    c.record(started, Outcome("error"))
    assert c.limit == 4
    # more failures of uploads that began before the decrease: counted, not acted on
    c.record(started, Outcome("error"))
    c.record(started, Outcome("timeout"))
    assert c.limit == 4
    assert (c.errors, c.timeouts) == (2, 1)
    c.record(c.generation, Outcome("timeout"))
    assert c.limit == 2
    c.record(c.generation, Outcome("error"))
    c.record(c.generation, Outcome("error"))
    assert c.limit == 1  # never below the minimum
    assert [d.limit for d in c.decisions] == [4, 2, 1]
    assert [d.reason for d in c.decisions] == ["error", "timeout", "error"]


def test_rising_latency_halves_and_moderate_rise_holds() -> None:
    c = AimdController(8, window=4)
    feed(c, [ok(1.0)] * 4)
    assert c.baseline == pytest.approx(1.0 / MIB)
    feed(c, [ok(2.0)] * 4)  # twice the baseline: neither up nor down
    assert c.limit == 8
    feed(c, [ok(4.0)] * 4)  # well above it
    assert c.limit == 4
    assert c.decisions == [Decision("down", 4, "latency")]


def test_successes_of_an_older_generation_do_not_fill_the_window() -> None:
    c = AimdController(8, window=4)
    old = c.generation
    c.record(old, Outcome("error"))
    for _ in range(8):
        c.record(old, ok(1.0))
    assert c.limit == 4
    assert c.successes == 8
    assert c.decisions == [Decision("down", 4, "error")]


def test_cost_is_per_byte_so_large_and_small_uploads_compare() -> None:
    c = AimdController(2, maximum=4, window=2, measured_from=0)
    feed(c, [ok(1.0, 8 * MIB), ok(0.125, MIB)])
    feed(c, [ok(2.0, 16 * MIB), ok(0.125, MIB)])
    assert c.limit == 4
    # a tiny object costs a round trip: it counts as SMALL bytes, not as its size
    assert Outcome("ok", 1.0, 10).cost == Outcome("ok", 1.0, SMALL).cost


def test_small_uploads_are_counted_but_not_measured() -> None:
    c = AimdController(4, window=2)
    feed(c, [ok(0.001)] * 2)  # the baseline, from packs
    feed(c, [ok(0.05, 4096)] * 10)  # index objects: a round trip each, far more per byte
    assert c.limit == 4 and c.decisions == []
    assert c.successes == 12
    assert c.baseline == pytest.approx(0.001 / MIB)


def test_a_slower_link_at_the_minimum_becomes_the_new_baseline_and_it_grows_again() -> None:
    c = AimdController(4, window=2)
    feed(c, [ok(1.0)] * 2)
    # the link becomes ten times slower, however few uploads run at once
    feed(c, [ok(10.0)] * 2)
    assert c.limit == 2
    feed(c, [ok(10.0)] * 2)
    assert c.limit == 1
    feed(c, [ok(10.0)] * 2)  # alone and still slow: that is the link now
    assert c.baseline == pytest.approx(10.0 / MIB)
    feed(c, [ok(10.0)] * 6)
    assert c.limit == 4
    assert [(d.direction, d.limit) for d in c.decisions] == [
        ("down", 2), ("down", 1), ("up", 2), ("up", 3), ("up", 4)]


def test_saturated_link_settles_where_latency_stops_paying() -> None:
    """A link of fixed bandwidth: an upload's cost grows with the uploads sharing it."""
    c = AimdController(1, maximum=8, window=2)
    for _ in range(40):
        feed(c, [ok(0.1 * c.limit)])
    assert 2 <= c.limit <= 3
    assert all(d.reason != "error" for d in c.decisions)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        AimdController(5, maximum=4)
    with pytest.raises(ValueError):
        AimdController(1, minimum=2)
    with pytest.raises(ValueError):
        AimdController(2, rise=3.0, high=3.0)


def test_semaphore_shrinks_as_holders_finish_and_grows_at_once() -> None:
    s = ResizableSemaphore(2)
    s.acquire()
    s.acquire()
    s.resize(1)
    s.release()
    entered = threading.Event()

    def third() -> None:
        s.acquire()
        entered.set()

    t = threading.Thread(target=third)
    t.start()
    assert not entered.wait(0.05)  # one still held, limit 1
    s.resize(2)
    assert entered.wait(10)
    t.join()
    assert s.held == 2
    with pytest.raises(ValueError):
        ResizableSemaphore(0)


class Flaky(MemoryBackend):
    """Fails the next ``fail`` puts with ``error``."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = 0
        self.error: Exception = TransientBackendError("reset")

    def put(self, name: str, data: bytes | bytearray | memoryview, *, overwrite: bool = False) -> None:
        if self.fail:
            self.fail -= 1
            raise self.error
        super().put(name, data, overwrite=overwrite)


def test_wrapper_reports_errors_stalls_and_successes() -> None:
    inner = Flaky()
    c = AimdController(8, window=100)
    b = AdaptiveBackend(inner, c)
    b.put("data/a", b"x" * 10)
    inner.fail = 1
    with pytest.raises(TransientBackendError):
        b.put("data/b", b"y")
    inner.fail, inner.error = 1, StallError("stalled")
    with pytest.raises(StallError):
        b.put("data/b", b"y")
    assert (c.successes, c.errors, c.timeouts) == (1, 1, 1)
    assert c.limit == 2
    assert c.slots.held == 0


def test_retries_outside_the_wrapper_each_attempt_counts() -> None:
    inner = Flaky()
    inner.fail = 2
    c = AimdController(4, window=100)
    b = RetryingBackend(AdaptiveBackend(inner, c), sleep=lambda s: None)
    b.put("data/a", b"z")
    assert (c.successes, c.errors) == (1, 2)
    assert c.limit == 1


def test_wrap_puts_it_inside_the_rate_limit() -> None:
    c = AimdController(4)
    b = wrap(MemoryBackend(), limit_upload=1000, retries=False, adaptive=c)
    assert "RateLimitedBackend(AdaptiveBackend(" in repr(b)
    b.put("data/a", b"q")
    assert c.successes == 1


def test_option_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEPWELL_ADAPTIVE", raising=False)
    assert adaptive_enabled()
    monkeypatch.setenv("KEEPWELL_ADAPTIVE", "0")
    assert not adaptive_enabled()
    assert adaptive_enabled(True)
    monkeypatch.setenv("KEEPWELL_ADAPTIVE", "off")
    assert not adaptive_enabled(None)
    assert not adaptive_enabled(False)
    monkeypatch.setenv("KEEPWELL_ADAPTIVE", "maybe")
    with pytest.raises(ConfigurationError):
        adaptive_enabled()


def _layers(b: object) -> list[str]:
    return [type(layer).__name__ for layer in iter_layers(b)]


def test_remote_repositories_get_a_controller_local_ones_none(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KEEPWELL_ADAPTIVE", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    cache = {"cache_dir": str(tmp_path / "cache")}
    s3 = "s3://bucket/repo"
    remote = open_storage(s3, **cache)
    assert "AdaptiveBackend" in _layers(remote)
    adaptive = next(b for b in iter_layers(remote) if isinstance(b, AdaptiveBackend))
    assert adaptive.controller.limit == adaptive.controller.maximum == UPLOAD_WORKERS
    off = open_storage(s3, adaptive=False, **cache)
    assert "AdaptiveBackend" not in _layers(off)
    monkeypatch.setenv("KEEPWELL_ADAPTIVE", "0")
    assert "AdaptiveBackend" not in _layers(open_storage(s3, **cache))
    assert "AdaptiveBackend" in _layers(
        open_storage(s3, adaptive=True, **cache))
    monkeypatch.delenv("KEEPWELL_ADAPTIVE")
    assert "AdaptiveBackend" not in _layers(open_storage(str(tmp_path / "local"), limit_upload=10))


def iter_layers(b: object) -> list[object]:
    out = []
    while b is not None:
        out.append(b)
        b = getattr(b, "inner", None)
    return out


def test_no_adaptive_option_reaches_the_repository_options() -> None:
    assert "adaptive" not in repository_options()
    GLOBALS.no_adaptive = True
    try:
        assert repository_options()["adaptive"] is False
    finally:
        GLOBALS.no_adaptive = False
