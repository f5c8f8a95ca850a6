"""The point-in-time-restore window of database sources, for ``status`` and ``/metrics``.

The *PITR window* of a source is the span a restore can stop anywhere in: for PostgreSQL from
the oldest retained complete physical backup (its end) to the newest archived WAL that backup
reaches without a gap (`keepwell.sources.postgres.catalog`); for MySQL/MariaDB from the oldest
base whose binlogs are archived to the newest archived binlog event it reaches
(`keepwell.sources.mysql.catalog`). Both are read from the snapshot records alone, so computing
them lists each repository's snapshots once and reads no data.

`windows(cfg)` returns one `Window` per PostgreSQL/MySQL source; a repository that cannot be
opened gives its sources a window with ``error`` set instead of failing the whole report.
`WindowCache` keeps the figures for a while so metric scrapes do not list snapshots each time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from keepwell.errors import KeepwellError


@dataclass
class Window:
    source: str
    kind: str
    start: float | None = None  # Unix time of the oldest point a restore can stop at
    end: float | None = None  # Unix time of the newest one
    parts: int = 0  # separate spans (more than one: a gap splits the window)
    problems: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def seconds(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return max(0.0, self.end - self.start)

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {"from": self.start, "to": self.end, "seconds": self.seconds,
                "end_age": None if self.end is None else max(0.0, now - self.end),
                "parts": self.parts, "problems": self.problems, "error": self.error}


def _ts(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value)).timestamp()


def postgres_window(name: str, snapshots: list[Any], cluster: str) -> Window:
    from keepwell.sources.postgres.catalog import Catalog
    from keepwell.sources.postgres.report import windows

    cat = Catalog.build(snapshots, cluster)
    win = Window(name, "postgres")
    complete = cat.complete_backups()
    if not complete:
        win.problems.append("no complete physical backup: point-in-time restore is not possible"
                            if not cat.backups else
                            "no physical backup has all its WAL archived")
        return win
    spans = windows(cat)
    win.parts = len(spans)
    win.start = min(_ts(b.stop_time or b.time) or 0.0 for b in complete)
    ends = [_ts(cat.reach(b).end_time or b.stop_time or b.time) for b in complete]
    win.end = max(e for e in ends if e is not None)
    for t, a, b in cat.gaps():
        win.problems.append(f"WAL gap on timeline {t}: {a} .. {b}")
    return win


def mysql_window(name: str, snapshots: list[Any], server_name: str | None) -> Window:
    from keepwell.sources.mysql.catalog import ServerArchive

    snaps = [s for s in snapshots if s.kind.startswith("mysql-")
             and (server_name is None or s.host == server_name)]
    win = Window(name, "mysql")
    hosts = sorted({s.host for s in snaps})
    if server_name is None and len(hosts) > 1:
        win.error = (f"the repository holds MySQL snapshots of {len(hosts)} servers; set the "
                     "source's server_name")
        return win
    cat = ServerArchive.build(snaps)
    w = cat.window()
    win.start, win.end = _ts(w.get("from")), _ts(w.get("to"))
    win.parts = 1 if win.start is not None else 0
    if win.start is None:
        win.problems.append("no base backup with its binlogs archived: point-in-time restore "
                            "is not possible")
    for gap in cat.gaps():
        win.problems.append(f"binlogs missing after {gap['after']}: {', '.join(gap['missing'])}")
    win.problems += cat.problems()
    return win


def windows(cfg: Any) -> dict[str, Window]:
    """The PITR window of every PostgreSQL and MySQL source of a validated config."""
    from keepwell.backends import open_backend
    from keepwell.control.secrets import resolve
    from keepwell.repository import Repository

    by_repo: dict[str, list[str]] = {}
    for name, src in cfg.sources.items():
        if src.kind in ("postgres", "mysql"):
            by_repo.setdefault(src.repository, []).append(name)
    out: dict[str, Window] = {}
    for repo_name, names in by_repo.items():
        repo_cfg = cfg.repositories[repo_name]
        try:
            password = resolve(repo_cfg.password, what=f"repository {repo_name} password")
            repo = Repository.open(open_backend(repo_cfg.location), password)
            try:
                snapshots = list(repo.list_snapshots())
            finally:
                repo.close()
        except KeepwellError as exc:
            for name in names:
                out[name] = Window(name, cfg.sources[name].kind, error=exc.line())
            continue
        for name in names:
            src = cfg.sources[name]
            if src.kind == "postgres":
                out[name] = postgres_window(name, snapshots, src.cluster)
            else:
                out[name] = mysql_window(name, snapshots, src.server_name)
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
