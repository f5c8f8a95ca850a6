"""Wrappers any backend can wear: retries, circuit breaking, rate limits, concurrency, a cache,
and a guard that may refuse any call (a job's deadline and cancellation).

Each wrapper is itself a `Backend` around an inner one, so they stack; `wrap` builds the usual
stack. None of them knows the repository format beyond the object-name prefixes it is given.

Words:
    ambiguous failure  a transient error on a ``put`` after which the object may or may not have
                       been stored (the connection dropped after the request was sent).
    read-through       a cache that serves what it holds and fills itself from the inner backend.
    guard              what `GuardedBackend` asks before every call (`Guard.check` raises to
                       refuse it) and tells of every object stored (`Guard.stored`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from keepwell import tokens
from keepwell.backends.adaptive import AimdController, Outcome
from keepwell.backends.base import Backend, ObjectInfo, check_name
from keepwell.backends.cachedir import MARKER, touch
from keepwell.backends.resilience import Backoff, CircuitBreaker, Sleep, TokenBucket
from keepwell.backends.spool import Payload, Spool, payload_pieces, same_bytes
from keepwell.errors import (
    BackendError,
    CircuitOpenError,
    ObjectExistsError,
    ObjectNotFoundError,
    StallError,
    TransientBackendError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
RetryHook = Callable[[str, int, BackendError, float], None]


class _Wrapper:
    """Passes every call to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.location = inner.location

    def put(self, name: str, data: Payload, *, overwrite: bool = False) -> None:
        self.inner.put(name, data, overwrite=overwrite)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(name, offset, length)

    def stat(self, name: str) -> ObjectInfo:
        return self.inner.stat(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def close(self) -> None:
        self.inner.close()

    def open_spool(self, directory: str | None = None) -> Spool | None:
        """The inner backend's spool (keepwell.backends.spool), or None if it offers none;
        it is stored by ``put``, through this wrapper."""
        open_spool = getattr(self.inner, "open_spool", None)
        return open_spool(directory) if open_spool is not None else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


# --- retries -------------------------------------------------------------------------------------


class RetryingBackend(_Wrapper):
    """Retries transient errors with exponential backoff and full jitter.

    Only errors whose ``transient`` is true are retried; not-found, exists and permanent errors
    pass through at once. A stall (`StallError`: no progress for the stall time) is retried at
    most ``stall_attempts - 1`` times, so a frozen server costs about ``stall_attempts`` stall
    times, not ``attempts`` of them. A create-only ``put`` that failed ambiguously and then meets
    `ObjectExistsError` reads the object back: identical content means the earlier attempt did
    store it, which counts as success. A ``delete`` that failed ambiguously and then meets
    `ObjectNotFoundError` likewise succeeded. The error of the last attempt says how many were
    made and for how long.
    """

    def __init__(
        self,
        inner: Backend,
        attempts: int = 6,
        backoff: Backoff | None = None,
        sleep: Sleep = time.sleep,
        on_retry: RetryHook | None = None,
        stall_attempts: int = 2,
    ) -> None:
        super().__init__(inner)
        if attempts < 1 or stall_attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.attempts = attempts
        self.stall_attempts = stall_attempts
        self.backoff = backoff if backoff is not None else Backoff()
        self._sleep = sleep
        self._on_retry = on_retry
        self._counts_lock = threading.Lock()
        self.retries = 0  # calls repeated after a transient error
        self.ambiguous_resolved = 0  # retried writes/deletes found already done

    def _pause(self, what: str, attempt: int, exc: BackendError) -> None:
        with self._counts_lock:
            self.retries += 1
        delay = self.backoff.delay(attempt)
        log.info("retrying %s in %.2fs (attempt %d): %s", what, delay, attempt + 2, exc)
        if self._on_retry is not None:
            self._on_retry(what, attempt, exc, delay)
        self._sleep(delay)

    def _failed(self, what: str, attempt: int, exc: BackendError,
                run: _Run) -> BackendError | None:
        """After a failed attempt: None to try again (after a pause), else the error to raise
        (``exc`` itself when it is not worth a retry)."""
        if not exc.transient:
            return exc
        # a breaker that stalls opened counts as a stall: no long wait for its probe
        run.stalls += isinstance(exc, StallError) or (isinstance(exc, CircuitOpenError) and exc.stalled)
        if attempt == self.attempts - 1 or run.stalls >= self.stall_attempts:
            return _final(exc, attempt + 1, time.monotonic() - run.started)
        self._pause(what, attempt, exc)
        return None

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        run = _Run()
        for attempt in range(self.attempts):
            try:
                return fn()
            except BackendError as exc:
                final = self._failed(what, attempt, exc, run)
                if final is exc:
                    raise
                if final is not None:
                    raise final from None
        raise AssertionError("unreachable")

    def put(self, name: str, data: Payload, *, overwrite: bool = False) -> None:
        ambiguous = False
        run = _Run()
        for attempt in range(self.attempts):
            try:
                self.inner.put(name, data, overwrite=overwrite)
                return
            except ObjectExistsError:
                if ambiguous and self._holds(name, data):
                    self._resolved(f"put {name}")
                    return
                raise
            except BackendError as exc:
                final = self._failed(f"put {name}", attempt, exc, run)
                if final is exc:
                    raise
                if final is not None:
                    raise final from None
                ambiguous = True

    def _resolved(self, what: str) -> None:
        log.info("%s: an earlier attempt had done it", what)
        with self._counts_lock:
            self.ambiguous_resolved += 1

    def _holds(self, name: str, data: Payload) -> bool:
        try:
            stored = self._call(f"get {name}", lambda: self.inner.get(name))
        except ObjectNotFoundError:
            return False
        return same_bytes(stored, data)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._call(f"get {name}", lambda: self.inner.get(name, offset, length))

    def stat(self, name: str) -> ObjectInfo:
        return self._call(f"stat {name}", lambda: self.inner.stat(name))

    def delete(self, name: str) -> None:
        ambiguous = False
        run = _Run()
        for attempt in range(self.attempts):
            try:
                self.inner.delete(name)
                return
            except ObjectNotFoundError:
                if ambiguous:
                    self._resolved(f"delete {name}")
                    return
                raise
            except BackendError as exc:
                final = self._failed(f"delete {name}", attempt, exc, run)
                if final is exc:
                    raise
                if final is not None:
                    raise final from None
                ambiguous = True

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # A listing that fails half-way starts again and skips what was already yielded.
        seen: set[str] = set()
        attempt = 0
        run = _Run()
        while True:
            try:
                for info in self.inner.list(prefix):
                    if info.name not in seen:
                        seen.add(info.name)
                        yield info
                return
            except BackendError as exc:
                final = self._failed(f"list {prefix or '/'}", attempt, exc, run)
                if final is exc:
                    raise
                if final is not None:
                    raise final from None
                attempt += 1


@dataclass
class _Run:
    """The attempts of one call so far."""

    started: float = field(default_factory=time.monotonic)
    stalls: int = 0


def _final(exc: BackendError, attempts: int, seconds: float) -> BackendError:
    """The error of the last attempt, saying how many were made (same class and hint)."""
    if attempts == 1:
        return exc
    final = type(exc)(f"{exc} (gave up after {attempts} attempts in {seconds:.0f}s)")
    final.hint = exc.hint
    return final


# --- circuit breaker -----------------------------------------------------------------------------


class CircuitBreakerBackend(_Wrapper):
    """Fails fast with `CircuitOpenError` while the breaker is open.

    Transient errors count as failures, a stall as half the threshold (two stalls in a row
    open it: each cost a stall time already). Any answer from the store (success, not found,
    exists, permanent) counts as success: the store is reachable, which is all a breaker is
    about. The error of a call refused meanwhile names the failure that opened it.
    """

    def __init__(self, inner: Backend, breaker: CircuitBreaker | None = None) -> None:
        super().__init__(inner)
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self._last_failure: BackendError | None = None

    def _call(self, fn: Callable[[], T]) -> T:
        if not self.breaker.allow():
            last = self._last_failure
            refused = CircuitOpenError(f"{self.location} was not tried again: it failed "
                                       f"repeatedly just before (last: {last})")
            refused.stalled = isinstance(last, StallError)
            raise refused
        try:
            result = fn()
        except BackendError as exc:
            if exc.transient:
                self._last_failure = exc
                stall = isinstance(exc, StallError)
                self.breaker.record_failure(-(-self.breaker.failure_threshold // 2) if stall else 1)
            else:
                self.breaker.record_success()
            raise
        except BaseException:
            self.breaker.record_failure()
            raise
        self.breaker.record_success()
        return result

    def put(self, name: str, data: Payload, *, overwrite: bool = False) -> None:
        check_name(name)
        self._call(lambda: self.inner.put(name, data, overwrite=overwrite))

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._call(lambda: self.inner.get(name, offset, length))

    def stat(self, name: str) -> ObjectInfo:
        return self._call(lambda: self.inner.stat(name))

    def delete(self, name: str) -> None:
        self._call(lambda: self.inner.delete(name))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        it = self._call(lambda: iter(self.inner.list(prefix)))
        while True:
            info = self._call(lambda: next(it, None))
            if info is None:
                return
            yield info


# --- rate limits ---------------------------------------------------------------------------------


class RateLimitedBackend(_Wrapper):
    """Limits the bytes per second of ``put`` (upload) and ``get`` (download).

    Downloads are read in ranged pieces of ``chunk_size`` and each piece is paid for before it is
    read, so the rate is smooth within a large object. Objects under ``whole_prefixes`` (those
    that may be overwritten) are read in one piece, so a read never mixes two versions. An upload
    is paid for in pieces before it starts, so other threads' transfers interleave fairly.
    """

    def __init__(
        self,
        inner: Backend,
        upload: TokenBucket | None = None,
        download: TokenBucket | None = None,
        chunk_size: int = 256 * 1024,
        whole_prefixes: tuple[str, ...] = ("sessions/",),
    ) -> None:
        super().__init__(inner)
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self.upload = upload
        self.download = download
        self.chunk_size = chunk_size
        self.whole_prefixes = whole_prefixes

    def _pay(self, bucket: TokenBucket, n: int) -> None:
        while n > 0:
            piece = min(n, self.chunk_size)
            bucket.acquire(piece)
            n -= piece

    def put(self, name: str, data: Payload, *, overwrite: bool = False) -> None:
        if self.upload is not None:
            self._pay(self.upload, len(data))
        self.inner.put(name, data, overwrite=overwrite)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        bucket = self.download
        if bucket is None or bucket.rate is None:
            return self.inner.get(name, offset, length)
        if name.startswith(self.whole_prefixes) or (
            length is not None and length <= self.chunk_size
        ):
            data = self.inner.get(name, offset, length)
            self._pay(bucket, len(data))
            return data
        pieces: list[bytes] = []
        remaining = length
        while remaining is None or remaining > 0:
            want = self.chunk_size if remaining is None else min(self.chunk_size, remaining)
            bucket.acquire(want)
            piece = self.inner.get(name, offset, want)
            pieces.append(piece)
            offset += len(piece)
            if remaining is not None:
                remaining -= len(piece)
            if len(piece) < want:
                break
        return b"".join(pieces)


# --- a guard -------------------------------------------------------------------------------------


class Guard(Protocol):
    def check(self) -> None:
        """Raise to refuse the call about to be made (the guard's own error, not a backend's)."""

    def stored(self, name: str, size: int, began: float) -> None:
        """``size`` bytes were stored as ``name``; the put began at wall time ``began``."""


class GuardedBackend(_Wrapper):
    """Asks ``guard`` before every call, and tells it of every object stored.

    A refusal is the guard's own exception, never a `BackendError`, so no retry wrapper outside
    this one retries it. A listing is checked once, before it starts.
    """

    def __init__(self, inner: Backend, guard: Guard) -> None:
        super().__init__(inner)
        self.guard = guard

    def put(self, name: str, data: Payload, *, overwrite: bool = False) -> None:
        self.guard.check()
        began = time.time()
        self.inner.put(name, data, overwrite=overwrite)
        self.guard.stored(name, len(data), began)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self.guard.check()
        return self.inner.get(name, offset, length)

    def stat(self, name: str) -> ObjectInfo:
        self.guard.check()
        return self.inner.stat(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self.guard.check()
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self.guard.check()
        self.inner.delete(name)


# --- concurrency ---------------------------------------------------------------------------------


class ConcurrencyLimitedBackend(_Wrapper):
    """At most ``max_concurrent`` calls reach the inner backend at once.

    A listing holds a slot only while it fetches its next entry, so a caller may read objects
    while it walks a listing even with a single slot.
    """

    def __init__(self, inner: Backend, max_concurrent: int) -> None:
        super().__init__(inner)
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.max_concurrent = max_concurrent
        self._slots = threading.BoundedSemaphore(max_concurrent)

    def put(self, name: str, data: Payload, *, overwrite: bool = False) -> None:
        with self._slots:
            self.inner.put(name, data, overwrite=overwrite)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        with self._slots:
            return self.inner.get(name, offset, length)

    def stat(self, name: str) -> ObjectInfo:
        with self._slots:
            return self.inner.stat(name)

    def delete(self, name: str) -> None:
        with self._slots:
            self.inner.delete(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._slots:
            it = iter(self.inner.list(prefix))
        while True:
            with self._slots:
                info = next(it, None)
            if info is None:
                return
            yield info


class AdaptiveBackend(_Wrapper):
    """Uploads pay ``controller``'s pacing rate, take one of its slots (keepwell.backends.adaptive)
    and tell it how they ended: the number of uploads at once and their rate follow the link.
    An upload's latency is timed from its slot, so the time it waited for the pacing rate is not
    taken for the link's. Other calls pass untouched."""

    def __init__(self, inner: Backend, controller: AimdController) -> None:
        super().__init__(inner)
        self.controller = controller

    def put(self, name: str, data: Payload, *, overwrite: bool = False) -> None:
        self.controller.pace(len(data))
        generation = self.controller.acquire()
        outcome: Outcome | None = None
        began = self.controller.clock()
        try:
            self.inner.put(name, data, overwrite=overwrite)
            outcome = Outcome("ok", self.controller.clock() - began, len(data))
        except StallError:
            outcome = Outcome("timeout")
            raise
        except TransientBackendError:
            outcome = Outcome("error")
            raise
        finally:
            self.controller.release(generation, outcome)


# --- cache ---------------------------------------------------------------------------------------

# ``config`` is not among them: it is read before the repository is known (see `bind`), and a
# repository made anew at the same place has a config of the same name and other content
DEFAULT_CACHED_PREFIXES = ("keys/", "index/", "snapshots/", "tree/")
Verify = Callable[[str, bytes], bool]


class CachedBackend(_Wrapper):
    """A local read-through cache of small immutable objects (keys, index, snapshots, trees).

    Objects whose names start with one of ``prefixes`` are kept in ``cache_dir`` once read or
    written; reads of them never reach the inner backend again. ``delete`` drops the cached copy.
    ``list`` always asks the inner backend. ``sessions/`` and ``data/`` are never cached, whatever
    the prefixes say: sessions change, and packs are large. Cache files are written to a temporary
    name and renamed, so a crash never leaves a partial object in the cache.

    Trust: ``verify(name, data)`` (when given) tells whether a cached copy is the object of that
    name; a copy that fails it (a damaged cache file) is dropped and read again from the inner
    backend, once per process and object. What the inner backend returns is verified too: a
    copy that fails is read once more (it may have been damaged on the way) and is never kept. `bind` narrows the cache to one repository (a
    subdirectory named by its id), so that a repository made anew at the same location, or
    another one of the same name elsewhere, never meets the cache of the first.
    """

    NEVER = ("sessions/", "data/")

    def __init__(
        self,
        inner: Backend,
        cache_dir: str | os.PathLike[str],
        prefixes: tuple[str, ...] = DEFAULT_CACHED_PREFIXES,
        *,
        verify: Verify | None = None,
    ) -> None:
        super().__init__(inner)
        self.cache_dir = os.path.abspath(os.fspath(cache_dir))
        self.prefixes = prefixes
        self.verify = verify
        self._verified: set[str] = set()
        self._lock = threading.Lock()
        os.makedirs(self.cache_dir, mode=0o700, exist_ok=True)

    def bind(self, key: str) -> None:
        """Keep the cache of one repository (``key``: its id) apart from any other: from now
        on, in a subdirectory of its own, which records the key it was made for
        (keepwell.backends.cachedir describes the layout)."""
        check_name(key)
        directory = os.path.join(self.cache_dir, key)
        marker = os.path.join(directory, MARKER)
        try:
            with open(marker, encoding="utf-8") as f:
                trusted = f.read() == f"{key}\n{self.location}\n"
        except OSError:
            trusted = False
        if not trusted:
            # a cache we cannot tell is this repository's: start it anew
            shutil.rmtree(directory, ignore_errors=True)
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            except OSError as exc:  # a cache that cannot be written is only slower
                log.warning("cannot make the cache %s (%s); not caching", directory, exc)
                self.prefixes = ()
                return
            self._store_file(marker, f"{key}\n{self.location}\n".encode())
        touch(directory)  # its last use, for `keepwell cache --cleanup`
        with self._lock:
            self.cache_dir = directory
            self._verified.clear()

    def _cacheable(self, name: str) -> bool:
        return name.startswith(self.prefixes) and not name.startswith(self.NEVER)

    def _path(self, name: str) -> str:
        return os.path.join(self.cache_dir, *check_name(name).split("/"))

    def _store(self, name: str, data: Payload) -> None:
        self._store_file(self._path(name), data)
        with self._lock:
            self._verified.add(name)  # what we wrote or read from the inner backend

    @staticmethod
    def _store_file(path: str, data: Payload) -> None:
        tmp = f"{path}.tmp-{tokens.token_hex(6)}"
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            with open(tmp, "wb") as f:
                for piece in payload_pieces(data):
                    f.write(piece)
            os.replace(tmp, path)
        except OSError as exc:
            # A cache that cannot be written is only slower, never wrong.
            log.warning("cannot write %s to the cache: %s", path, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _drop(self, name: str) -> None:
        with self._lock:
            self._verified.discard(name)
        with contextlib.suppress(OSError):
            os.unlink(self._path(name))

    def _cached(self, name: str, offset: int, length: int | None) -> bytes | None:
        """The cached bytes asked for, or None (not cached, or a copy that fails `verify`)."""
        try:
            with open(self._path(name), "rb", buffering=0) as f:
                with self._lock:
                    trusted = self.verify is None or name in self._verified
                if trusted:  # only the range asked for: a tree pack holds thousands of trees
                    if length is None:
                        f.seek(offset)
                        return f.read()
                    return os.pread(f.fileno(), length, offset)
                whole = f.read()
        except OSError:
            return None
        assert self.verify is not None
        if not self.verify(name, whole):
            log.warning("cached copy of %s is damaged; read again from %s", name, self.location)
            self._drop(name)
            return None
        with self._lock:
            self._verified.add(name)
        return whole[offset:] if length is None else whole[offset:offset + length]

    def open_spool(self, directory: str | None = None) -> Spool | None:
        """The inner backend's spool, in the cache directory unless another is asked for."""
        return super().open_spool(directory or self.cache_dir)

    def put(self, name: str, data: Payload, *, overwrite: bool = False) -> None:
        if overwrite and self._cacheable(name):
            self._drop(name)
        self.inner.put(name, data, overwrite=overwrite)
        if self._cacheable(name):
            self._store(name, data)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if not self._cacheable(name):
            return self.inner.get(name, offset, length)
        hit = self._cached(name, offset, length)
        if hit is not None:
            return hit
        data = self.inner.get(name)
        end = len(data) if length is None else offset + length
        if self.verify is not None and not self.verify(name, data):
            # bytes damaged on the way (a faulty link, proxy or server) are no damage in
            # storage: read once more, and never keep a copy that is not the object
            log.warning("%s read from %s is damaged; reading it again", name, self.location)
            data = self.inner.get(name)
            end = len(data) if length is None else offset + length
            if not self.verify(name, data):
                return data[offset:end]  # the caller finds the damage and says so
        self._store(name, data)
        return data[offset:end]

    def stat(self, name: str) -> ObjectInfo:
        if self._cacheable(name):
            try:
                return ObjectInfo(name, os.stat(self._path(name)).st_size)
            except OSError:
                pass
        return self.inner.stat(name)

    def delete(self, name: str) -> None:
        if self._cacheable(name):
            self._drop(name)
        self.inner.delete(name)


# --- the usual stack -----------------------------------------------------------------------------


def wrap(
    backend: Backend,
    *,
    limit_upload: float | None = None,
    limit_download: float | None = None,
    retries: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    max_concurrent: int | None = None,
    cache_verify: Verify | None = None,
    upload_buckets: Sequence[TokenBucket] = (),
    guard: Guard | None = None,
    adaptive: AimdController | None = None,
) -> Backend:
    """Dress ``backend`` in the usual wrappers.

    ``limit_upload`` and ``limit_download`` are in KiB/s (as the ``--limit-upload`` and
    ``--limit-download`` options); ``None`` or 0 means unlimited. ``cache_dir`` is a base
    directory: the cache of this backend is a subdirectory named by a hash of its location and
    endpoint (``backend.cache_identity``, where it has one), and `CachedBackend.bind` narrows it to one
    repository; ``cache_verify`` is the cache's `CachedBackend.verify`. ``upload_buckets`` are
    budgets shared with others (each upload pays every one of them), ``guard`` a `Guard`,
    ``adaptive`` the controller of the number of uploads at once (`AdaptiveBackend`).
    From the outside in: cache → retries → guard → circuit breaker → shared budgets → rate limit
    → adaptive uploads → concurrency limit → backend, so cache hits cost nothing, a retry waits
    without holding a connection slot, each attempt is guarded (a refusal is no failure of the
    backend), retried bytes count against the rate limits, and an upload's latency is the
    link's, not the time it waited for its budget.
    """
    b: Backend = backend
    if max_concurrent:
        b = ConcurrencyLimitedBackend(b, max_concurrent)
    if adaptive is not None:
        b = AdaptiveBackend(b, adaptive)
    if limit_upload or limit_download:
        b = RateLimitedBackend(
            b,
            upload=TokenBucket(limit_upload * 1024) if limit_upload else None,
            download=TokenBucket(limit_download * 1024) if limit_download else None,
        )
    for bucket in upload_buckets:
        b = RateLimitedBackend(b, upload=bucket)
    if retries:
        b = CircuitBreakerBackend(b, CircuitBreaker())
    if guard is not None:
        b = GuardedBackend(b, guard)
    if retries:
        b = RetryingBackend(b)
    if cache_dir is not None:
        # One directory may serve many repositories (~/.cache/keepwell): each location gets its
        # own subdirectory, the same bucket and prefix on two endpoints two of them.
        import hashlib  # here: hashlib loads OpenSSL's libcrypto (see keepwell.tokens)

        identity = getattr(backend, "cache_identity", backend.location)
        digest = hashlib.sha256(identity.encode()).hexdigest()[:24]
        b = CachedBackend(b, os.path.join(os.fspath(cache_dir), digest), verify=cache_verify)
    return b
