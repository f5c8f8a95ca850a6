"""The Source interface: what the control plane asks of every kind of source, and the registry.

A *kind* (``files``, ``sqlite``, ``postgres``, ``mysql``) names one implementation of `Source`.
The control plane knows none of them: it looks the kind of a configured source up
(`source_for`) and calls the interface, so a new kind plugs in without a change there.

Words:

- a *job* (`SourceJob`): one configured source as a job hands it over: its name and kind, its
  settings (the configuration's values as JSON: paths, connection, mode, cluster, retention,
  commands), the repository's settings (location, password *reference*), and for a drill the
  drill's settings. Secrets stay references until `JobControl.secret` reads them.
- `JobControl`: what the running job offers a source: `check` (raise when the job must stop:
  its deadline passed, or the daemon shuts down) and `secret`.
- a *restored copy* (`RestoredCopy`): what `restore` made in scratch space for a drill: a file
  tree, a database file, or a data directory with a temporary server running on it, and the
  newest point in time it holds. `verify` checks it (the drill's check: sizes and hashes,
  ``integrity_check``, ``pg_amcheck``, ``CHECK TABLE``, row counts) and returns its figures.
- a *forget plan* (`ForgetPlan`): what retention forgets. A *base* is a snapshot a restore
  starts from; a *log* (PostgreSQL WAL, MySQL binlogs) rolls a base forward. A kind with a log
  keeps the bases its policy keeps (and the one its point-in-time window starts from) and the
  log from the *log floor* on: the oldest log position a kept base needs. A kind without one
  forgets the snapshots its policy does not keep (the default here).
- a *PITR window* (`Window`): the span a point-in-time restore can stop anywhere in, read from
  the snapshot records alone; kinds without a log have none (`point_in_time` is false).

The registry names each kind's class as ``module:Class`` and imports it on first use, so a kind
costs nothing until a source of it is configured; `register` adds one.
"""

from __future__ import annotations

import importlib
import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from keepwell.errors import ConfigurationError
from keepwell.extras import missing_extra
from keepwell.repository import Repository
from keepwell.repository.retention import Policy, apply_policy
from keepwell.repository.snapshot import Snapshot


def source_tag(name: str) -> str:
    """The tag every snapshot of a configured source carries."""
    return f"source:{name}"


class JobControl(Protocol):
    """What a running job offers the source that does its work."""

    def check(self) -> None:
        """Raise if the job must stop now (its deadline passed, or a shutdown)."""

    def secret(self, reference: str, what: str) -> str:
        """The value a secret reference (``env:NAME``, ``file:PATH``) points to."""


@dataclass(frozen=True)
class SourceJob:
    """One configured source, as a job hands it to its kind."""

    name: str
    kind: str
    settings: Mapping[str, Any]
    repository: Mapping[str, Any]
    job_id: str = ""  # recorded in the snapshot where the kind can (a re-run finds it)
    drill: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return source_tag(self.name)

    @property
    def tags(self) -> list[str]:
        """The tags of a snapshot of this source: its own, then the configured ones."""
        return [self.tag, *(self.settings.get("tags") or [])]

    @property
    def host(self) -> str:
        """The host name its snapshots record (its ``host``, else this machine's name)."""
        return str(self.settings.get("host") or socket.gethostname())


def newest_snapshot(repo: Repository, job: SourceJob) -> Snapshot:
    """The newest snapshot tagged as the job's source's."""
    return repo.find_snapshot("latest", tags=[job.tag])


@dataclass
class BackupReport:
    snapshot: Snapshot
    problems: list[str] = field(default_factory=list)  # what could not be read (a partial one)


@dataclass
class RestoredCopy:
    """A restored copy in scratch space (see the module's words)."""

    snapshot_id: str
    point: float  # Unix time of the newest moment the copy holds (the drill's RPO counts from it)
    path: str
    bytes: int | None = None
    details: dict[str, Any] = field(default_factory=dict)  # what the restore found out


CopyT = TypeVar("CopyT", bound=RestoredCopy)


