"""Sessions: how a running backup tells prune what it may still reference.

A writing process stores ``sessions/<id>`` before it loads the index and refreshes it (a
heartbeat) while it runs; it deletes it at the end. Prune deletes a pack only when no live
session began before the pack left the index: such a session may hold the pack's blobs in the
index it loaded.

The prune lock (``locks/prune``) keeps two prunes from running at once; backups never look at
it. It is taken with a create-only put, refreshed like a session, and taken over once its
holder is gone. Its holder checks that the lock is still its own before each step that deletes.

Words:
    marker  a session or the prune lock: an object that says a process (host, pid, when it
            started) is at work, refreshed by its heartbeat
    stale   a marker whose heartbeat is older than the stale limit (``KEEPWELL_SESSION_STALE``,
            900 s): its process is taken as dead, wherever it ran
    gone    a marker written on this machine (same host name, boot and process namespace) by a
            process that no longer runs (no such pid, or the pid now names a process that
            started at another moment): dead at once, without waiting for the stale limit

A marker that cannot be read (damaged) counts as live until it is stale, by the time its object
was last written: prune fails safe, and keeps what a running backup may use. Where the backend
does not tell that time, it stays live until ``keepwell unlock --remove-all`` removes it.
`unlock` removes the markers of processes that are gone or stale (or every one, when told).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cache

from keepwell import tokens
from keepwell.errors import (
    BackendError,
    IntegrityError,
    KeepwellError,
    ObjectExistsError,
    ObjectNotFoundError,
)
from keepwell.repository.format import KIND_SESSION
from keepwell.repository.store import RepositoryStore

KIND_LOCK = b"kw-lock"
PRUNE_LOCK = "locks/prune"


def heartbeat_seconds() -> float:
    return float(os.environ.get("KEEPWELL_SESSION_HEARTBEAT", "60"))


def stale_seconds() -> float:
    return float(os.environ.get("KEEPWELL_SESSION_STALE", "900"))


@cache
def this_machine() -> str:
    """This boot of this machine and this process namespace ('' if the system does not say):
    where a pid names the same process for every keepwell that reads it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def process_start(pid: int) -> int:
    """When process ``pid`` started, in clock ticks since boot (from /proc; 0 if unknown): with
    the pid, it names one process of this boot, whatever the wall clock does meanwhile."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class Marker:
    """What a session or lock object says of its writer. For an unreadable one (``readable``
    False): no host or pid, and ``heartbeat`` is when its object was last written."""

    name: str
    host: str
    pid: int
    started: float
    heartbeat: float
    machine: str = ""
    process_start: int = 0  # of its writer, see `process_start` (0: not recorded)
    purpose: str = ""
    readable: bool = True
    token: str = field(default="", repr=False)

    @property
    def id(self) -> str:
        return self.name.split("/", 1)[1]

    def stale(self, now: float) -> bool:
        return now - self.heartbeat >= stale_seconds()

    def gone(self) -> bool:
        """Its process ran on this machine and has ended."""
        if (not self.readable or self.pid <= 0 or not self.machine
                or self.machine != this_machine() or self.host != socket.gethostname()):
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # it runs, as another user
        # the pid runs: the same process, unless it started at another moment (a reused pid)
        now_start = process_start(self.pid)
        return bool(self.process_start and now_start and now_start != self.process_start)

    def live(self, now: float) -> bool:
        return not self.stale(now) and not self.gone()

    def describe(self, now: float) -> str:
        """Who holds it and until when it counts, for messages."""
        until = datetime.fromtimestamp(self.heartbeat + stale_seconds()).strftime("%Y-%m-%d %H:%M:%S")
        if not self.readable:
            return (f"{self.name} cannot be read (damaged); it counts as held until it is stale "
                    f"at {until} ({stale_seconds():.0f}s after it was last written)")
        began = datetime.fromtimestamp(self.started).strftime("%Y-%m-%d %H:%M:%S")
        return (f"pid {self.pid} on {self.host}, since {began}, last heard of "
                f"{max(0.0, now - self.heartbeat):.0f}s ago; stale at {until} "
                f"(after {stale_seconds():.0f}s of silence)")


def _marker(repo: RepositoryStore, name: str, kind: bytes, stored: bytes,
            mtime: float | None) -> Marker:
    try:
        d = json.loads(repo.master.decrypt_object(kind, stored, name))
        return Marker(name, str(d["host"]), int(d["pid"]), float(d["started"]),
                      float(d["heartbeat"]), str(d.get("machine", "")),
                      int(d.get("process_start", 0)), str(d.get("purpose", "")),
                      token=str(d.get("token", "")))
    except (IntegrityError, ValueError, KeyError, TypeError, AttributeError):
        written = time.time() if mtime is None else mtime
        return Marker(name, "", 0, written, written, readable=False)


def _doc(purpose: str, started: float, **more: str) -> bytes:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "machine": this_machine(),
                       "process_start": process_start(os.getpid()), "started": started,
                       "heartbeat": time.time(), "purpose": purpose, **more}).encode()



class Session:
    def __init__(self, repo: RepositoryStore, purpose: str) -> None:
        self.repo = repo
        self.id = tokens.token_hex(16)
        self.name = f"sessions/{self.id}"
        self.started = time.time()
        self.purpose = purpose
        self._stop = threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._beat, name="kw-heartbeat", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        data = self.repo.master.encrypt_object(KIND_SESSION, _doc(self.purpose, self.started))
        self.repo.backend.put(self.name, data, overwrite=True)

    def _beat(self) -> None:
        while not self._stop.wait(heartbeat_seconds()):
            try:
                self._write()
            except BackendError:
                pass  # the next beat tries again; a long outage makes prune wait, never delete

    def end(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.repo.backend.delete(self.name)
        except KeepwellError:
            pass


def list_sessions(repo: RepositoryStore, *, strict: bool = False) -> list[Marker]:
    """Every session object, readable or not (see `Marker`). ``strict``: a session that cannot
    be fetched because storage failed raises instead of being skipped (prune must not take an
    unfetched session for an ended one)."""
    out = []
    for info in repo.backend.list("sessions/"):
        try:
            stored = repo.backend.get(info.name)
        except ObjectNotFoundError:
            continue  # ended since the listing
        except BackendError:
            if strict:
                raise
            continue
        out.append(_marker(repo, info.name, KIND_SESSION, stored, info.mtime))
    return out


def read_prune_lock(repo: RepositoryStore) -> Marker | None:
    """The prune lock's marker; None if no prune holds it."""
    try:
        stored = repo.backend.get(PRUNE_LOCK)
        held = _marker(repo, PRUNE_LOCK, KIND_LOCK, stored, None)
        if not held.readable:  # it counts from when it was last written
            written = repo.backend.stat(PRUNE_LOCK).mtime
            if written is not None:
                held = replace(held, started=written, heartbeat=written)
        return held
    except ObjectNotFoundError:
        return None


