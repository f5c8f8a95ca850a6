"""Job kinds: how each kind of source is backed up (and drilled) by a job.

A small registry maps a source kind (``files``, ``sqlite``, ``postgres``, ``mysql``) to a
`JobKind` with ``backup(spec, ctx)`` and ``drill(spec, ctx)``. Files and SQLite call their
source modules in-process, through the job's bandwidth budget. PostgreSQL and MySQL run the
source's own command (``keepwell postgres|mysql backup`` by default, or the source's
``backup_command``) as a child process with the connection in the standard client environment
variables (``PGHOST``..., ``MYSQL_HOST``...), then read the new snapshot's figures from the
repository. A new kind plugs in with `register`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from typing import Any, Protocol

from keepwell.control.jobs import (
    JobContext,
    JobOutcome,
    JobSpec,
    mirror_to_replica,
    open_job_repository,
    source_tag,
)
from keepwell.control.secrets import resolve, resolve_optional
from keepwell.errors import ConfigurationError, SourceError


class JobKind(Protocol):
    name: str

    def backup(self, spec: JobSpec, ctx: JobContext) -> JobOutcome: ...

    def drill(self, spec: JobSpec, ctx: JobContext) -> JobOutcome: ...


_KINDS: dict[str, JobKind] = {}


def register(kind: JobKind) -> None:
    _KINDS[kind.name] = kind


def get_kind(name: str) -> JobKind:
    try:
        return _KINDS[name]
    except KeyError:
        known = ", ".join(sorted(_KINDS))
        raise ConfigurationError(f"no job kind {name!r} (known: {known})") from None


def outcome_from_snapshot(snap: Any) -> JobOutcome:
    summary = dict(snap.summary or {})
    read = summary.get("bytes_processed", summary.get("bytes_read"))
    added = summary.get("bytes_added")
    dedup = None
    if isinstance(read, int | float) and read > 0 and isinstance(added, int | float):
        dedup = round(max(0.0, 1.0 - added / read), 6)
    return JobOutcome(
        "succeeded",
        bytes_read=int(read) if read is not None else None,
        bytes_stored=int(summary.get("bytes_stored", 0)),
        dedup_ratio=dedup,
        snapshot_id=snap.id,
        details={"summary": summary, "bytes_added": added},
    )


def apply_retention(repo: Any, spec: JobSpec, outcome: JobOutcome) -> None:
    """Forget this source's snapshots that its retention policy does not keep."""
    retention = spec.params["source"].get("retention")
    if not retention:
        return
    from keepwell.repository.retention import Policy, apply_policy

    policy = Policy.from_options(**retention)
    tag = source_tag(spec.source)
    mine = [s for s in repo.list_snapshots() if tag in s.tags]
    _kept, removed = apply_policy(mine, policy, group_by=lambda s: tag)
    if removed:
        repo.forget([s.id for s in removed])
    outcome.details["forgotten"] = [s.short_id for s in removed]


def after_backup(repo: Any, spec: JobSpec, ctx: JobContext, outcome: JobOutcome) -> None:
    """Retention, then the replica: what every kind does once its snapshot is committed."""
    apply_retention(repo, spec, outcome)
    replica = mirror_to_replica(spec, ctx, repo.backend)
    if replica is not None:
        outcome.details["replica"] = replica


def newest_snapshot(repo: Any, source: str) -> Any:
    return repo.find_snapshot("latest", tags=[source_tag(source)])


def _recovered(repo: Any, spec: JobSpec) -> JobOutcome | None:
    """After a crash: the snapshot of this job may already be committed (it is written last)."""
    if spec.trigger != "recovery":
        return None
    for snap in reversed(repo.list_snapshots()):
        if (snap.source or {}).get("keepwell_job") == spec.job_id:
            outcome = outcome_from_snapshot(snap)
            outcome.details["recovered"] = True
            return outcome
    return None


class FilesKind:
    name = "files"

    def backup(self, spec: JobSpec, ctx: JobContext) -> JobOutcome:
        from keepwell.sources.files import backup_paths

        src = spec.params["source"]
        repo = open_job_repository(spec, ctx)
        try:
            done = _recovered(repo, spec)
            if done is not None:
                return done
            result = backup_paths(
                repo, src["paths"], excludes=src.get("excludes") or (),
                tags=[source_tag(spec.source), *(src.get("tags") or [])],
                host=src.get("host"), source={"keepwell_job": spec.job_id},
            )
            outcome = outcome_from_snapshot(result.snapshot)
            if result.errors:
                outcome.details["partial"] = [f"{p}: {m}" for p, m in result.errors[:20]]
            after_backup(repo, spec, ctx, outcome)
            return outcome
        finally:
            repo.close()

    def drill(self, spec: JobSpec, ctx: JobContext) -> JobOutcome:
        from keepwell.control.drills import drill_files

        return drill_files(spec, ctx)


