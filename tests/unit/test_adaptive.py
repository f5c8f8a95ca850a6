"""The AIMD controller of adaptive uploads, fed synthetic outcomes, and its wrapper and wiring."""

from __future__ import annotations

import gc
import logging
import threading
from pathlib import Path

import pytest

from keepwell.backends.adaptive import (
    SMALL,
    AimdController,
    Decision,
    Outcome,
    RateDecision,
    ResizableSemaphore,
    adaptive_enabled,
)
from keepwell.backends.memory import MemoryBackend
from keepwell.backends.resilience import TokenBucket
from keepwell.backends.wrappers import AdaptiveBackend, RetryingBackend, wrap
from keepwell.cli.common import GLOBALS, repository_options
from keepwell.control import logs
from keepwell.control.confined import _RunLog
from keepwell.control.jobs import JobContext
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


# --- the pacing rate -------------------------------------------------------------------------------


class Clock:
    """A clock that moves only when told to, or when something sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def paced(start: int = 1, **kw: object) -> tuple[AimdController, Clock]:
    clock = Clock()
    return AimdController(start, clock=clock, sleep=clock.sleep, **kw), clock  # type: ignore[arg-type]


def one_at_a_time(c: AimdController, clock: Clock, n: int, seconds: float,
                  size: int = MIB) -> None:
    """``n`` uploads one after another, each taking ``seconds`` of the link."""
    for _ in range(n):
        c.pace(size)
        generation = c.acquire()
        clock.now += seconds
        c.release(generation, Outcome("ok", seconds, size))


def test_a_healthy_link_is_never_paced() -> None:
    c, clock = paced(4, window=4)
    one_at_a_time(c, clock, 64, 0.5)
    assert c.rate is None and c.rate_decisions == []
    assert clock.slept == []


def test_an_error_paces_at_a_fraction_of_what_the_link_delivered() -> None:
    c, clock = paced(4, window=4)
    one_at_a_time(c, clock, 8, 1.0)  # 1 MiB/s
    assert c.throughput() == pytest.approx(MIB)
    c.record(c.generation, Outcome("timeout"))
    assert c.rate == pytest.approx(0.8 * MIB)
    assert c.rate_decisions == [RateDecision("down", c.rate, "timeout", pytest.approx(MIB))]
    assert c.limit == 2
    # one decrease per congestion event: a late failure of an older upload changes nothing
    c.record(c.generation - 1, Outcome("error"))
    assert c.rate == pytest.approx(0.8 * MIB) and len(c.rate_decisions) == 1
    # the same outage failing again (no success between): the number of uploads halves, the
    # rate holds
    c.record(c.generation, Outcome("error"))
    assert c.limit == 1 and c.rate == pytest.approx(0.8 * MIB) and len(c.rate_decisions) == 1
    # a second event after the link delivered again: a fraction of the lower of the throughput
    # and the rate in force
    one_at_a_time(c, clock, 1, 1.0)
    c.record(c.generation, Outcome("error"))
    assert c.rate == pytest.approx(0.64 * MIB)


def test_an_outage_lowers_the_rate_once_from_what_the_link_delivered_before_it() -> None:
    c, clock = paced(4, window=4)
    one_at_a_time(c, clock, 8, 1.0)  # 1 MiB/s
    clock.now += 300  # the link froze: five minutes until the first stall is reported
    c.record(c.generation, Outcome("timeout"))
    assert c.rate == pytest.approx(0.8 * MIB), "the stall's own time is not a slow link"
    for _ in range(5):  # each retry stalls or is refused again
        clock.now += 60
        c.record(c.generation, Outcome("timeout"))
        c.record(c.generation, Outcome("error"))
    assert c.rate == pytest.approx(0.8 * MIB) and len(c.rate_decisions) == 1
    assert c.limit == 1
    # so a retry of a pack waits its turn at the rate the link had, not at the floor's
    for _ in range(2):
        waited = len(clock.slept)
        c.pace(16 * MIB)
        assert sum(clock.slept[waited:]) <= 16 / 0.8 + 0.01  # seconds; at the floor: 1024


def test_no_throughput_yet_leaves_the_rate_unlimited() -> None:
    c, _ = paced(4, window=4)
    c.record(c.generation, Outcome("error"))
    assert c.limit == 2 and c.rate is None and c.rate_decisions == []


def test_paced_uploads_are_spaced_and_the_rate_grows_while_the_link_delivers() -> None:
    c, clock = paced(1, window=4)
    one_at_a_time(c, clock, 4, 1.0)
    c.record(c.generation, Outcome("error"))
    assert c.rate == pytest.approx(0.8 * MIB)
    # the link is fast now: uploads take 0.1 s, the pacing spaces them out
    one_at_a_time(c, clock, 4, 0.1)
    assert sum(clock.slept) > 0
    up = [d for d in c.rate_decisions if d.direction == "up"]
    assert len(up) == 1 and up[0].reason == "steady"
    assert up[0].throughput == pytest.approx(0.8 * MIB, rel=0.25)
    assert c.rate == pytest.approx(0.8 * MIB + 0.25 * up[0].throughput)
    for _ in range(10):
        one_at_a_time(c, clock, 4, 0.1)
    assert c.rate > 4 * MIB  # grows as long as the link keeps up with it
    assert all(d.direction == "up" for d in c.rate_decisions[1:])


def test_the_rate_holds_when_the_link_does_not_fill_it() -> None:
    c, clock = paced(1, window=4)
    one_at_a_time(c, clock, 4, 0.25)  # 4 MiB/s
    c.record(c.generation, Outcome("error"))
    rate = c.rate
    assert rate == pytest.approx(3.2 * MIB)
    # the data comes slowly (one pack per second): the link is idle, the rate is not the limit
    for _ in range(12):
        clock.now += 0.9
        one_at_a_time(c, clock, 1, 0.1)
    assert c.rate == rate and len(c.rate_decisions) == 1
    assert c.limit == 1  # at its maximum (start); the cost did not rise


def test_slow_alone_is_congestion_for_the_rate_but_many_at_once_only_for_their_number() -> None:
    c, clock = paced(4, window=4)
    one_at_a_time(c, clock, 4, 0.1)  # the baseline: 10 MiB/s
    one_at_a_time(c, clock, 4, 0.4)  # four times the cost, four uploads allowed: halve them
    assert c.decisions == [Decision("down", 2, "latency")] and c.rate is None
    one_at_a_time(c, clock, 4, 0.4)
    assert c.limit == 1 and c.rate is None
    one_at_a_time(c, clock, 4, 0.25)  # alone and 2.5 times the baseline: the link got slower
    assert c.rate_decisions[0].direction == "down" and c.rate_decisions[0].reason == "latency"
    assert c.rate == pytest.approx(0.8 * 4 * MIB, rel=0.1)
    assert c.baseline == pytest.approx(0.25 / MIB)


def test_the_rate_stays_below_the_ceiling_and_leaves_it_to_the_budgets() -> None:
    c, clock = paced(1, window=4, ceiling=2 * MIB)
    one_at_a_time(c, clock, 4, 0.25)  # 4 MiB/s measured (another path: the budget is not paid here)
    c.record(c.generation, Outcome("error"))
    assert c.rate == 2 * MIB
    one_at_a_time(c, clock, 1, 0.25)
    c.record(c.generation, Outcome("error"))
    assert c.rate == pytest.approx(1.6 * MIB)
    for _ in range(5):
        one_at_a_time(c, clock, 4, 0.05)
    assert c.rate is None  # grown up to the ceiling: the configured limit paces alone
    assert c.rate_decisions[-1] == RateDecision("up", None, "steady", c.rate_decisions[-1].throughput)


def test_throughput_counts_uploads_that_ran_together() -> None:
    c, clock = paced(16, window=4, measured_from=0)
    for _ in range(2):  # two rounds of sixteen 1 MiB uploads at once, 4 s each: 4 MiB/s
        held = [c.acquire() for _ in range(16)]
        clock.now += 4.0
        for g in held:
            c.release(g, Outcome("ok", 4.0, MIB))
    assert c.throughput() == pytest.approx(4 * MIB)
    clock.now += 4.0  # then nothing for as long: half of it
    assert c.throughput() == pytest.approx(2 * MIB)


def test_without_pacing_only_the_number_adapts() -> None:
    c, clock = paced(16, minimum=16, window=4, pace=False)
    one_at_a_time(c, clock, 8, 1.0)
    c.record(c.generation, Outcome("timeout"))
    one_at_a_time(c, clock, 8, 5.0)
    assert c.rate is None and c.rate_decisions == [] and c.decisions == []


def test_wrapper_pays_the_rate_before_its_slot_and_times_only_the_link() -> None:
    size = 100 * 1024
    c, clock = paced(1, window=4, measured_from=0)
    one_at_a_time(c, clock, 2, 1.0, size=size)  # 100 KiB/s
    c.record(c.generation, Outcome("error"))
    assert c.rate == pytest.approx(0.8 * size)
    b = AdaptiveBackend(MemoryBackend(), c)
    for i in range(4):
        b.put(f"data/{i}", b"x" * size)
    # four uploads at 80 KiB/s, less the burst of a second's worth
    assert sum(clock.slept) == pytest.approx(4 / 0.8 - 1.0)
    assert c.baseline == 0.0  # the uploads themselves took no time on this clock


def test_decisions_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    c, clock = paced(4, window=4)
    one_at_a_time(c, clock, 4, 1.0)
    with caplog.at_level(logging.INFO, logger="keepwell.backends.adaptive"):
        c.record(c.generation, Outcome("timeout"))
    assert [r.getMessage() for r in caplog.records] == [
        "uploads at once: 2 (down: timeout)",
        "upload pacing: 819 KiB/s (down: timeout; link delivered 1024 KiB/s)"]


def test_the_ceiling_comes_from_the_configured_limits(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KEEPWELL_ADAPTIVE", raising=False)
    for key, value in (("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s"),
                       ("AWS_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    budget = TokenBucket(300 * 1024)
    remote = open_storage("s3://bucket/repo", cache_dir=str(tmp_path), limit_upload=500,
                          upload_buckets=[budget])
    adaptive = next(b for b in iter_layers(remote) if isinstance(b, AdaptiveBackend))
    assert adaptive.controller.ceiling == 300 * 1024
    free = open_storage("s3://bucket/repo", cache_dir=str(tmp_path))
    adaptive = next(b for b in iter_layers(free) if isinstance(b, AdaptiveBackend))
    assert adaptive.controller.ceiling is None and adaptive.controller.rate is None


def test_decisions_reach_the_daemons_log_and_a_confined_runs_log(
        capsys: pytest.CaptureFixture[str]) -> None:
    adaptive_log = logging.getLogger("keepwell.backends.adaptive")
    saved = (list(adaptive_log.handlers), adaptive_log.level, adaptive_log.propagate)
    control_log = logging.getLogger(logs.LOGGER_NAME)
    saved_control = (list(control_log.handlers), control_log.level, control_log.propagate)
    try:
        logs.setup(json_lines=True)
        c, clock = paced(4, window=4)
        one_at_a_time(c, clock, 4, 1.0)
        c.record(c.generation, Outcome("error"))
        err = capsys.readouterr().err
        assert '"event": "uploads at once: 2 (down: error)"' in err
        assert '"event": "upload pacing: 819 KiB/s (down: error; link delivered 1024 KiB/s)"' in err
        # in a job process: the run's log
        ctx = JobContext()
        lines: list[tuple[str, str]] = []
        ctx.on_log = lambda level, message: lines.append((level, message))
        adaptive_log.handlers = [_RunLog(ctx)]
        c.record(c.generation, Outcome("timeout"))
        assert lines[0] == ("info", "uploads at once: 1 (down: timeout)")
    finally:
        adaptive_log.handlers, adaptive_log.level, adaptive_log.propagate = saved
        control_log.handlers, control_log.level, control_log.propagate = saved_control


def test_small_objects_neither_wait_for_the_rate_nor_set_it() -> None:
    c, clock = paced(4, window=4)
    one_at_a_time(c, clock, 8, 1.0)  # packs at 1 MiB/s
    for _ in range(20):  # then only heartbeats and index objects, over minutes
        clock.now += 30
        one_at_a_time(c, clock, 1, 0.01, size=200)
    c.record(c.generation, Outcome("error"))
    assert c.rate == pytest.approx(0.8 * MIB), "the packs' throughput, not the heartbeats'"
    c.pace(16 * MIB)  # a pack in debt
    waited = len(clock.slept)
    c.pace(200)  # a heartbeat behind it is not held back
    assert clock.slept[waited:] == []


def test_the_daemons_metrics_show_each_repositorys_adapted_number_and_rate(
        tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from keepwell.control.history import History
    from keepwell.control.metrics import KeepwellCollector, LiveFigures

    history = History(str(tmp_path / "history.db"))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KeepwellCollector(history, [], LiveFigures))  # type: ignore[arg-type]
    clock = Clock()
    c = AimdController(4, clock=clock, sleep=clock.sleep, window=4, name="s3://bucket/a")
    try:
        text = generate_latest(registry).decode()
        assert 'keepwell_upload_concurrency{repository="s3://bucket/a"} 4.0' in text
        assert "keepwell_upload_pacing_rate_bytes_per_second{" not in text  # unlimited
        one_at_a_time(c, clock, 8, 1.0)
        c.record(c.generation, Outcome("timeout"))
        text = generate_latest(registry).decode()
        assert 'keepwell_upload_concurrency{repository="s3://bucket/a"} 2.0' in text
        assert c.rate is not None
        assert 'keepwell_upload_pacing_rate_bytes_per_second{repository="s3://bucket/a"} ' \
            f'{float(c.rate)!r}' in text, text
        del c
        gc.collect()
        assert "s3://bucket/a" not in generate_latest(registry).decode(), "gone with its repository"
    finally:
        history.close()
