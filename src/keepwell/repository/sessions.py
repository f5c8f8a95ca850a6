"""Sessions: how a running backup tells prune what it may still reference.

A writing process stores ``sessions/<id>`` before it loads the index and refreshes it (a
heartbeat) while it runs; it deletes it at the end. Prune deletes a pack only when no live
session began before the pack left the index: such a session may hold the pack's blobs in the
index it loaded. A session whose heartbeat is older than the stale limit is taken as dead
(a killed process).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keepwell.errors import BackendError, KeepwellError

if TYPE_CHECKING:
    from keepwell.repository.repo import Repository

KIND_SESSION = b"kw-session"


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
        self.id = secrets.token_hex(16)
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


def list_sessions(repo: Repository) -> list[SessionInfo]:
    out = []
    for info in repo.backend.list("sessions/"):
        try:
            plain = repo.master.decrypt_object(KIND_SESSION, repo.backend.get(info.name), info.name)
            d = json.loads(plain)
        except (KeepwellError, ValueError):
            continue
        out.append(SessionInfo(info.name.split("/", 1)[1], d["host"], d["pid"], d["started"],
                               d["heartbeat"]))
    return out
