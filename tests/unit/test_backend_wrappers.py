"""The backend wrappers: each passes the contract suite, and each does its one job."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepwell.backends.base import Backend, ObjectInfo
from keepwell.backends.local import LocalBackend
from keepwell.backends.memory import MemoryBackend
from keepwell.backends.resilience import Backoff, CircuitBreaker, TokenBucket
from keepwell.backends.wrappers import (
    CachedBackend,
    CircuitBreakerBackend,
    ConcurrencyLimitedBackend,
    GuardedBackend,
    RateLimitedBackend,
    RetryingBackend,
    wrap,
)
from keepwell.errors import (
    BackendError,
    CircuitOpenError,
    ObjectExistsError,
    ObjectNotFoundError,
    PermanentBackendError,
    TransientBackendError,
)
from tests.backend_contract import BackendContract
from tests.fakeclock import FakeClock

NO_WAIT = Backoff(base=0.0, cap=0.0)


class FlakyBackend:
    """A real memory backend behind a gate that fails calls on purpose.

    ``fail_next[op]`` is a list of errors to raise for the next calls of ``op``; with
    ``after=True`` a ``put`` stores the object first and then raises (an ambiguous failure).
    """

    def __init__(self, inner: Backend | None = None) -> None:
        self.inner = inner if inner is not None else MemoryBackend()
        self.location = "flaky://"
        self.fail_next: dict[str, list[BackendError]] = {}
        self.fail_after_put = False
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def _gate(self, op: str) -> BackendError | None:
        with self._lock:
            self.calls[op] = self.calls.get(op, 0) + 1
            queue = self.fail_next.get(op)
            return queue.pop(0) if queue else None

    def put(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        err = self._gate("put")
        if err is not None and not self.fail_after_put:
            raise err
        self.inner.put(name, data, overwrite=overwrite)
        if err is not None:
            raise err

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        err = self._gate("get")
        if err is not None:
            raise err
        return self.inner.get(name, offset, length)

    def stat(self, name: str) -> ObjectInfo:
        err = self._gate("stat")
        if err is not None:
            raise err
        return self.inner.stat(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        items = list(self.inner.list(prefix))
        for i, info in enumerate(items):
            if i == len(items) // 2:
                err = self._gate("list")
                if err is not None:
                    raise err
            yield info

    def delete(self, name: str) -> None:
        err = self._gate("delete")
        if err is not None and not self.fail_after_put:
            raise err
        self.inner.delete(name)
        if err is not None:
            raise err

    def close(self) -> None:
        pass


def transient(n: int) -> list[BackendError]:
    return [TransientBackendError(f"boom {i}") for i in range(n)]


# --- every wrapper passes the contract ------------------------------------------------------------


class TestRetryingContract(BackendContract):
    @pytest.fixture
    def backend(self) -> Iterator[Backend]:
        yield RetryingBackend(MemoryBackend(), backoff=NO_WAIT)


class TestRetryingOverFlakyContract(BackendContract):
    """Every call of the inner backend fails once before it works; the contract still holds.

    Deletes are spared: after an ambiguous failure a retried delete that finds nothing counts as
    done (see test_ambiguous_delete_then_not_found_succeeds), so "delete of a missing object
    raises" cannot hold through a failure.
    """

    @pytest.fixture
    def backend(self) -> Iterator[Backend]:
        class EveryOtherFails(FlakyBackend):
            # Per thread, so that under concurrency a retry always meets a working call.
            local = threading.local()

            def _gate(self, op: str) -> BackendError | None:
                if op == "delete":
                    return None
                n = getattr(self.local, op, 0) + 1
                setattr(self.local, op, n)
                return TransientBackendError("odd") if n % 2 else None

        yield RetryingBackend(EveryOtherFails(), backoff=NO_WAIT)


class TestCircuitBreakerContract(BackendContract):
    @pytest.fixture
    def backend(self) -> Iterator[Backend]:
        yield CircuitBreakerBackend(MemoryBackend(), CircuitBreaker())


class TestRateLimitedContract(BackendContract):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[Backend]:
        # Fast enough to keep the suite quick, slow enough that every path is paced and chunked.
        yield RateLimitedBackend(
            LocalBackend(str(tmp_path)),
            upload=TokenBucket(200e6),
            download=TokenBucket(200e6),
            chunk_size=64 * 1024,
        )


class TestConcurrencyLimitedContract(BackendContract):
    @pytest.fixture
    def backend(self) -> Iterator[Backend]:
        yield ConcurrencyLimitedBackend(MemoryBackend(), 2)


class TestCachedContract(BackendContract):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[Backend]:
        yield CachedBackend(LocalBackend(str(tmp_path / "repo")), tmp_path / "cache")


class CountingGuard:
    """A guard that refuses once ``refuse`` is set and counts what it is told of."""

    def __init__(self) -> None:
        self.refuse = threading.Event()
        self.checks = 0
        self.stored_bytes = 0
        self.names: list[str] = []

    def check(self) -> None:
        self.checks += 1
        if self.refuse.is_set():
            raise Refused("stopped")

    def stored(self, name: str, size: int, began: float) -> None:
        assert began <= time.time()
        self.names.append(name)
        self.stored_bytes += size


class Refused(Exception):
    pass


class TestGuardedContract(BackendContract):
    @pytest.fixture
    def backend(self) -> Iterator[Backend]:
        yield GuardedBackend(MemoryBackend(), CountingGuard())


class TestFullStackContract(BackendContract):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[Backend]:
        yield wrap(
            LocalBackend(str(tmp_path / "repo")),
            limit_upload=200_000,
            limit_download=200_000,
            cache_dir=tmp_path / "cache",
            max_concurrent=3,
            upload_buckets=[TokenBucket(200e6)],
            guard=CountingGuard(),
        )


def test_guard_sees_every_call_and_its_refusal_is_no_backend_failure() -> None:
    guard = CountingGuard()
    breaker = CircuitBreaker(failure_threshold=1)
    b = wrap(MemoryBackend(), guard=guard)
    assert isinstance(b, RetryingBackend)
    inner = b.inner
    assert isinstance(inner, GuardedBackend)
    assert isinstance(inner.inner, CircuitBreakerBackend)
    inner.inner.breaker = breaker
    b.put("data/00/x", b"12345")
    b.put("index/i", b"67")
    assert b.get("data/00/x") == b"12345"
    assert [o.name for o in b.list("data/")] == ["data/00/x"]
    assert guard.names == ["data/00/x", "index/i"] and guard.stored_bytes == 7
    assert guard.checks == 4
    guard.refuse.set()
    for call in (lambda: b.put("data/00/y", b"z"), lambda: b.get("data/00/x"),
                 lambda: b.stat("data/00/x"), lambda: b.delete("data/00/x"),
                 lambda: list(b.list(""))):
        with pytest.raises(Refused):
            call()
    assert guard.checks == 9  # once each: a refusal is not retried
    assert breaker.allow()  # and is no failure of the backend
    guard.refuse.clear()
    assert b.get("data/00/x") == b"12345"


# --- RetryingBackend -----------------------------------------------------------------------------


def test_retry_recovers_from_transient_errors() -> None:
    flaky = FlakyBackend()
    slept: list[float] = []
    backoff = Backoff(rng=random.Random(1))
    b = RetryingBackend(flaky, attempts=4, backoff=backoff, sleep=slept.append)
    flaky.fail_next["put"] = transient(3)
    b.put("data/x", b"1")
    assert flaky.calls["put"] == 4
    assert len(slept) == 3
    assert all(0 <= d <= min(30.0, 0.5 * 2**i) for i, d in enumerate(slept))
    flaky.fail_next["get"] = transient(2)
    assert b.get("data/x") == b"1"


def test_retry_gives_up_after_attempts() -> None:
    flaky = FlakyBackend()
    b = RetryingBackend(flaky, attempts=3, backoff=NO_WAIT, sleep=lambda s: None)
    flaky.fail_next["stat"] = transient(5)
    with pytest.raises(TransientBackendError):
        b.stat("x")
    assert flaky.calls["stat"] == 3


@pytest.mark.parametrize(
    "error", [ObjectNotFoundError("nf"), ObjectExistsError("ex"), PermanentBackendError("perm")]
)
def test_retry_never_retries_non_transient(error: BackendError) -> None:
    flaky = FlakyBackend()
    b = RetryingBackend(flaky, backoff=NO_WAIT, sleep=lambda s: None)
    flaky.fail_next["get"] = [error]
    with pytest.raises(type(error)):
        b.get("x")
    assert flaky.calls["get"] == 1


def test_ambiguous_create_only_put_with_same_content_succeeds() -> None:
    flaky = FlakyBackend()
    flaky.fail_after_put = True  # stored, then the answer is lost
    flaky.fail_next["put"] = transient(1)
    b = RetryingBackend(flaky, backoff=NO_WAIT, sleep=lambda s: None)
    b.put("index/a", b"payload")
    assert flaky.inner.get("index/a") == b"payload"
    assert (b.retries, b.ambiguous_resolved) == (1, 1)


def test_ambiguous_create_only_put_with_other_content_fails() -> None:
    flaky = FlakyBackend()
    flaky.inner.put("index/a", b"someone else's")
    flaky.fail_next["put"] = transient(1)
    b = RetryingBackend(flaky, backoff=NO_WAIT, sleep=lambda s: None)
    with pytest.raises(ObjectExistsError):
        b.put("index/a", b"mine")


def test_unambiguous_exists_is_not_hidden() -> None:
    flaky = FlakyBackend()
    flaky.inner.put("index/a", b"same")
    b = RetryingBackend(flaky, backoff=NO_WAIT, sleep=lambda s: None)
    with pytest.raises(ObjectExistsError):
        b.put("index/a", b"same")


def test_ambiguous_delete_then_not_found_succeeds() -> None:
    flaky = FlakyBackend()
    flaky.inner.put("data/x", b"1")
    flaky.fail_after_put = True
    flaky.fail_next["delete"] = transient(1)
    b = RetryingBackend(flaky, backoff=NO_WAIT, sleep=lambda s: None)
    b.delete("data/x")
    with pytest.raises(ObjectNotFoundError):
        b.delete("data/x")


def test_list_resumes_without_duplicates() -> None:
    flaky = FlakyBackend()
    names = [f"data/{i:02x}/obj" for i in range(20)]
    for n in names:
        flaky.inner.put(n, b"x")
    flaky.fail_next["list"] = transient(2)
    b = RetryingBackend(flaky, backoff=NO_WAIT, sleep=lambda s: None)
    assert [i.name for i in b.list("data/")] == names


# --- CircuitBreakerBackend -----------------------------------------------------------------------


def test_breaker_opens_fails_fast_and_recovers() -> None:
    now = [0.0]
    flaky = FlakyBackend()
    flaky.inner.put("config", b"c")
    breaker = CircuitBreaker(failure_threshold=3, reset_after=10.0, clock=lambda: now[0])
    b = CircuitBreakerBackend(flaky, breaker)
    flaky.fail_next["get"] = transient(3)
    for _ in range(3):
        with pytest.raises(TransientBackendError):
            b.get("config")
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError):
        b.get("config")
    assert flaky.calls["get"] == 3  # the open breaker did not call the store
    now[0] += 10.0
    assert b.get("config") == b"c"  # the probe
    assert breaker.state == "closed"


def test_breaker_counts_answers_as_success() -> None:
    breaker = CircuitBreaker(failure_threshold=1)
    b = CircuitBreakerBackend(MemoryBackend(), breaker)
    for _ in range(3):
        with pytest.raises(ObjectNotFoundError):
            b.get("nothing")
    assert breaker.state == "closed"


def test_retry_over_breaker_waits_for_the_probe() -> None:
    now = [0.0]
    flaky = FlakyBackend()
    flaky.inner.put("config", b"c")
    breaker = CircuitBreaker(failure_threshold=2, reset_after=5.0, clock=lambda: now[0])

    def sleep(s: float) -> None:
        now[0] += s

    b = RetryingBackend(
        CircuitBreakerBackend(flaky, breaker), attempts=10, backoff=Backoff(1, 4), sleep=sleep
    )
    flaky.fail_next["get"] = transient(2)
    assert b.get("config") == b"c"
    assert flaky.calls["get"] == 3


# --- RateLimitedBackend --------------------------------------------------------------------------


def test_rate_limit_holds(tmp_path: Path) -> None:
    # the buckets run on a clock that moves only when they sleep: the time they slept is the time
    # the transfers took at the limit
    rate = 4 * 1024 * 1024
    up_clock, down_clock = FakeClock(), FakeClock()
    b = RateLimitedBackend(
        LocalBackend(str(tmp_path)),
        upload=TokenBucket(rate, burst=256 * 1024, clock=up_clock, sleep=up_clock.sleep),
        download=TokenBucket(rate, burst=256 * 1024, clock=down_clock, sleep=down_clock.sleep),
    )
    data = os.urandom(2 * 1024 * 1024 - 4096)
    b.put("data/a", data)
    b.put("data/b", data)
    assert b.get("data/a") + b.get("data/b") == data + data
    # an upload pays its bytes; a download pays each ranged piece before it reads it, so the
    # short last piece is paid in full; the first 256 KiB of each direction is the burst
    assert sum(up_clock.slept) == pytest.approx((2 * len(data) - 256 * 1024) / rate)
    assert sum(down_clock.slept) == pytest.approx((4 * 1024 * 1024 - 256 * 1024) / rate)


def test_rate_limited_ranged_and_whole_reads(tmp_path: Path) -> None:
    inner = LocalBackend(str(tmp_path))
    b = RateLimitedBackend(inner, download=TokenBucket(1e9), chunk_size=1000)
    data = os.urandom(10_000)
    inner.put("data/x", data)
    inner.put("sessions/s", data)
    assert b.get("data/x") == data
    assert b.get("data/x", 1234, 5678) == data[1234 : 1234 + 5678]
    assert b.get("data/x", 9000) == data[9000:]
    assert b.get("sessions/s", 1) == data[1:]
    inner.put("data/exact", data[:3000])  # a multiple of the chunk size
    assert b.get("data/exact") == data[:3000]


# --- ConcurrencyLimitedBackend -------------------------------------------------------------------


def test_concurrency_limit_is_respected() -> None:
    active = [0, 0]  # current, peak
    lock = threading.Lock()

    class Slow(MemoryBackend):
        def put(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
            with lock:
                active[0] += 1
                active[1] = max(active[1], active[0])
            time.sleep(0.02)
            with lock:
                active[0] -= 1
            super().put(name, data, overwrite=overwrite)

    b = ConcurrencyLimitedBackend(Slow(), 3)
    threads = [threading.Thread(target=b.put, args=(f"data/{i}", b"x")) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert active[1] == 3
    assert len(list(b.list("data/"))) == 12


def test_concurrency_single_slot_list_while_reading() -> None:
    b = ConcurrencyLimitedBackend(MemoryBackend(), 1)
    for i in range(5):
        b.put(f"index/{i}", b"v")
    assert [b.get(i.name) for i in b.list("index/")] == [b"v"] * 5


# --- CachedBackend -------------------------------------------------------------------------------


def test_cache_serves_immutable_objects_and_skips_others(tmp_path: Path) -> None:
    flaky = FlakyBackend()
    b = CachedBackend(flaky, tmp_path / "cache")
    flaky.inner.put("index/i1", b"index one")
    flaky.inner.put("data/00/p", b"pack")
    flaky.inner.put("sessions/s", b"session")
    for _ in range(3):
        assert b.get("index/i1") == b"index one"
        assert b.get("index/i1", 6, 3) == b"one"
        assert b.get("data/00/p") == b"pack"
        assert b.get("sessions/s") == b"session"
    assert flaky.calls["get"] == 1 + 3 + 3
    assert (tmp_path / "cache" / "index" / "i1").read_bytes() == b"index one"
    assert not (tmp_path / "cache" / "data").exists()
    assert not (tmp_path / "cache" / "sessions").exists()


def test_cache_is_filled_on_put_and_dropped_on_delete(tmp_path: Path) -> None:
    inner = MemoryBackend()
    b = CachedBackend(inner, tmp_path / "cache")
    b.put("snapshots/s1", b"snap")
    assert (tmp_path / "cache" / "snapshots" / "s1").read_bytes() == b"snap"
    b.delete("snapshots/s1")
    assert not (tmp_path / "cache" / "snapshots" / "s1").exists()
    with pytest.raises(ObjectNotFoundError):
        b.get("snapshots/s1")
    # A failed create-only put must not put the wrong content in the cache.
    inner.put("keys/k", b"real")
    with pytest.raises(ObjectExistsError):
        b.put("keys/k", b"impostor")
    assert b.get("keys/k") == b"real"


def test_wrap_builds_the_stack(tmp_path: Path) -> None:
    plain = MemoryBackend()
    assert wrap(plain, retries=False) is plain
    stacked = wrap(plain, limit_upload=100, cache_dir=tmp_path, max_concurrent=2,
                   upload_buckets=[TokenBucket(100)], guard=CountingGuard())
    assert isinstance(stacked, CachedBackend)
    assert stacked.location == plain.location
    layers = []
    cur: object = stacked
    while hasattr(cur, "inner"):
        layers.append(type(cur).__name__)
        cur = cur.inner
    assert isinstance(stacked, CachedBackend)
    assert os.path.dirname(stacked.cache_dir) == str(tmp_path)  # a subdirectory per location
    assert layers == [
        "CachedBackend",
        "RetryingBackend",
        "GuardedBackend",
        "CircuitBreakerBackend",
        "RateLimitedBackend",
        "RateLimitedBackend",
        "ConcurrencyLimitedBackend",
    ]


def test_wrap_keeps_caches_of_repositories_apart(tmp_path: Path) -> None:
    a = wrap(LocalBackend(str(tmp_path / "a")), cache_dir=tmp_path / "cache")
    b = wrap(LocalBackend(str(tmp_path / "b")), cache_dir=tmp_path / "cache")
    a.put("config", b"config of a")
    b.put("config", b"config of b")
    assert a.get("config") == b"config of a"
    assert b.get("config") == b"config of b"


@pytest.mark.parametrize("key_file", [None, "/home/backup/.ssh/id_ed25519"])
def test_wrap_gives_sftp_repositories_a_cache_of_their_own(tmp_path: Path,
                                                           key_file: str | None) -> None:
    """An SFTP backend's ``identity`` is its SSH key file (or none): the cache is named by the
    location, so one without a key file opens, and two repositories with one key stay apart."""
    from keepwell.backends.sftp import SftpBackend

    a = wrap(SftpBackend("h", "/srv/a", identity=key_file), cache_dir=tmp_path)
    b = wrap(SftpBackend("h", "/srv/b", identity=key_file), cache_dir=tmp_path)
    assert isinstance(a, CachedBackend) and isinstance(b, CachedBackend)
    assert a.cache_dir != b.cache_dir
