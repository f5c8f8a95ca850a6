"""Jobs: what to run (`JobSpec`, a plain value) and what a running job is given (`JobContext`).

A `JobSpec` holds everything a worker needs, as JSON-able values: the action (``backup``,
``drill``, or ``check`` of a repository), the source's settings and the repository's location with secret *references* (never
values). Its ``job_id`` is stable (action, name and the scheduled time), so a retry, a re-run after
a crash, or another executor (a fleet worker) all refer to the same job, and a job whose id has
already succeeded is not run twice. Definitions live here; queues, budgets and retries live in
the daemon, so any executor can run the same specs.

A running job gets a `JobContext`: its deadline and cancellation (the guard,
`keepwell.backends.wrappers.Guard`, of every storage call of the repository
`open_job_repository` opens, with `open_repository`, through the job's bandwidth budgets, the
shared bucket and its own) and its secrets; it is the `keepwell.sources.base.JobControl` its
source works with. `source_job` is the spec as its source sees it. Running a spec is
`keepwell.control.runner.execute`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keepwell.backends.base import Backend
from keepwell.backends.resilience import TokenBucket
from keepwell.control.config import Config, JobLimits
from keepwell.control.replica import mirror
from keepwell.control.secrets import resolve
from keepwell.control.spans import NO_TRACE, JobTrace
from keepwell.errors import ConfigurationError, KeepwellError, UsageError, WrongPasswordError
from keepwell.repository import Repository
from keepwell.repository.repo import open_repository, open_storage
from keepwell.sources.base import SourceJob

ACTIONS = ("backup", "drill", "check")


class JobCancelled(KeepwellError):
    """The job was stopped: the daemon is shutting down, or the job ran past its timeout."""

    hint = "it will be run again"

    def __init__(self, message: str, *, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    action: str
    name: str
    source: str
    kind: str
    repository: str
    host: str
    priority: int
    scheduled_at: float
    timeout: float
    upload_limit: int | None
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    attempt: int = 1
    trigger: str = "schedule"
    requested_by: str | None = None  # who asked for a job run by hand (a user, ``web:ROLE``)
    # Hard resource limits (`keepwell.control.cgroups.ResourceLimits.from_dict`); None: none.
    resources: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    # A backup's retention and replica copy run in the same job (the daemon, ``keepwell run``);
    # False: the executor runs them as steps of their own (`keepwell.fleet`).
    follow_ups: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def retry(self, trigger: str = "retry") -> JobSpec:
        return dataclasses.replace(self, attempt=self.attempt + 1, trigger=trigger)


def _host_of(src: Any) -> str:
    conn = getattr(src, "connection", None)
    if conn is not None:
        return str(conn.socket or conn.host)
    return str(getattr(src, "host", None) or "localhost")


def build_job(cfg: Config, action: str, name: str, scheduled_at: float, *,
              trigger: str = "schedule", requested_by: str | None = None,
              read_data_subset: str | None = None) -> JobSpec:
    """The job definition for ``action`` on a source (backup), a drill (drill) or a repository
    (check, reading ``read_data_subset`` of its data: ``all`` or a ``--read-data-subset``)."""
    if action not in ACTIONS:
        raise UsageError(f"unknown action {action!r}")
    if action == "check":
        return _check_job(cfg, name, scheduled_at, trigger, requested_by, read_data_subset)
    drill_params: dict[str, Any] | None = None
    if action == "drill":
        drill = cfg.drills.get(name)
        source_name = drill.source if drill is not None else name
        priority = drill.priority if drill is not None else -10
        max_rpo = drill.max_rpo if drill is not None else None
        if drill is not None:
            drill_params = drill.model_dump(mode="json")
    else:
        source_name, priority, max_rpo = name, 0, None
    src = cfg.sources.get(source_name)
    if src is None:
        known = ", ".join(sorted(cfg.sources) + sorted(cfg.drills)) or "none"
        raise ConfigurationError(f"no source or drill named {name!r} (configured: {known})")
    if action == "backup":
        priority = src.priority
    repo = cfg.repositories[src.repository]
    upload = src.upload_limit or cfg.limits.per_job_upload
    params = {
        "source": src.model_dump(mode="json"),
        "repository": repo.model_dump(mode="json"),
        "scratch": cfg.scratch,
        "max_rpo": max_rpo,
        "drill": drill_params,
    }
    stamp = int(scheduled_at * 1000)
    return JobSpec(
        job_id=f"{action}:{name}:{stamp}",
        action=action,
        name=name,
        source=source_name,
        kind=src.kind,
        repository=src.repository,
        host=_host_of(src),
        priority=priority,
        scheduled_at=scheduled_at,
        timeout=src.timeout or cfg.limits.job_timeout,
        upload_limit=upload,
        params=params,
        trigger=trigger,
        requested_by=requested_by,
        resources=_resources(cfg, src, action, repo.location),
    )


def _check_job(cfg: Config, name: str, scheduled_at: float, trigger: str,
               requested_by: str | None, read_data_subset: str | None) -> JobSpec:
    from keepwell.repository.check import DataSubset

    repo = cfg.repositories.get(name)
    if repo is None:
        known = ", ".join(sorted(cfg.repositories)) or "none"
        raise ConfigurationError(f"no repository named {name!r} (configured: {known})")
    if read_data_subset not in (None, "all"):
        DataSubset.parse(read_data_subset)
    return JobSpec(
        job_id=f"check:{name}:{int(scheduled_at * 1000)}", action="check", name=name,
        source=name, kind="repository", repository=name, host="localhost", priority=-10,
        scheduled_at=scheduled_at, timeout=cfg.limits.job_timeout, upload_limit=None,
        params={"repository": repo.model_dump(mode="json"), "read_data_subset": read_data_subset},
        trigger=trigger, requested_by=requested_by)


def _resources(cfg: Config, src: Any, action: str, location: str) -> dict[str, Any] | None:
    """A job's hard limits: a backup's are its source's over its kind's, a drill's those of
    ``by_kind.drill``; with the paths its I/O limits cover."""
    own: JobLimits | None = src.limits if action == "backup" else None
    base = cfg.limits.by_kind.get("drill" if action == "drill" else src.kind)
    limits = own.over(base) if own is not None else base
    if limits is None:
        return None
    out = limits.model_dump(mode="json", exclude_none=True)
    paths = [*getattr(src, "paths", []), *([src.path] if getattr(src, "path", None) else [])]
    if "://" not in location:
        paths.append(location)
    out["paths"] = paths  # where ``io.devices`` is not given
    out["cgroup_root"] = cfg.limits.cgroup_root
    return out


def configured_source(cfg: Config, name: str) -> SourceJob:
    """A configured source as its kind sees it, outside any job (``status``, PITR windows)."""
    src = cfg.sources[name]
    return SourceJob(name, src.kind, src.model_dump(mode="json"),
                     cfg.repositories[src.repository].model_dump(mode="json"))


def source_job(spec: JobSpec) -> SourceJob:
    """The job as its source sees it: the source's and the repository's settings."""
    return SourceJob(name=spec.source, kind=spec.kind, settings=spec.params["source"],
                     repository=spec.params["repository"], job_id=spec.job_id,
                     drill=spec.params.get("drill") or {})


@dataclass
class JobOutcome:
    status: str  # succeeded | failed | timeout | interrupted
    error: str | None = None
    error_type: str | None = None
    transient: bool = False
    bytes_read: int | None = None
    bytes_stored: int | None = None
    bytes_uploaded: int = 0
    dedup_ratio: float | None = None
    snapshot_id: str | None = None
    rto: float | None = None
    rpo: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


class JobContext:
    """What an executor gives a running job: budgets, cancellation, deadline, byte counter."""

    def __init__(self, *, shared_upload: TokenBucket | None = None, timeout: float | None = None,
                 cancel: threading.Event | None = None,
                 on_upload: Callable[[int], None] | None = None,
                 listener: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.shared_upload = shared_upload
        self.cancel = cancel or threading.Event()
        self.deadline = time.monotonic() + timeout if timeout else None
        self.on_upload = on_upload
        self.listener = listener  # sees the repository's events (bytes read, files, packs)
        self.uploaded = 0
        self.upload_started: float | None = None  # wall time the first pack upload began
        self.upload_ended: float | None = None  # wall time the last upload finished
        self.bytes_read = 0  # progress: source bytes read so far
        self.files = 0  # progress: files read so far (sources that read files)
        self.started = time.time()
        self.on_log: Callable[[str, str], None] | None = None  # (level, message) -> the run's log
        self.trace: JobTrace = NO_TRACE  # the attempt's spans (tracing on)
        self._lock = threading.Lock()

    def log(self, level: str, message: str) -> None:
        """A line for the run's log in the job history (shown with the run)."""
        if self.on_log is not None:
            self.on_log(level, message)

    def progress(self) -> dict[str, Any]:
        """What a running job has done so far (for live views)."""
        return {"bytes_read": self.bytes_read, "files_read": self.files,
                "bytes_uploaded": self.uploaded, "elapsed": round(time.time() - self.started, 3)}

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise JobCancelled("the job ran past its timeout", timed_out=True)
        if self.cancel.is_set():
            raise JobCancelled("the job was stopped by a shutdown", timed_out=False)

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake up to stop at the deadline or on cancellation (a bucket's sleep)."""
        end = time.monotonic() + seconds
        while True:
            self.check()
            left = end - time.monotonic()
            if left <= 0:
                return
            self.cancel.wait(min(left, 0.1))

    def secret(self, reference: str, what: str) -> str:
        return resolve(reference, what=what)

    def stored(self, name: str, size: int, began: float) -> None:
        """The `keepwell.backends.wrappers.Guard` half that counts what the job uploaded."""
        if self.upload_started is None and name.startswith("data/"):
            self.upload_started = began
        self.upload_ended = time.time()
        self.count_upload(size)

    def count_upload(self, n: int) -> None:
        with self._lock:
            self.uploaded += n
        if self.on_upload is not None:
            self.on_upload(n)


def _budgets(spec: JobSpec, ctx: JobContext) -> list[TokenBucket]:
    """The job's upload budgets: the one shared by every job, then its own."""
    buckets = [ctx.shared_upload] if ctx.shared_upload is not None else []
    if spec.upload_limit:
        buckets.append(TokenBucket(spec.upload_limit, burst=spec.upload_limit / 8, sleep=ctx.sleep))
    return buckets


def open_configured(name: str, location: str, password_ref: str, **options: Any) -> Repository:
    """Open the configured repository ``name`` with the password its reference gives; a wrong
    password names that setting (not the command line's KEEPWELL_PASSWORD)."""
    password = resolve(password_ref, what=f"repository {name} password")
    try:
        return open_repository(location, password, **options)
    except WrongPasswordError as exc:
        raise WrongPasswordError(str(exc), hint=f"check repositories.{name}.password"
                                 f" ({password_ref})") from None


def open_job_repository(spec: JobSpec, ctx: JobContext) -> Repository:
    """Open the job's repository behind its budgets."""
    repo_cfg = spec.params["repository"]
    return open_configured(spec.repository, repo_cfg["location"], repo_cfg["password"],
                           guard=ctx, upload_buckets=_budgets(spec, ctx),
                           adaptive=repo_cfg.get("adaptive"))


def mirror_to_replica(spec: JobSpec, ctx: JobContext, primary: Backend) -> dict[str, int] | None:
    """After a backup: bring the repository's replica (if any) up to date, inside the budgets."""
    replica_cfg = spec.params["repository"].get("replica")
    if not replica_cfg:
        return None
    replica = open_storage(replica_cfg["location"], guard=ctx, upload_buckets=_budgets(spec, ctx))
    try:
        return mirror(primary, replica).as_dict()
    finally:
        replica.close()