class SqliteKind:
    name = "sqlite"

    def backup(self, spec: JobSpec, ctx: JobContext) -> JobOutcome:
        try:
            from keepwell.sources.sqlite import backup_database
        except ImportError:
            raise SourceError("the sqlite source is not installed in this keepwell") from None
        src = spec.params["source"]
        repo = open_job_repository(spec, ctx)
        try:
            done = _recovered(repo, spec)
            if done is not None:
                return done
            result = backup_database(repo, src["path"],
                                     tags=[source_tag(spec.source), *(src.get("tags") or [])])
            outcome = outcome_from_snapshot(result.snapshot)
            after_backup(repo, spec, ctx, outcome)
            return outcome
        finally:
            repo.close()

    def drill(self, spec: JobSpec, ctx: JobContext) -> JobOutcome:
        from keepwell.control.drills import drill_sqlite

        return drill_sqlite(spec, ctx)


def keepwell_command() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "keepwell")
    if os.path.exists(exe):
        return [exe]
    found = shutil.which("keepwell")
    return [found] if found else [sys.executable, "-m", "keepwell.cli.main"]


def source_selector(spec: JobSpec) -> list[str]:
    """The option naming the source's snapshots for ``keepwell postgres|mysql`` commands."""
    src = spec.params["source"]
    if spec.kind == "postgres":
        return ["--cluster", src.get("cluster") or "main"]
    if spec.kind == "mysql" and src.get("server_name"):
        return ["--server-name", src["server_name"]]
    return []


def database_env(spec: JobSpec) -> dict[str, str]:
    """The child's environment: repository, password and the client's standard variables."""
    src, repo_cfg = spec.params["source"], spec.params["repository"]
    conn = src.get("connection") or {}
    env = dict(os.environ)
    env["KEEPWELL_REPOSITORY"] = repo_cfg["location"]
    env["KEEPWELL_PASSWORD"] = resolve(repo_cfg["password"], what="repository password")
    password = resolve_optional(conn.get("password"), what=f"{spec.source} database password")
    if spec.kind == "postgres":
        pairs = {"PGHOST": conn.get("socket") or conn.get("host"), "PGPORT": conn.get("port"),
                 "PGUSER": conn.get("user"), "PGDATABASE": conn.get("database"),
                 "PGPASSWORD": password}
    else:
        pairs = {"MYSQL_HOST": conn.get("host"), "MYSQL_TCP_PORT": conn.get("port"),
                 "MYSQL_UNIX_PORT": conn.get("socket"), "MYSQL_USER": conn.get("user"),
                 "MYSQL_DATABASE": conn.get("database"), "MYSQL_PWD": password}
    if spec.kind == "mysql" and conn.get("user"):
        pairs["USER"] = conn["user"]  # the MySQL clients' default user comes from USER
    env.update({k: str(v) for k, v in pairs.items() if v is not None})
    return env


def run_child(argv: list[str], env: dict[str, str], ctx: JobContext, what: str) -> str:
    """Run a child process under the job's deadline and cancellation; return its stderr tail."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        while True:
            try:
                _, err = proc.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                try:
                    ctx.check()
                except BaseException:
                    proc.kill()
                    proc.wait()
                    raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    tail = (err or "").strip().splitlines()[-1:] or [""]
    if proc.returncode != 0:
        raise SourceError(f"{what} exited with {proc.returncode}: {tail[0]}")
    return tail[0]


class DatabaseKind:
    """PostgreSQL and MySQL/MariaDB through the source's own command."""

    def __init__(self, name: str) -> None:
        self.name = name

    def backup(self, spec: JobSpec, ctx: JobContext) -> JobOutcome:
        src = spec.params["source"]
        argv = src.get("backup_command") or [
            *keepwell_command(), spec.kind, "backup", f"--{src.get('mode', 'logical')}",
            "--tag", source_tag(spec.source), *source_selector(spec),
        ]
        started = time.time()
        run_child(list(argv), database_env(spec), ctx, f"{spec.kind} backup of {spec.source}")
        repo = open_job_repository(spec, ctx)
        try:
            snap = newest_snapshot(repo, spec.source)
            if snap.time.timestamp() < started - 1:
                raise SourceError(f"{spec.kind} backup of {spec.source} recorded no snapshot "
                                  f"tagged {source_tag(spec.source)}")
            outcome = outcome_from_snapshot(snap)
            after_backup(repo, spec, ctx, outcome)
            return outcome
        finally:
            repo.close()

    def drill(self, spec: JobSpec, ctx: JobContext) -> JobOutcome:
        from keepwell.control.drills import drill_database

        return drill_database(spec, ctx)


for _kind in (FilesKind(), SqliteKind(), DatabaseKind("postgres"), DatabaseKind("mysql")):
    register(_kind)
