"""Continuous WAL streaming: ``pg_receivewal`` with a replication slot, shipped as it arrives.

``pg_receivewal`` writes the WAL it receives into a local directory: finished segments under
their own names and the segment in progress as ``<name>.partial`` (pre-padded to full size, so
it can stand in for the segment at the end of a recovery). `WalStreamer` polls that directory
every ``interval`` seconds: finished segments are archived and removed locally; the partial
segment is archived again whenever it changed, and the archived copy it replaces is forgotten,
so at most one partial per segment stays in the repository. With an interval under a second,
what the repository can restore trails the server by less than a second.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import blake3
from psycopg import sql

from keepwell.sources.postgres.archive import WalArchive, WalItem
from keepwell.sources.postgres.connection import ConnSpec, connect, server_facts
from keepwell.sources.postgres.errors import PostgresError
from keepwell.sources.postgres.tools import find_program, pg_tool
from keepwell.sources.postgres.walnames import PARTIAL_SUFFIX, wal_kind


@dataclass
class StreamStats:
    segments: int = 0
    partial_uploads: int = 0
    restarts: int = 0
    last_upload: float | None = None
    errors: list[str] = field(default_factory=list)


def ensure_slot(spec: ConnSpec, slot: str) -> bool:
    """Create physical replication slot `slot` (reserving WAL now) unless it exists."""
    with connect(spec) as conn:
        if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                        (slot,)).fetchone():
            return False
        conn.execute(sql.SQL("SELECT pg_create_physical_replication_slot({}, true)").format(
            sql.Literal(slot)))
        return True


class WalStreamer:
    def __init__(self, repo: Any, spec: ConnSpec, cluster: str, directory: str, *,
                 slot: str, synchronous: bool = False, interval: float = 0.5,
                 on_event: Callable[[str], None] | None = None) -> None:
        self.archive = WalArchive(repo, cluster)
        self.spec = spec
        self.directory = os.path.abspath(directory)
        self.slot = slot
        self.synchronous = synchronous
        self.interval = interval
        self.on_event = on_event or (lambda _msg: None)
        self.stats = StreamStats()
        self.stop = threading.Event()
        self._partial_hash: dict[str, str] = {}
        self._partial_snaps: dict[str, list[str]] = {}

    def run(self, *, exit_on_disconnect: bool = False) -> StreamStats:
        os.makedirs(self.directory, 0o700, exist_ok=True)
        with connect(self.spec) as conn:
            facts = server_facts(conn)
        self.archive.check_identity(facts.system_identifier, "this server")
        ensure_slot(self.spec, self.slot)
        self._adopt_archived_partials()
        program = find_program("pg_receivewal", facts.major)
        argv = [program, *self.spec.dbname_arg(), "-D", self.directory, "--slot", self.slot,
                "-n", "-v"]
        if self.synchronous:
            argv.append("--synchronous")
        for sig in (signal.SIGTERM, signal.SIGINT):
            if threading.current_thread() is threading.main_thread():
                signal.signal(sig, lambda *_: self.stop.set())
        delay = 1.0
        while not self.stop.is_set():
            with pg_tool(argv, stdout=None) as proc:
                while proc.proc.poll() is None and not self.stop.is_set():
                    self.ship()
                    self.stop.wait(self.interval)
                if proc.proc.poll() is None:
                    proc.proc.terminate()
                rc = proc.wait(30)
            self.ship()
            if self.stop.is_set():
                break
            self.on_event(f"pg_receivewal exited ({rc}): {proc.failure_text()}")
            if exit_on_disconnect:
                break
            self.stats.restarts += 1
            self.stop.wait(delay)
            delay = min(30.0, delay * 2)
        return self.stats

    def _adopt_archived_partials(self) -> None:
        cat = self.archive.catalog(refresh=True)
        for base, wf in cat.partials.items():
            self._partial_snaps.setdefault(base, []).append(wf.snapshot_id)

    def ship(self) -> None:
        """Archive what pg_receivewal has written since the last call."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return
        done = [n for n in names if wal_kind(n) in ("segment", "history")]
        partials = [n for n in names if wal_kind(n) == "partial"]
        try:
            if done:
                items = [WalItem(n, os.path.join(self.directory, n)) for n in done]
                result = self.archive.push(items)
                for name, reason in result.refused.items():
                    self.stats.errors.append(f"{name}: {reason}")
                    self.on_event(f"refused {name}: {reason}")
                for name in result.stored + result.already:
                    if wal_kind(name) == "segment":
                        os.unlink(os.path.join(self.directory, name))
                        self.stats.segments += 1
                        self._drop_partials(name)
            for name in partials:
                self._ship_partial(name)
            self.stats.last_upload = time.time()
        except (PostgresError, OSError) as exc:
            self.stats.errors.append(str(exc))
            self.on_event(f"upload failed: {exc}")

    def _ship_partial(self, name: str) -> None:
        path = os.path.join(self.directory, name)
        try:
            with open(path, "rb") as f:
                digest = blake3.blake3(f.read()).hexdigest()
        except FileNotFoundError:
            return
        base = name[: -len(PARTIAL_SUFFIX)]
        if self._partial_hash.get(base) == digest:
            return
        result = self.archive.push([WalItem(name, path)])
        if result.snapshot_id is None:
            return
        self._partial_hash[base] = digest
        old = self._partial_snaps.get(base, [])
        self._partial_snaps[base] = [result.snapshot_id]
        self.archive.forget_snapshots([s for s in old if s != result.snapshot_id])
        self.stats.partial_uploads += 1

    def _drop_partials(self, segment: str) -> None:
        old = self._partial_snaps.pop(segment, [])
        self._partial_hash.pop(segment, None)
        self.archive.forget_snapshots(old)