@dataclass
class ForgetPlan:
    bases: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)  # log snapshots wholly below the floor
    log_floor: str | None = None  # the oldest log file or position kept (None: no log, or all)
    kept: dict[str, list[str]] = field(default_factory=dict)  # kept base -> the rules that kept it

    def ids(self) -> list[str]:
        return self.bases + self.logs

    def as_dict(self) -> dict[str, Any]:
        return {"bases": [i[:8] for i in self.bases], "logs": len(self.logs),
                "log_floor": self.log_floor, "kept": {i[:8]: why for i, why in self.kept.items()}}


@dataclass
class Window:
    """A source's point-in-time-restore window."""

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


def unix_time(value: Any) -> float | None:
    """A snapshot record's time (a datetime, a number or ISO 8601 text) as Unix time."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value)).timestamp()


class Source(ABC, Generic[CopyT]):
    """One kind of source. Implementations hold no state between calls."""

    kind: ClassVar[str]
    point_in_time: ClassVar[bool] = False  # archives a log, so has a PITR window

    @abstractmethod
    def backup(self, job: SourceJob, repo: Repository, ctl: JobControl) -> BackupReport:
        """Take one backup of the source into ``repo``, its snapshot tagged `SourceJob.tags`."""

    @abstractmethod
    def restore(self, job: SourceJob, repo: Repository, ctl: JobControl,
                scratch: str) -> AbstractContextManager[CopyT]:
        """Restore the newest backup into ``scratch`` (an empty directory the caller removes);
        a server started on the copy runs until the context ends."""

    @abstractmethod
    def verify(self, job: SourceJob, repo: Repository, copy: CopyT,
               ctl: JobControl) -> dict[str, Any]:
        """Check a restored copy (`IntegrityError` when it is unsound); return its figures."""

    def forget_plan(self, job: SourceJob, repo: Repository, policy: Policy) -> ForgetPlan:
        """What ``policy`` forgets of this source; by default its tagged snapshots of its own
        host, alike (another machine's source of the same name is left to that machine)."""
        mine = [s for s in repo.list_snapshots() if job.tag in s.tags and s.host == job.host]
        kept, removed = apply_policy(mine, policy, group_by=lambda s: job.tag)
        return ForgetPlan(bases=[s.id for s in removed],
                          kept={s.id: list(why) for s, why in kept})

    def pitr_window(self, job: SourceJob, snapshots: list[Snapshot]) -> Window | None:
        """The point-in-time-restore window the snapshots give (None: the kind has none)."""
        return None

    def describe(self, job: SourceJob) -> str:
        """What the source backs up, in words (``keepwell config check``)."""
        return self.kind

    def backup_phase(self, job: SourceJob) -> str:
        """What its backup does, in a word or two: the name of the backup's span in a job's
        trace (`keepwell.control.spans`)."""
        return "backup"

    def environment(self, job: SourceJob, ctl: JobControl) -> dict[str, str]:
        """The environment of a command run for this source (its ``backup_command``,
        ``drill_command``, streamer): keepwell's, with the repository and its password."""
        env = dict(os.environ)
        env["KEEPWELL_REPOSITORY"] = str(job.repository["location"])
        env["KEEPWELL_PASSWORD"] = ctl.secret(job.repository["password"], "repository password")
        return env


_KINDS: dict[str, str] = {
    "files": "keepwell.sources.files.source:FilesSource",
    "sqlite": "keepwell.sources.sqlite_source:SqliteSource",
    "postgres": "keepwell.sources.postgres.source:PostgresSource",
    "mysql": "keepwell.sources.mysql.source:MysqlSource",
}
_LOADED: dict[str, Source[Any]] = {}


def register(kind: str, target: str) -> None:
    """Register ``module:Class`` (a `Source`) as the implementation of ``kind``."""
    _KINDS[kind] = target
    _LOADED.pop(kind, None)


def kinds() -> list[str]:
    return sorted(_KINDS)


def source_for(kind: str) -> Source[Any]:
    """The implementation of ``kind``."""
    found = _LOADED.get(kind)
    if found is not None:
        return found
    target = _KINDS.get(kind)
    if target is None:
        raise ConfigurationError(f"no source kind {kind!r} (known: {', '.join(kinds())})")
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = missing_extra(exc, f"the {kind} source")
        if missing is None:
            raise
        raise missing from None
    source: Source[Any] = getattr(module, class_name)()
    _LOADED[kind] = source
    return source
