"""MySQL/MariaDB behind the `Source` interface (`keepwell.sources.base`).

A configured MySQL source is one server, known in the repository by its ``server_name``
(default: the host name the server reports), backed up in one ``mode`` (``logical``:
mariadb-dump; ``physical``: mariabackup), its binlogs archived by ``binlog-push`` or a streamer.

- Backup: ``keepwell mysql backup --logical|--physical [--server-name NAME]`` (or the source's
  ``backup_command``) as a child process (`keepwell.sources.database`), with the connection in
  the clients' standard variables (``MYSQL_HOST``, ``MYSQL_TCP_PORT``, ``MYSQL_UNIX_PORT``,
  ``MYSQL_USER`` and ``USER``, ``MYSQL_DATABASE``, ``MYSQL_PWD``).
- Restore and verify: the drill (`keepwell.sources.mysql.drill`).
- Forget plan: ``keepwell mysql forget``'s (`keepwell.sources.mysql.operations.forget_plan`): the
  bases the policy keeps (and the one a ``within`` window starts from), and the binlogs from
  the oldest kept base's position on.
- PITR window: from the oldest base whose binlogs are archived to the newest archived event it
  reaches (`keepwell.sources.mysql.catalog.ServerArchive.window`, as ``mysql info`` shows).
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
from keepwell.sources.mysql.catalog import ServerArchive
from keepwell.sources.mysql.drill import MysqlCopy, check_copy, restore_copy
from keepwell.sources.mysql.operations import forget_plan

MYSQL_PREFIX = "mysql-"  # the kinds of this source's snapshots


class MysqlSource(DatabaseSource[MysqlCopy]):
    kind = "mysql"

    def backup_options(self, job: SourceJob) -> list[str]:
        name = job.settings.get("server_name")
        return ["--server-name", name] if name else []

    def client_variables(self, connection: Mapping[str, Any],
                         password: str | None) -> dict[str, Any]:
        user = connection.get("user")
        return {"MYSQL_HOST": connection.get("host"), "MYSQL_TCP_PORT": connection.get("port"),
                "MYSQL_UNIX_PORT": connection.get("socket"), "MYSQL_USER": user,
                "USER": user,  # the MySQL clients' default user comes from USER
                "MYSQL_DATABASE": connection.get("database"), "MYSQL_PWD": password}

    def restore(self, job: SourceJob, repo: Repository, ctl: JobControl,
                scratch: str) -> AbstractContextManager[MysqlCopy]:
        return restore_copy(job, repo, ctl, scratch)

    def verify(self, job: SourceJob, repo: Repository, copy: MysqlCopy,
               ctl: JobControl) -> dict[str, Any]:
        return check_copy(job, copy, ctl)

    def forget_plan(self, job: SourceJob, repo: Repository, policy: Policy) -> ForgetPlan:
        plan = forget_plan(repo, policy, host=job.settings.get("server_name"))
        return ForgetPlan(bases=plan.bases, logs=plan.binlogs, log_floor=plan.binlog_floor,
                          kept=plan.kept)

    def pitr_window(self, job: SourceJob, snapshots: list[Snapshot]) -> Window:
        server_name = job.settings.get("server_name")
        snaps = [s for s in snapshots if s.kind.startswith(MYSQL_PREFIX)
                 and (server_name is None or s.host == server_name)]
        win = Window(job.name, self.kind)
        hosts = sorted({s.host for s in snaps})
        if server_name is None and len(hosts) > 1:
            win.error = (f"the repository holds MySQL snapshots of {len(hosts)} servers; set "
                         "the source's server_name")
            return win
        archive = ServerArchive.build(snaps)
        span = archive.window()
        win.start, win.end = unix_time(span.get("from")), unix_time(span.get("to"))
        win.parts = 1 if win.start is not None else 0
        if win.start is None:
            win.problems.append("no base backup with its binlogs archived: point-in-time "
                                "restore is not possible")
        for gap in archive.gaps():
            win.problems.append(f"binlogs missing after {gap['after']}: "
                                f"{', '.join(gap['missing'])}")
        win.problems += archive.problems()
        return win
