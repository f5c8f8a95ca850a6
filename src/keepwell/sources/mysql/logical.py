"""Logical backups: one ``mariadb-dump --single-transaction`` stream, stored uncompressed.

The dump runs in one consistent-snapshot transaction. MariaDB reports the binlog position of
that snapshot (``binlog_snapshot_file``/``_position``) without a global read lock, so writers
never wait; ``--master-data=2 --gtid`` writes it into the dump as comments, which
`DumpMarks` reads from the first and last bytes of the stream as it passes. The dump is stored
as it comes (no compression before keepwell), so consecutive daily dumps deduplicate.

Accounts and grants are read by keepwell itself (``SHOW CREATE USER`` / ``SHOW GRANTS``) into
``users.sql``: every ``CREATE USER IF NOT EXISTS`` / ``CREATE ROLE IF NOT EXISTS`` first, then
every ``GRANT`` (a role must exist before it is granted). The accounts and roles every server
creates for itself are left out (`builtin_account`), so restoring them never replaces the
target's own: ``root`` on any host, ``mariadb.sys``, ``mysql``@``localhost`` (the server's system
user in MariaDB 10.4+), MySQL's ``mysql.sys``/``mysql.session``/``mysql.infoschema``,
Debian's ``debian-sys-maint``, the Docker image's ``healthcheck``, and MariaDB 10.11's built-in
role ``PUBLIC``, which cannot be created (ERROR 1959) but whose grants are kept.

DDL on a table the dump has not reached yet makes that table's read fail ("table definition has
changed"); the whole dump is then taken again (``retries``), so a stored dump is always complete.

The databases and tables the dump holds are stored beside it as ``inventory.json``, so a restore
of chosen databases or tables checks their names before it touches the target.

`begin_logical` checks the server and starts the dump (a `DumpRun`) before the repository is
opened; `LogicalJob.store` then stores it, so the tool works while keepwell starts up.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from keepwell.errors import SourceError
from keepwell.sources.mysql import KIND_LOGICAL
from keepwell.sources.mysql.admission import admit
from keepwell.sources.mysql.binlog import normalize_gtid_set
from keepwell.sources.mysql.catalog import load_archive
from keepwell.sources.mysql.connection import (
    ConnectionSettings,
    ServerInfo,
    binlog_list,
    connect,
    query,
    server_info,
)
from keepwell.sources.mysql.dumpfilter import DumpInventory
from keepwell.sources.mysql.tools import MYSQL, Tool, find
from keepwell.sources.streams import ReadAhead
from keepwell.sources.tools import ToolProcess

SYSTEM_DATABASES = ("information_schema", "performance_schema", "sys", "mysql")
SYSTEM_ACCOUNTS = ("root", "mariadb.sys", "mysql.sys", "mysql.session", "mysql.infoschema",
                   "debian-sys-maint", "healthcheck")
SYSTEM_ACCOUNTS_AT = (("mysql", "localhost"),)  # MariaDB 10.4+: the server's own system user
PUBLIC_ROLE = "PUBLIC"  # MariaDB 10.11+: every account's implicit role
KEEP = 64 * 1024
INVENTORY = "inventory.json"  # {database: [tables and views]} as the dump holds them
# Extended INSERT statements end where a row would pass this many bytes, so a row added or
# removed early in a table moves every later statement boundary. Long statements (the tool's
# maximum is 16 MiB; 15 MiB stays under the servers' default max_allowed_packet of 16 MiB) put
# one boundary per ~15 chunks instead of one per chunk, which is what lets daily dumps
# deduplicate.
NET_BUFFER_LENGTH = 15 * 1024 * 1024
RETRYABLE = ("1412", "definition has changed", "1146", "doesn't exist", "1054", "1213")

_FILE_POS = re.compile(rb"CHANGE MASTER TO MASTER_LOG_FILE='([^']+)', MASTER_LOG_POS=(\d+)")
_SOURCE_POS = re.compile(rb"CHANGE (?:MASTER|REPLICATION SOURCE) TO "
                         rb"(?:MASTER|SOURCE)_LOG_FILE='([^']+)', (?:MASTER|SOURCE)_LOG_POS=(\d+)")
_GTID = re.compile(rb"SET GLOBAL gtid_slave_pos='([^']*)'")
_GTID_MYSQL = re.compile(rb"SET @@GLOBAL.GTID_PURGED\s*=\s*(?:/\*!80000 '\+'\*/ )?'\+?([^']*)'")
_DONE = re.compile(rb"-- Dump completed")


class DumpMarks:
    """A pass-through reader that keeps the head and tail of a dump for its comments, and
    lists the databases and tables it holds (`dumpfilter.DumpInventory`)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.head = bytearray()
        self.tail = bytearray()
        self.size = 0
        self.inventory = DumpInventory()

    def _note(self, data: bytes | bytearray | memoryview) -> None:
        self.inventory.feed(data)
        if len(self.head) < KEEP:
            self.head += bytes(data[: KEEP - len(self.head)])
        self.tail += bytes(data[-KEEP:])
        if len(self.tail) > 2 * KEEP:
            del self.tail[:-KEEP]
        self.size += len(data)

    def readinto(self, b: memoryview | bytearray) -> int:
        view = memoryview(b)
        got = 0
        while got < len(view):
            n = self.raw.readinto(view[got:])
            if not n:
                break
            got += n
        if got:
            self._note(view[:got])
        return got

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.raw.read(n)
        if data:
            self._note(data)
        return data

    def readable(self) -> bool:
        return True

    def position(self) -> tuple[str | None, int | None, str | None]:
        head, tail = bytes(self.head), bytes(self.tail)
        m = _FILE_POS.search(head) or _SOURCE_POS.search(head)
        g = _GTID.search(tail) or _GTID.search(head) or _GTID_MYSQL.search(head)
        file = m.group(1).decode() if m else None
        pos = int(m.group(2)) if m else None
        gtid = normalize_gtid_set(g.group(1).decode()) if g else None
        return file, pos, gtid

    def complete(self) -> bool:
        return bool(_DONE.search(bytes(self.tail)))


