"""PostgreSQL behind the `Source` interface (`keepwell.sources.base`).

A configured PostgreSQL source is a *cluster* (``cluster``, default ``main``: the name its
snapshots and WAL are filed under) backed up in one ``mode`` (``logical``: pg_dump; ``physical``:
base backups, with the WAL archived by the cluster's ``archive_command`` or a streamer).

- Backup: ``keepwell postgres backup --logical|--physical --cluster NAME`` (or the source's
  ``backup_command``) as a child process (`keepwell.sources.database`), with the connection in
  the standard client variables (``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGDATABASE``,
  ``PGPASSWORD``).
- Restore and verify: the drill (`keepwell.sources.postgres.drill`).
- Forget plan: the cluster's bases (complete physical backups and logical dumps, each kind
  apart) are kept by the policy with the rules every database source shares
  (`keepwell.sources.retention.keep_bases`: a ``within`` window also keeps the base it starts
  from), then the WAL no kept backup needs is forgotten below the floor the catalog computes
  (`keepwell.sources.postgres.retention.plan_forget`, given the kept backups: an incomplete
  backup other than the newest goes too). The plan covers the whole cluster, whoever took its
  backups: every base of a cluster restores the same database.
- PITR window: from the end of the oldest complete physical backup to the newest WAL a backup
  reaches without a gap (`keepwell.sources.postgres.report.spans`, as ``postgres info`` shows).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from keepwell.repository import Repository, Snapshot
from keepwell.repository.policy import Policy
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
from keepwell.sources.retention import keep_bases


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
        snaps = repo.list_snapshots()
        cat = Catalog.build(snaps, cluster_of(job))
        bases = {b.snapshot_id for b in cat.complete_backups()}
        bases.update(lb.snapshot_id for lb in cat.logical)
        verdict = keep_bases([s for s in snaps if s.id in bases], policy)
        gone = set(verdict.forget)
        rest = Catalog.build([s for s in snaps if s.id not in gone], cluster_of(job))
        logs = plan_forget(rest, keep_last=None, keep_within=None)  # keeps every base left
        return ForgetPlan(bases=[*verdict.forget, *logs.physical, *logs.logical],
                          logs=logs.wal, log_floor=logs.wal_floor, kept=verdict.kept)

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
