"""What the database kinds (PostgreSQL, MySQL/MariaDB) share behind the `Source` interface.

A `DatabaseSource` archives a log (WAL, binlogs), so it has a point-in-time window, and is backed
up by its own command line run as a child process: ``keepwell KIND backup --logical|--physical
--tag ...`` plus the kind's own options (`backup_options`), or the source's ``backup_command``.
The job's process so never holds a database driver or a native tool's pipes itself. The child
runs with the source's environment (the repository, its password, and the database client's
standard variables, `client_variables`), in a session of its own, and is killed when the job
must stop (its deadline, a shutdown). The snapshot it recorded is then read from the
repository: the newest one tagged as the source's, which must not be older than the command.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

from keepwell.errors import SourceError
from keepwell.repository import Repository
from keepwell.sources.base import (
    BackupReport,
    CopyT,
    JobControl,
    Source,
    SourceJob,
    newest_snapshot,
)
from keepwell.sources.tools import keepwell_program, run_tool

CLOCK_SLACK = 1.0  # seconds a snapshot's recorded time may precede the command's start


class DatabaseSource(Source[CopyT]):
    point_in_time = True

    @abstractmethod
    def backup_options(self, job: SourceJob) -> list[str]:
        """The kind's own options of ``keepwell KIND backup`` (which name its snapshots)."""

    @abstractmethod
    def client_variables(self, connection: Mapping[str, Any],
                         password: str | None) -> dict[str, Any]:
        """The database client's standard environment variables for a connection."""

    def backup(self, job: SourceJob, repo: Repository, ctl: JobControl) -> BackupReport:
        argv = list(job.settings.get("backup_command") or [
            *keepwell_program(), self.kind, "backup", f"--{job.settings.get('mode') or 'logical'}",
            *(a for t in job.tags for a in ("--tag", t)), *self.backup_options(job)])
        started = time.time()
        run_tool(argv, what=f"{self.kind} backup of {job.name}", env=self.environment(job, ctl),
                 stop=ctl.check, new_session=True)
        snap = newest_snapshot(repo, job)
        if snap.time.timestamp() < started - CLOCK_SLACK:
            raise SourceError(f"{self.kind} backup of {job.name} recorded no snapshot tagged "
                              f"{job.tag}")
        return BackupReport(snap)

    def backup_phase(self, job: SourceJob) -> str:
        return "basebackup" if job.settings.get("mode") == "physical" else "dump"

    def describe(self, job: SourceJob) -> str:
        conn = job.settings.get("connection") or {}
        return f"{self.kind} ({job.settings.get('mode') or 'logical'}) on {conn.get('host')}"

    def environment(self, job: SourceJob, ctl: JobControl) -> dict[str, str]:
        env = super().environment(job, ctl)
        conn = job.settings.get("connection") or {}
        ref = conn.get("password")
        password = ctl.secret(ref, f"{job.name} database password") if ref else None
        env.update({k: str(v) for k, v in self.client_variables(conn, password).items()
                    if v is not None})
        return env