@dataclass
class LogicalResult:
    snapshot: Any
    attempts: int
    databases: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def list_databases(conn: Any) -> list[str]:
    return [str(r[0]) for r in query(conn, "SHOW DATABASES") if r[0] not in SYSTEM_DATABASES]


def builtin_account(user: str, host: str, is_role: bool) -> bool:
    """An account or role the server creates for itself (see the module)."""
    return (user in SYSTEM_ACCOUNTS or user.startswith("mysql.") or not user
            or (user, host) in SYSTEM_ACCOUNTS_AT or (is_role and user == PUBLIC_ROLE))


def _quote_account(user: str, host: str) -> str:
    return "`{}`@`{}`".format(user.replace("`", "``"), host.replace("`", "``"))


def dump_accounts(conn: Any, info: ServerInfo) -> tuple[str, list[str]]:
    """``users.sql`` text for the non-built-in accounts, and the accounts that were skipped."""
    cols = "user, host, is_role" if info.flavor == "mariadb" else "user, host, 'N'"
    rows = query(conn, f"SELECT {cols} FROM mysql.user ORDER BY user, host")
    creates = ["-- accounts and grants written by keepwell", "SET sql_mode = '';"]
    grants: list[str] = []
    skipped: list[str] = []
    for user, host, is_role in rows:
        user, host, role = str(user), str(host), str(is_role) == "Y"
        if role and user == PUBLIC_ROLE:
            # built in (10.11+): never created, but what was granted to it is restored
            grants += [f"{g[0]};" for g in query(conn, f"SHOW GRANTS FOR {PUBLIC_ROLE}")]
            continue
        if builtin_account(user, host, role):
            continue
        name = "`{}`".format(user.replace("`", "``"))
        try:
            if role:
                creates.append(f"CREATE ROLE IF NOT EXISTS {name};")
                granted = query(conn, f"SHOW GRANTS FOR {name}")
            else:
                account = _quote_account(user, host)
                (create,) = query(conn, f"SHOW CREATE USER {account}")[0]
                creates.append(re.sub(r"^CREATE USER ", "CREATE USER IF NOT EXISTS ",
                                      str(create)) + ";")
                granted = query(conn, f"SHOW GRANTS FOR {account}")
        except SourceError:
            skipped.append(f"{user}@{host}")
            continue
        grants += [f"{g[0]};" for g in granted]
    lines = [*creates, *grants, "FLUSH PRIVILEGES;"]
    return "\n".join(lines) + "\n", skipped


