"""MySQL/MariaDB restore drills: a restored copy in scratch space with a temporary server on it.

A *physical* drill restores the newest physical base of the source's server with the source's
own code (`keepwell.sources.mysql.operations.restore`: extract, ``mariabackup --prepare`` and
``--move-back`` into scratch space); a *logical* drill runs ``mariadb-install-db`` into scratch
space and restores the newest dump into it (`keepwell.sources.mysql.restore.restore_logical`,
accounts left out: the temporary server runs without grant tables). Either way the server is a
temporary ``mariadbd`` (`keepwell.sources.mysql.restore.LocalServer`, on
`keepwell.sources.tempserver`) run with ``--user`` = the drill's ``run_as`` (default: keepwell's
own user): for a physical copy a private one (a socket in a private directory, no networking, no
grant tables, no binary log); for a fresh install one on its own socket and a free loopback
port, with the install's password-less root.

Checks (`check_copy`): ``CHECK TABLE`` passes for every user table; row counts of the tables the
drill names (each must exist and hold its minimum), or of every user table
(`keepwell.sources.rowcount`). The copy's point is the restored base's consistency point.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from keepwell.errors import ConfigurationError, IntegrityError, SourceError
from keepwell.repository import Repository
from keepwell.sources.base import JobControl, RestoredCopy, SourceJob
from keepwell.sources.mysql import KIND_LOGICAL, KIND_PHYSICAL
from keepwell.sources.mysql.catalog import load_archive
from keepwell.sources.mysql.connection import connect, query
from keepwell.sources.mysql.operations import restore
from keepwell.sources.mysql.restore import LocalServer, flavor_of, restore_logical
from keepwell.sources.mysql.tools import find_tool
from keepwell.sources.rowcount import count_rows, figures
from keepwell.sources.tempserver import free_port, hand_over
from keepwell.sources.tools import run_tool

SYSTEM_DATABASES = ("mysql", "information_schema", "performance_schema", "sys")


def _run_as(drill: Mapping[str, Any]) -> str:
    user = drill.get("run_as") or pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise ConfigurationError(f"drill run_as user {user!r} does not exist on this host"
                                 ) from None
    return str(user)


@dataclass
class MysqlCopy(RestoredCopy):
    server: LocalServer | None = None


@contextmanager
def restore_copy(job: SourceJob, repo: Repository, ctl: JobControl,
                 scratch: str) -> Iterator[MysqlCopy]:
    """The newest base of the source's mode, restored and served (see the module's words)."""
    src, drill = job.settings, job.drill
    physical = src.get("mode") == "physical"
    kind = KIND_PHYSICAL if physical else KIND_LOGICAL
    user = _run_as(drill)
    host = src.get("server_name")
    datadir = os.path.join(scratch, "data")
    bases = [b for b in load_archive(repo, host).bases if b.kind == kind]
    if not bases:
        raise SourceError(f"no {'physical' if physical else 'logical'} backup of {job.name} "
                          "to drill")
    base = bases[-1]
    snap = repo.find_snapshot(base.snapshot_id)
    if physical:
        restore(repo, snapshot=snap.id, target_dir=datadir, owner=user, host=host)
    else:
        os.makedirs(datadir, 0o750)
        hand_over(scratch, user)
        run_tool([find_tool("install", flavor_of(snap)), "--no-defaults", f"--user={user}",
                  f"--datadir={datadir}", "--auth-root-authentication-method=normal",
                  "--skip-test-db"], what="mariadb-install-db for the drill", timeout=600)
    ctl.check()
    # A restored physical copy holds the source's accounts: run it without grant tables. A
    # fresh install has a password-less root on its socket, and grant tables must stay on
    # there so the dump's events can be created (no event scheduler without them).
    server = LocalServer.start(datadir, user=user, private=physical,
                               port=None if physical else free_port(), flavor=flavor_of(snap),
                               timeout=float(drill.get("start_timeout") or 600.0),
                               stop=ctl.check)
    try:
        if not physical:
            restore_logical(repo, snap, server.settings(), users=False)
        yield MysqlCopy(snap.id, base.stop_time or snap.time.timestamp(), datadir,
                        server=server, details={"mode": "physical" if physical else "logical",
                                                "server_user": user})
    finally:
        server.stop()


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


class _Tables:
    """The user tables of the served copy (`rowcount.TableReader`)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._parts: dict[str, tuple[str, str]] = {}

    def tables(self) -> list[str]:
        marks = ",".join(["%s"] * len(SYSTEM_DATABASES))
        for db, table in query(self.conn, "SELECT table_schema, table_name FROM "
                               "information_schema.tables WHERE table_type = 'BASE TABLE' AND "
                               f"table_schema NOT IN ({marks}) ORDER BY 1, 2", SYSTEM_DATABASES):
            self._parts[f"{db}.{table}"] = (str(db), str(table))
        return list(self._parts)

    def split(self, table: str) -> tuple[str, str]:
        """A full name's database and table (as listed by `tables`)."""
        return self._parts[table]

    def count(self, table: str) -> int:
        db, name = self.split(table)
        (row,) = query(self.conn, f"SELECT COUNT(*) FROM {_quote(db)}.{_quote(name)}")
        return int(row[0])


def check_copy(job: SourceJob, copy: MysqlCopy, ctl: JobControl) -> dict[str, Any]:
    """CHECK TABLE every user table; count the rows of the wanted (or all) tables."""
    assert copy.server is not None
    default_db = (job.settings.get("connection") or {}).get("database")
    conn = connect(copy.server.settings())
    try:
        tables = _Tables(conn)
        names = tables.tables()
        for name in names:
            ctl.check()
            db, table = tables.split(name)
            for row in query(conn, f"CHECK TABLE {_quote(db)}.{_quote(table)}"):
                msg_type, text = str(row[2]).lower(), str(row[3])
                if msg_type == "error" or (msg_type == "status" and text.lower() != "ok"):
                    raise IntegrityError(f"drill: CHECK TABLE {name} failed: {text}")
        counts = count_rows(tables, job.drill.get("tables") or {},
                            full_name=lambda n: n if "." in n else f"{default_db}.{n}")
        return {"tables_checked": len(names), **figures(counts)}
    finally:
        conn.close()
