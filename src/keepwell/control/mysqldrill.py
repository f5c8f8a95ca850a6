"""MySQL/MariaDB restore drills: restore into scratch space, start a temporary server, check it.

A *physical* drill restores the newest physical base of the source's server with the source's
own code (`keepwell.sources.mysql.recover.restore`: extract, ``mariabackup --prepare`` and
``--move-back`` into scratch space); a *logical* drill runs ``mariadb-install-db`` into scratch
space and restores the newest dump into it (`keepwell.sources.mysql.restore.restore_logical`,
accounts left out: the temporary server runs without grant tables). Either way the server is a
temporary ``mariadbd`` (`keepwell.sources.mysql.restore.LocalServer`) run with ``--user`` = the
drill's ``run_as`` (default: keepwell's own user): for a physical copy a private one (a socket in
a private directory, no networking, no grant tables, no binary log); for a fresh install one on
its own socket and a free loopback port, with the install's password-less root.

Checks: the server starts; ``CHECK TABLE`` passes for every user table; row counts of the tables
the drill names (each must exist and hold its minimum), or of every user table. RTO is the time
from the start of the restore until the server accepts connections; RPO the age of the
restored base (its consistency point).
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from typing import Any

from keepwell.control.jobs import JobContext, JobOutcome, JobSpec, open_job_repository
from keepwell.control.pgdrill import hand_over
from keepwell.errors import ConfigurationError, IntegrityError, SourceError

SYSTEM_DATABASES = ("mysql", "information_schema", "performance_schema", "sys")


def _run_as(drill: dict[str, Any]) -> str:
    user = drill.get("run_as") or pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise ConfigurationError(f"drill run_as user {user!r} does not exist on this host"
                                 ) from None
    return user


def _user_tables(conn: Any) -> list[tuple[str, str]]:
    from keepwell.sources.mysql.connection import query

    marks = ",".join(["%s"] * len(SYSTEM_DATABASES))
    rows = query(conn, "SELECT table_schema, table_name FROM information_schema.tables"
                       f" WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ({marks})"
                       " ORDER BY 1, 2", SYSTEM_DATABASES)
    return [(str(r[0]), str(r[1])) for r in rows]


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def check_server(settings: Any, wanted: dict[str, int], default_db: str | None,
                 ctx: JobContext) -> dict[str, Any]:
    """CHECK TABLE every user table; count the rows of the wanted (or all) tables."""
    from keepwell.sources.mysql.connection import connect, query

    conn = connect(settings)
    try:
        tables = _user_tables(conn)
        present = {f"{db}.{t}" for db, t in tables}
        for db, table in tables:
            ctx.check()
            for row in query(conn, f"CHECK TABLE {_quote(db)}.{_quote(table)}"):
                msg_type, text = str(row[2]).lower(), str(row[3])
                if msg_type == "error" or (msg_type == "status" and text.lower() != "ok"):
                    raise IntegrityError(f"drill: CHECK TABLE {db}.{table} failed: {text}")
        names: list[str] = []
        for name in wanted:
            full = name if "." in name else f"{default_db}.{name}"
            if full not in present:
                raise IntegrityError(f"drill: table {full} is missing from the restore")
            names.append(full)
        counts: dict[str, int] = {}
        for full in names or sorted(present):
            db, _, table = full.partition(".")
            (row,) = query(conn, f"SELECT COUNT(*) FROM {_quote(db)}.{_quote(table)}")
            counts[full] = int(row[0])
        for name, minimum in wanted.items():
            full = name if "." in name else f"{default_db}.{name}"
            if counts[full] < minimum:
                raise IntegrityError(f"drill: table {full} holds {counts[full]} rows, fewer "
                                     f"than the {minimum} the drill expects")
        return {"tables_checked": len(tables), "row_counts": counts}
    finally:
        conn.close()


def drill_mysql(spec: JobSpec, ctx: JobContext, scratch: str) -> JobOutcome:
    from keepwell.sources.mysql import KIND_LOGICAL, KIND_PHYSICAL
    from keepwell.sources.mysql.catalog import load_archive
    from keepwell.sources.mysql.recover import restore
    from keepwell.sources.mysql.restore import LocalServer, restore_logical
    from keepwell.sources.mysql.tools import find_tool

    src = spec.params["source"]
    drill = spec.params.get("drill") or {}
    physical = src.get("mode") == "physical"
    kind = KIND_PHYSICAL if physical else KIND_LOGICAL
    user = _run_as(drill)
    host = src.get("server_name")
    datadir = os.path.join(scratch, "data")
    repo = open_job_repository(spec, ctx)
    server = None
    try:
        bases = [b for b in load_archive(repo, host).bases if b.kind == kind]
        if not bases:
            raise SourceError(f"no {'physical' if physical else 'logical'} backup of "
                              f"{spec.source} to drill")
        base = bases[-1]
        snap = repo.find_snapshot(base.snapshot_id)
        t0 = time.monotonic()
        if physical:
            restore(repo, snapshot=snap.id, target_dir=datadir, owner=user, host=host)
        else:
            os.makedirs(datadir, 0o750)
            hand_over(scratch, user)
            res = subprocess.run(
                [find_tool("install"), "--no-defaults", f"--user={user}",
                 f"--datadir={datadir}", "--auth-root-authentication-method=normal",
                 "--skip-test-db"], capture_output=True, text=True, timeout=600)
            if res.returncode != 0:
                raise SourceError("mariadb-install-db for the drill failed: "
                                  + (res.stderr.strip().splitlines() or ["no message"])[-1])
        ctx.check()
        # A restored physical copy holds the source's accounts: run it without grant tables.
        # A fresh install has a password-less root on its socket, and grant tables must stay
        # on there so the dump's events can be created (no event scheduler without them).
        from keepwell.control.pgdrill import free_port

        server = LocalServer.start(datadir, user=user, private=physical,
                                   port=None if physical else free_port(),
                                   timeout=float(drill.get("start_timeout") or 600.0))
        if not physical:
            restore_logical(repo, snap, server.settings(), users=False)
        rto = time.monotonic() - t0
        ctx.check()
        checks = check_server(server.settings(), dict(drill.get("tables") or {}),
                              (src.get("connection") or {}).get("database"), ctx)
        point = base.stop_time or snap.time.timestamp()
        counts = checks["row_counts"]
        return JobOutcome(
            "succeeded", snapshot_id=snap.id, rto=round(rto, 3),
            rpo=round(max(0.0, time.time() - point), 3),
            details={"mode": "physical" if physical else "logical",
                     "tables_checked": checks["tables_checked"], "tables": len(counts),
                     "rows": sum(counts.values()), "row_counts": dict(list(counts.items())[:200]),
                     "server_user": user})
    finally:
        if server is not None:
            server.stop()
        repo.close()