def dump_argv(option_file: str, info: ServerInfo, databases: list[str],
              extra: tuple[str, ...] = ()) -> list[str]:
    tool = find("dump", info.flavor)
    argv = [tool.path, f"--defaults-file={option_file}", "--single-transaction",
            "--routines", "--triggers", "--events", "--hex-blob", "--quick",
            "--max-allowed-packet=1G", f"--net-buffer-length={NET_BUFFER_LENGTH}",
            "--default-character-set=utf8mb4", "--add-drop-database"]
    argv += position_options(tool) if info.log_bin else []
    argv += list(extra)
    argv += ["--databases", *databases]
    return argv


def position_options(tool: Tool) -> list[str]:
    """The options that make the dump tool write the binlog position it is consistent at.

    MariaDB: ``--master-data=2 --gtid`` (a commented ``CHANGE MASTER`` and the GTID position).
    MySQL 8.0.26+ calls it ``--source-data`` (``--master-data`` is gone in 8.4). MySQL's GTID
    set goes in as a commented ``SET @@GLOBAL.GTID_PURGED`` (8.0.32+, ``COMMENTED``), never
    as a statement, which a running target whose own GTID set overlaps would refuse.
    """
    if tool.flavor != MYSQL:
        return ["--master-data=2", "--gtid"]
    v = tool.version
    opts = ["--source-data=2" if v >= (8, 0, 26) else "--master-data=2"]
    opts.append("--set-gtid-purged=COMMENTED" if v >= (8, 0, 32) else "--set-gtid-purged=OFF")
    return opts


def logical_backup(repo: Any, settings: ConnectionSettings, *, databases: list[str] | None = None,
                   users: bool = True, host: str | None = None, tags: tuple[str, ...] = (),
                   retries: int = 3, extra_args: tuple[str, ...] = (),
                   new_server: bool = False) -> LogicalResult:
    """Dump the server (or the chosen databases) into a ``mysql-logical`` snapshot."""
    job = begin_logical(settings, databases=databases, users=users, extra_args=extra_args)
    try:
        return job.store(repo, host=host, tags=tags, retries=retries, new_server=new_server)
    finally:
        job.close()


def begin_logical(settings: ConnectionSettings, *, databases: list[str] | None = None,
                  users: bool = True, extra_args: tuple[str, ...] = ()) -> LogicalJob:
    """Check the server and start the dump, before any repository is open.

    The dump then runs (read ahead into a bounded buffer) while the caller opens the
    repository, whose start (imports, key derivation, index) would otherwise come first.
    """
    conn = connect(settings)
    try:
        info = server_info(conn)
        available = list_databases(conn)
        chosen = list(databases) if databases else available
        missing = [d for d in chosen if d not in available]
        if missing:
            raise SourceError(f"database {missing[0]} does not exist on {settings.describe()}",
                              hint="list them with SHOW DATABASES")
        if not chosen:
            raise SourceError(f"no user databases on {settings.describe()} to back up")
        users_sql, skipped = dump_accounts(conn, info) if users else ("", [])
        binlogs = binlog_list(conn) if info.log_bin else []
    finally:
        conn.close()
    job = LogicalJob(settings, info, chosen, users_sql, skipped, extra_args, binlogs=binlogs)
    job.first = DumpRun(settings, info, chosen, extra_args)
    return job


