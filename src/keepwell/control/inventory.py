"""What the configured repositories hold, kept fresh for views that ask often (the web app).

An *inventory* of a repository is its snapshots and its figures: the bytes its packs take
(``stored``), the bytes of its distinct blobs before compression (``unique``), the logical bytes
its snapshots stand for (``logical``, the sum of each snapshot's ``bytes_processed``), and the
ratios ``compression = unique / stored`` and ``dedup = logical / unique``. Counting them opens
the repository and walks its index, so `Inventory` keeps each one until the job history shows a
newer finished run (a backup, a drill or a forget changed it) or ``ttl`` seconds pass.

`growth` tells how a repository grew from the job history alone: per successful backup of its
sources, the bytes it added, and the running total since the first one recorded.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from keepwell.control.config import Config
from keepwell.control.history import History
from keepwell.control.jobs import open_configured
from keepwell.control.pitr import windows
from keepwell.errors import KeepwellError
from keepwell.repository import Snapshot
from keepwell.repository.stats import raw_data
from keepwell.sources.base import Window


@dataclass
class RepositoryFigures:
    name: str
    snapshots: list[Snapshot] = field(default_factory=list)
    stored: int | None = None
    unique: int | None = None
    logical: int | None = None
    blobs: int | None = None
    error: str | None = None
    counted_at: float = field(default_factory=time.time)

    @property
    def compression(self) -> float | None:
        return round(self.unique / self.stored, 3) if self.unique and self.stored else None

    @property
    def dedup(self) -> float | None:
        return round(self.logical / self.unique, 3) if self.logical and self.unique else None

    def as_dict(self) -> dict[str, Any]:
        return {"repository": self.name, "snapshots": len(self.snapshots),
                "stored_bytes": self.stored, "unique_bytes": self.unique,
                "logical_bytes": self.logical, "blobs": self.blobs,
                "compression_ratio": self.compression, "dedup_ratio": self.dedup,
                "error": self.error, "counted_at": self.counted_at}


def count(cfg: Config, name: str) -> RepositoryFigures:
    """Open a configured repository and count its figures (an error is recorded, not raised)."""
    repo_cfg = cfg.repositories[name]
    try:
        repo = open_configured(name, repo_cfg.location, repo_cfg.password)
        try:
            snaps = list(repo.list_snapshots())
            raw = raw_data(repo, [], whole=True)
        finally:
            repo.close()
    except KeepwellError as exc:
        return RepositoryFigures(name, error=exc.line())
    logical = 0
    for snap in snaps:
        summary = snap.summary or {}
        value = summary.get("bytes_processed", summary.get("bytes_read"))
        if isinstance(value, int | float):
            logical += int(value)
    return RepositoryFigures(name, snaps, stored=int(raw["stored_size"]),
                             unique=int(raw["unique_raw_size"]), logical=logical,
                             blobs=int(raw["total_blob_count"]))


class Inventory:
    """`count` of every repository, and the PITR windows, recounted only when needed."""

    def __init__(self, cfg: Config, history: History, ttl: float = 300.0) -> None:
        self.cfg = cfg
        self.history = history
        self.ttl = ttl
        self._lock = threading.Lock()
        self._figures: dict[str, RepositoryFigures] = {}
        self._windows: dict[str, Window] | None = None
        self._mark: tuple[int, int] | None = None

    def _fresh(self) -> None:
        """Drop what a newer finished run or the passing time made stale (lock held)."""
        newest = self.history.runs(limit=1)
        running = len(self.history.runs(status="running", limit=1000))
        mark = (newest[0].id if newest else 0, running)
        expired = any(time.time() - f.counted_at > self.ttl for f in self._figures.values())
        if mark != self._mark or expired:
            self._figures.clear()
            self._windows = None
            self._mark = mark

    def figures(self, name: str) -> RepositoryFigures:
        with self._lock:
            self._fresh()
            if name not in self._figures:
                self._figures[name] = count(self.cfg, name)
            return self._figures[name]

    def snapshots(self, name: str) -> list[Snapshot]:
        figures = self.figures(name)
        if figures.error is not None:
            raise KeepwellError(figures.error)
        return figures.snapshots

    def windows(self) -> dict[str, Window]:
        with self._lock:
            self._fresh()
            if self._windows is not None:
                return self._windows
        found = windows(self.cfg, self.snapshots)
        with self._lock:
            self._windows = found
        return found


def growth(cfg: Config, history: History, name: str, limit: int = 500) -> list[dict[str, Any]]:
    """How repository ``name`` grew, oldest first: time, source, bytes added, running total
    (from the job history's successful backups of the sources that write into it)."""
    runs = []
    for source, src in cfg.sources.items():
        if src.repository == name:
            runs += history.successes(source, "backup", limit=limit)
    runs.sort(key=lambda r: r.ended_at or r.started_at)
    total = 0
    out = []
    for r in runs[-limit:]:
        total += r.bytes_stored or 0
        out.append({"time": r.ended_at, "source": r.source, "added": r.bytes_stored or 0,
                    "total": total})
    return out

