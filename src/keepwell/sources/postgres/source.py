"""PostgreSQL behind the `Source` interface (`keepwell.sources.base`).

A configured PostgreSQL source is a *cluster* (``cluster``, default ``main``: the name its
snapshots and WAL are filed under) backed up in one ``mode`` (``logical``: pg_dump; ``physical``:
base backups, with the WAL archived by the cluster's ``archive_command`` or a streamer).

- Backup: ``keepwell postgres backup --logical|--physical --cluster NAME`` (or the source's
  ``backup_command``) as a child process (`keepwell.sources.database`), with the connection in
  the standard client variables (``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGDATABASE``,
  ``PGPASSWORD``).
- Restore and verify: the drill (`keepwell.sources.postgres.drill`).
- Forget plan: ``keepwell postgres forget``'s (`keepwell.sources.postgres.retention.plan_forget`):
  the cluster's complete physical backups and its logical dumps are kept by the one retention
  engine (`keepwell.repository.retention`: a ``within`` window also keeps the base it starts
  from), then the WAL no kept backup needs is forgotten below the floor the catalog computes.
  The plan covers the whole cluster, whoever took its backups: every base of a cluster restores
  the same database.
- PITR window: from the end of the oldest complete physical backup to the newest WAL a backup
  reaches without a gap (`keepwell.sources.postgres.report.spans`, as ``postgres info`` shows).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from keepwell.repository import Repository, Snapshot
from keepwell.repository.retention import Policy
from keepwell.sources.base import (
    ForgetPlan,
    JobControl,
    SourceJob,
    Window,
    unix_time,
)
from keepwell.sources.database import DatabaseSource
from keepwell.sources.postgres import DEFAULT_CLUSTER
from keepwell.sources.postgres.catalog import Catalog
from keepwell.sources.postgres.drill import PgCopy, check_copy, restore_copy
from keepwell.sources.postgres.report import spans
from keepwell.sources.postgres.retention import plan_forget


def cluster_of(job: SourceJob) -> str:
    return str(job.settings.get("cluster") or DEFAULT_CLUSTER)


class PostgresSource(DatabaseSource[PgCopy]):
    kind = "postgres"

    def backup_options(self, job: SourceJob) -> list[str]:
        return ["--cluster", cluster_of(job)]

    def client_variables(self, connection: Mapping[str, Any],
                         password: str | None) -> dict[str, Any]:
        return {"PGHOST": connection.get("socket") or connection.get("host"),
                "PGPORT": connection.get("port"), "PGUSER": connection.get("user"),
                "PGDATABASE": connection.get("database"), "PGPASSWORD": password}

    def restore(self, job: SourceJob, repo: Repository, ctl: JobControl,
                scratch: str) -> AbstractContextManager[PgCopy]:
        return restore_copy(job, repo, ctl, scratch)

    def verify(self, job: SourceJob, repo: Repository, copy: PgCopy,
               ctl: JobControl) -> dict[str, Any]:
        return check_copy(job, copy, ctl)

    def forget_plan(self, job: SourceJob, repo: Repository, policy: Policy) -> ForgetPlan:
        plan = plan_forget(Catalog.build(repo.list_snapshots(), cluster_of(job)), policy)
        return ForgetPlan(bases=[*plan.physical, *plan.logical], logs=plan.wal,
                          log_floor=plan.wal_floor, kept=plan.kept)

    def pitr_window(self, job: SourceJob, snapshots: list[Snapshot]) -> Window:
        cat = Catalog.build(snapshots, cluster_of(job))
        win = Window(job.name, self.kind)
        found = spans(cat)
        if not found:
            win.problems.append("no complete physical backup: point-in-time restore is not "
                                "possible" if not cat.backups else
                                "no physical backup has all its WAL archived")
            return win
        win.parts = len(found)
        win.start = min(unix_time(s["from_time"]) or 0.0 for s in found)
        win.end = max(unix_time(s["to_time"]) or 0.0 for s in found)
        win.problems += [f"WAL gap on timeline {t}: {a} .. {b}" for t, a, b in cat.gaps()]
        return win