class DumpRun:
    """One dump tool running, its output read ahead until a snapshot stores it."""

    def __init__(self, settings: ConnectionSettings, info: ServerInfo, databases: list[str],
                 extra: tuple[str, ...]) -> None:
        self.started = time.time()
        self._stack = contextlib.ExitStack()
        try:
            opt = self._stack.enter_context(settings.option_file())
            argv = dump_argv(opt, info, databases, extra)
            self.proc = ToolProcess(argv, what=os.path.basename(argv[0]))
            self._stack.callback(self.proc.kill)
            self.ahead = ReadAhead(self.proc.stdout)
            self._stack.callback(self.ahead.close)
        except BaseException:
            self._stack.close()
            raise
        self.marks = DumpMarks(self.ahead)

    def close(self) -> None:
        """Stop reading and end the tool if it still runs; delete its option file."""
        self._stack.close()


@dataclass
class LogicalJob:
    """A checked server and its accounts, and the first dump already running."""

    settings: ConnectionSettings
    info: ServerInfo
    databases: list[str]
    users_sql: str
    skipped: list[str]
    extra: tuple[str, ...] = ()
    first: DumpRun | None = None
    binlogs: list[tuple[str, int]] = field(default_factory=list)

    def store(self, repo: Any, *, host: str | None = None, tags: tuple[str, ...] = (),
              retries: int = 3, new_server: bool = False) -> LogicalResult:
        """Store the dump; take it again (``retries`` times) when DDL broke it. Refused
        (`admission.admit`) when the name holds another server's history."""
        name = host or self.info.hostname
        adm = admit(load_archive(repo, name), self.info, name, self.binlogs,
                    new_server=new_server)
        attempt = 0
        while True:
            attempt += 1
            run = self.first or DumpRun(self.settings, self.info, self.databases, self.extra)
            self.first = None
            try:
                snap = self._store(repo, run, host=name, tags=tags, attempt=attempt,
                                   recorded=adm.source(self.info))
                return LogicalResult(snap, attempt, self.databases, list(adm.notes))
            except SourceError as exc:
                transient = any(t in str(exc) for t in RETRYABLE)
                if not transient or attempt > retries:
                    raise
                time.sleep(min(2.0, 0.2 * attempt))
            finally:
                run.close()

    def close(self) -> None:
        if self.first is not None:
            self.first.close()
            self.first = None

    def _store(self, repo: Any, run: DumpRun, *, host: str, tags: tuple[str, ...],
               attempt: int, recorded: dict[str, Any]) -> Any:
        info = self.info
        with repo.new_snapshot(KIND_LOGICAL, ["dump.sql"], host=host, tags=tags) as w:
            try:
                w.add_stream("dump.sql", run.marks)  # type: ignore[arg-type]
            finally:
                run.ahead.close()
            run.proc.finish()
            if not run.marks.complete():
                raise SourceError(f"{run.proc.what} ended without its completion line "
                                  "(dump truncated)")
            file, pos, gtid = run.marks.position()
            if info.log_bin and (file is None or pos is None):
                raise SourceError("the dump does not carry its binlog position")
            if self.users_sql:
                w.add_bytes("users.sql", self.users_sql.encode())
            w.add_bytes(INVENTORY, json.dumps(run.marks.inventory.databases).encode())
            w.source.update({
                "type": "logical",
                **recorded,
                "version": info.version,
                "databases": self.databases,
                "binlog_file": file,
                "binlog_pos": pos,
                "gtid": gtid,
                "users": bool(self.users_sql),
                "inventory": INVENTORY,
                "skipped_accounts": self.skipped,
                "start_time": run.started,
                "stop_time": time.time(),
                "attempts": attempt,
                "dump_bytes": run.marks.size,
            })
            return w.commit()
