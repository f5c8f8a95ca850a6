"""Sessions: how a running backup tells prune what it may still reference.

A writing process stores ``sessions/<id>`` before it loads the index and refreshes it (a
heartbeat) while it runs; it deletes it at the end. Prune deletes a pack only when no live
session began before the pack left the index: such a session may hold the pack's blobs in the
index it loaded. A session whose heartbeat is older than the stale limit is taken as dead
(a killed process).

The prune lock (``locks/prune``) keeps two prunes from running at once; backups never look at
it. It is taken with a create-only put, refreshed like a session, and taken over once its
heartbeat is older than the stale limit (a killed prune). Its holder checks that the lock is
still its own before each step that deletes.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keepwell import tokens
from keepwell.errors import (
    BackendError,
    IntegrityError,
    KeepwellError,
    ObjectExistsError,
    ObjectNotFoundError,
)

if TYPE_CHECKING:
    from keepwell.repository.repo import Repository

KIND_SESSION = b"kw-session"
KIND_LOCK = b"kw-lock"
PRUNE_LOCK = "locks/prune"


def heartbeat_seconds() -> float:
    return float(os.environ.get("KEEPWELL_SESSION_HEARTBEAT", "60"))


def stale_seconds() -> float:
    return float(os.environ.get("KEEPWELL_SESSION_STALE", "900"))


@dataclass(frozen=True)
class SessionInfo:
    id: str
    host: str
    pid: int
    started: float
    heartbeat: float

    def live(self, now: float) -> bool:
        return now - self.heartbeat < stale_seconds()


class Session:
    def __init__(self, repo: Repository, purpose: str) -> None:
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
        doc = {"host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
               "heartbeat": time.time(), "purpose": self.purpose}
        data = self.repo.master.encrypt_object(KIND_SESSION, json.dumps(doc).encode())
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


def list_sessions(repo: Repository, *, strict: bool = False) -> list[SessionInfo]:
    """Every session object. ``strict``: a session that cannot be read because storage failed
    raises instead of being skipped (prune must not take an unreadable session for an ended one).
    """
    out = []
    for info in repo.backend.list("sessions/"):
        try:
            plain = repo.master.decrypt_object(KIND_SESSION, repo.backend.get(info.name), info.name)
            d = json.loads(plain)
            out.append(SessionInfo(info.name.split("/", 1)[1], d["host"], d["pid"], d["started"],
                                   d["heartbeat"]))
        except ObjectNotFoundError:
            continue  # ended since the listing
        except BackendError:
            if strict:
                raise
        except (KeepwellError, ValueError, KeyError, TypeError):
            continue  # not a session of this repository
    return out


class PruneBusyError(KeepwellError):
    hint = "wait for it to finish; a killed prune's lock is taken over once it is stale"


class PruneLockLostError(KeepwellError):
    hint = "another prune took over the lock (this one was silent too long); run prune again"


class PruneLock:
    """The lock that keeps prunes apart (never backups): see the module docstring."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.token = tokens.token_hex(16)
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> bytes:
        doc = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
               "started": self.started, "heartbeat": time.time(), "purpose": "prune"}
        return self.repo.master.encrypt_object(KIND_LOCK, json.dumps(doc).encode())

    def _read(self) -> dict[str, object] | None:
        """The lock's content; None if there is no lock; {} if it is unreadable (corrupt)."""
        try:
            stored = self.repo.backend.get(PRUNE_LOCK)
        except ObjectNotFoundError:
            return None
        try:
            d = json.loads(self.repo.master.decrypt_object(KIND_LOCK, stored, PRUNE_LOCK))
            return d if isinstance(d, dict) else {}
        except (IntegrityError, ValueError):
            return {}

    def acquire(self) -> None:
        for _attempt in range(2):
            try:
                self.repo.backend.put(PRUNE_LOCK, self._doc())
                break
            except ObjectExistsError:
                pass
            held = self._read()
            if held is None:
                continue  # released meanwhile
            beat = held.get("heartbeat")
            age = time.time() - beat if isinstance(beat, int | float) else None
            if age is not None and age < stale_seconds():
                raise PruneBusyError(
                    f"another prune is running on this repository (pid {held.get('pid')} on "
                    f"{held.get('host')}, last heard of {age:.0f}s ago; taken over after "
                    f"{stale_seconds():.0f}s of silence)")
            try:
                self.repo.backend.delete(PRUNE_LOCK)  # stale or unreadable: the holder is gone
            except ObjectNotFoundError:
                pass
        else:
            raise PruneBusyError("another prune took the prune lock at the same moment")
        self._thread = threading.Thread(target=self._beat, name="kw-prune-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(heartbeat_seconds()):
            try:
                held = self._read()
                if held is None or held.get("token") != self.token:
                    return  # lost: verify() reports it before the next deletion
                self.repo.backend.put(PRUNE_LOCK, self._doc(), overwrite=True)
            except BackendError:
                pass  # the next beat tries again

    def verify(self) -> None:
        """Raise unless the lock is still this prune's (called before every deleting step)."""
        held = self._read()
        if held is None or held.get("token") != self.token:
            raise PruneLockLostError("the prune lock is no longer held by this prune; it stopped "
                                     "before deleting anything more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if (self._read() or {}).get("token") == self.token:
                self.repo.backend.delete(PRUNE_LOCK)
        except KeepwellError:
            pass  # goes stale by itself

    def __enter__(self) -> PruneLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