@dataclass
class UnlockReport:
    removed: list[tuple[str, str]] = field(default_factory=list)  # (object, why)
    kept: list[tuple[str, str]] = field(default_factory=list)


def unlock(repo: RepositoryStore, *, remove_all: bool = False) -> UnlockReport:
    """Remove the markers of processes that are gone (at once) or stale; every marker with
    ``remove_all`` (only when no keepwell process uses the repository: a running backup whose
    session is removed is invisible to prune, which may then delete what it uploaded)."""
    report = UnlockReport()
    now = time.time()
    lock = read_prune_lock(repo)
    for m in list_sessions(repo) + ([lock] if lock is not None else []):
        if remove_all:
            why = "removed as asked (--remove-all)"
        elif m.gone():
            why = f"its process (pid {m.pid} on this host) has ended"
        elif m.stale(now):
            why = ("unreadable, and stale" if not m.readable
                   else f"silent for {now - m.heartbeat:.0f}s, past the stale limit")
        else:
            report.kept.append((m.name, m.describe(now)))
            continue
        if m.name == PRUNE_LOCK and not remove_all:
            again = read_prune_lock(repo)  # taken over meanwhile by a new prune: keep that one
            if again is None or again.token != m.token or again.heartbeat != m.heartbeat:
                continue
        try:
            repo.backend.delete(m.name)
        except ObjectNotFoundError:
            continue
        report.removed.append((m.name, why))
    return report


class PruneBusyError(KeepwellError):
    hint = ("wait for it to finish; if it was killed, 'keepwell unlock' removes its lock (at once "
            "on the host it ran on, anywhere once it is stale)")


class PruneLockLostError(KeepwellError):
    hint = "another prune took over the lock (this one was silent too long); run prune again"


class PruneLock:
    """The lock that keeps prunes apart (never backups): see the module docstring."""

    def __init__(self, repo: RepositoryStore) -> None:
        self.repo = repo
        self.token = tokens.token_hex(16)
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> bytes:
        return self.repo.master.encrypt_object(KIND_LOCK, _doc("prune", self.started, token=self.token))

    def _held_by_me(self) -> bool:
        held = read_prune_lock(self.repo)
        return held is not None and held.token == self.token

    def acquire(self) -> None:
        for _attempt in range(2):
            try:
                self.repo.backend.put(PRUNE_LOCK, self._doc())
                break
            except ObjectExistsError:
                pass
            held = read_prune_lock(self.repo)
            if held is None:
                continue  # released meanwhile
            now = time.time()
            if held.live(now) and held.readable:
                raise PruneBusyError(f"another prune is running: {held.describe(now)}")
            if held.live(now):
                raise PruneBusyError(
                    f"another prune may be running: {held.describe(now)}",
                    hint="wait until then; if no prune runs, 'keepwell unlock --remove-all' "
                         "removes the lock now")
            try:
                self.repo.backend.delete(PRUNE_LOCK)  # stale, or its process is gone
            except ObjectNotFoundError:
                pass
        else:
            raise PruneBusyError("another prune took the prune lock at the same moment")
        self._thread = threading.Thread(target=self._beat, name="kw-prune-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(heartbeat_seconds()):
            try:
                if not self._held_by_me():
                    return  # lost: verify() reports it before the next deletion
                self.repo.backend.put(PRUNE_LOCK, self._doc(), overwrite=True)
            except BackendError:
                pass  # the next beat tries again

    def verify(self) -> None:
        """Raise unless the lock is still this prune's (called before every deleting step)."""
        if not self._held_by_me():
            raise PruneLockLostError("the prune lock is no longer held by this prune; it stopped "
                                     "before deleting anything more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self._held_by_me():
                self.repo.backend.delete(PRUNE_LOCK)
        except KeepwellError:
            pass  # goes stale by itself

    def __enter__(self) -> PruneLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
