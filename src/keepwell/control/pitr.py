"""The point-in-time-restore windows of a configuration's sources, for ``status`` and ``/metrics``.

A source whose kind archives a log has a *PITR window* (`keepwell.sources.base.Window`), which
its source computes from the snapshot records alone (`Source.pitr_window`); computing them lists
each repository's snapshots once and reads no data.

`windows(cfg)` returns one `Window` per such source; a repository that cannot be opened gives
its sources a window with ``error`` set instead of failing the whole report. `WindowCache` keeps
the figures for a while so metric scrapes do not list snapshots each time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from keepwell.control.jobs import configured_source, open_configured
from keepwell.errors import KeepwellError
from keepwell.repository import Snapshot
from keepwell.sources.base import Window, source_for


def has_windows(cfg: Any) -> bool:
    """Whether any source of a validated config has a PITR window."""
    return any(source_for(s.kind).point_in_time for s in cfg.sources.values())


def list_snapshots(cfg: Any, repo_name: str) -> list[Snapshot]:
    """Every snapshot of a configured repository (opened with its password, read-only use)."""
    repo_cfg = cfg.repositories[repo_name]
    repo = open_configured(repo_name, repo_cfg.location, repo_cfg.password)
    try:
        return list(repo.list_snapshots())
    finally:
        repo.close()


def windows(cfg: Any,
            listing: Callable[[str], list[Snapshot]] | None = None) -> dict[str, Window]:
    """The PITR window of every source of a validated config whose kind has one; ``listing``
    gives a repository's snapshots (default: `list_snapshots`, listed now)."""
    by_repo: dict[str, list[str]] = {}
    for name, src in cfg.sources.items():
        if source_for(src.kind).point_in_time:
            by_repo.setdefault(src.repository, []).append(name)
    out: dict[str, Window] = {}
    for repo_name, names in by_repo.items():
        try:
            snapshots = (listing or (lambda n: list_snapshots(cfg, n)))(repo_name)
        except KeepwellError as exc:
            for name in names:
                out[name] = Window(name, cfg.sources[name].kind, error=exc.line())
            continue
        for name in names:
            found = source_for(cfg.sources[name].kind).pitr_window(configured_source(cfg, name),
                                                                  snapshots)
            if found is not None:
                out[name] = found
    return out


class WindowCache:
    """`windows` at most once per ``ttl`` seconds (metric scrapes come often)."""

    def __init__(self, cfg: Any, ttl: float = 60.0) -> None:
        self.cfg = cfg
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at = 0.0
        self._value: dict[str, Window] = {}

    def get(self) -> dict[str, Window]:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl or not self._at:
                self._value = windows(self.cfg)
                self._at = time.monotonic()
            return self._value

    def invalidate(self) -> None:
        with self._lock:
            self._at = 0.0
