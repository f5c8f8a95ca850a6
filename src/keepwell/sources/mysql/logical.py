"""Logical backups: one ``mariadb-dump --single-transaction`` stream, stored uncompressed.

The dump runs in one consistent-snapshot transaction. MariaDB reports the binlog position of
that snapshot (``binlog_snapshot_file``/``_position``) without a global read lock, so writers
never wait; ``--master-data=2 --gtid`` writes it into the dump as comments, which
`DumpMarks` reads from the first and last bytes of the stream as it passes. The dump is stored
as it comes (no compression before keepwell), so consecutive daily dumps deduplicate.

Accounts and grants are read by keepwell itself (``SHOW CREATE USER`` / ``SHOW GRANTS``) into
``users.sql`` as ``CREATE USER IF NOT EXISTS`` + ``GRANT``, skipping the server's own accounts,
so restoring them never overwrites ``root`` on the target.

DDL on a table the dump has not reached yet makes that table's read fail ("table definition has
changed"); the whole dump is then taken again (``retries``), so a stored dump is always complete.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from keepwell.errors import SourceError
from keepwell.sources.mysql import KIND_LOGICAL
from keepwell.sources.mysql.connection import (
    ConnectionSettings,
    ServerInfo,
    connect,
    query,
    server_info,
)
from keepwell.sources.mysql.tools import ReadAhead, ToolProcess, find_tool

SYSTEM_DATABASES = ("information_schema", "performance_schema", "sys", "mysql")
SYSTEM_ACCOUNTS = ("root", "mariadb.sys", "mysql.sys", "mysql.session", "mysql.infoschema",
                   "debian-sys-maint", "healthcheck")
KEEP = 64 * 1024
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
_GTID_MYSQL = re.compile(rb"SET @@GLOBAL.GTID_PURGED=(?:/\*!80000 '\+'\*/ )?'([^']*)'", re.S)
_DONE = re.compile(rb"-- Dump completed")


class DumpMarks:
    """A pass-through reader that keeps the head and tail of a dump for its comments."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.head = bytearray()
        self.tail = bytearray()
        self.size = 0

    def _note(self, data: bytes | bytearray | memoryview) -> None:
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
        gtid = g.group(1).decode().replace("\n", "") if g else None
        return file, pos, gtid

    def complete(self) -> bool:
        return bool(_DONE.search(bytes(self.tail)))


@dataclass
class LogicalResult:
    snapshot: Any
    attempts: int
    databases: list[str] = field(default_factory=list)


def list_databases(conn: Any) -> list[str]:
    return [str(r[0]) for r in query(conn, "SHOW DATABASES") if r[0] not in SYSTEM_DATABASES]


def dump_accounts(conn: Any, info: ServerInfo) -> tuple[str, list[str]]:
    """``users.sql`` text for the non-system accounts, and the accounts that were skipped."""
    cols = "user, host, is_role" if info.flavor == "mariadb" else "user, host, 'N'"
    rows = query(conn, f"SELECT {cols} FROM mysql.user ORDER BY user, host")
    lines = ["-- accounts and grants written by keepwell", "SET sql_mode = '';"]
    skipped: list[str] = []
    for user, host, is_role in rows:
        user, host = str(user), str(host)
        if user in SYSTEM_ACCOUNTS or user.startswith("mysql.") or not user:
            continue
        account = "`{}`@`{}`".format(user.replace("`", "``"), host.replace("`", "``"))
        try:
            if str(is_role) == "Y":
                lines.append(f"CREATE ROLE IF NOT EXISTS `{user}`;")
                grants = query(conn, f"SHOW GRANTS FOR `{user}`")
            else:
                (create,) = query(conn, f"SHOW CREATE USER {account}")[0]
                lines.append(re.sub(r"^CREATE USER ", "CREATE USER IF NOT EXISTS ",
                                    str(create)) + ";")
                grants = query(conn, f"SHOW GRANTS FOR {account}")
        except SourceError:
            skipped.append(f"{user}@{host}")
            continue
        lines += [f"{g[0]};" for g in grants]
    lines.append("FLUSH PRIVILEGES;")
    return "\n".join(lines) + "\n", skipped


def dump_argv(option_file: str, info: ServerInfo, databases: list[str],
              extra: tuple[str, ...] = ()) -> list[str]:
    tool = find_tool("dump")
    argv = [tool, f"--defaults-file={option_file}", "--single-transaction",
            "--routines", "--triggers", "--events", "--hex-blob", "--quick",
            "--max-allowed-packet=1G", f"--net-buffer-length={NET_BUFFER_LENGTH}",
            "--default-character-set=utf8mb4", "--add-drop-database"]
    if info.log_bin:
        argv += ["--master-data=2"]
        if os.path.basename(tool).startswith("mariadb"):
            argv += ["--gtid"]
        else:  # MySQL's mysqldump: no GTID_PURGED statement that a running target would refuse
            argv += ["--set-gtid-purged=OFF"]
    argv += list(extra)
    argv += ["--databases", *databases]
    return argv


def logical_backup(repo: Any, settings: ConnectionSettings, *, databases: list[str] | None = None,
                   users: bool = True, host: str | None = None, tags: tuple[str, ...] = (),
                   retries: int = 3, extra_args: tuple[str, ...] = ()) -> LogicalResult:
    """Dump the server (or the chosen databases) into a ``mysql-logical`` snapshot."""
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
    finally:
        conn.close()

    attempt = 0
    while True:
        attempt += 1
        try:
            snap = _dump_once(repo, settings, info, chosen, users_sql, skipped,
                              host=host, tags=tags, extra=extra_args, attempt=attempt)
            return LogicalResult(snap, attempt, chosen)
        except SourceError as exc:
            transient = any(t in str(exc) for t in RETRYABLE)
            if not transient or attempt > retries:
                raise
            time.sleep(min(2.0, 0.2 * attempt))


def _dump_once(repo: Any, settings: ConnectionSettings, info: ServerInfo, databases: list[str],
               users_sql: str, skipped: list[str], *, host: str | None, tags: tuple[str, ...],
               extra: tuple[str, ...], attempt: int) -> Any:
    started = time.time()
    with settings.option_file() as opt:
        proc = ToolProcess(dump_argv(opt, info, databases, extra), what="mariadb-dump")
        try:
            with repo.new_snapshot(KIND_LOGICAL, ["dump.sql"], host=host or info.hostname,
                                   tags=tags) as w:
                ahead = ReadAhead(proc.stdout)
                marks = DumpMarks(ahead)
                try:
                    w.add_stream("dump.sql", marks)  # type: ignore[arg-type]
                finally:
                    ahead.close()
                proc.finish()
                if not marks.complete():
                    raise SourceError("mariadb-dump ended without its completion line "
                                      "(dump truncated)")
                file, pos, gtid = marks.position()
                if info.log_bin and (file is None or pos is None):
                    raise SourceError("the dump does not carry its binlog position")
                if users_sql:
                    w.add_bytes("users.sql", users_sql.encode())
                w.source.update({
                    "type": "logical",
                    "server": info.identity(),
                    "version": info.version,
                    "databases": databases,
                    "binlog_file": file,
                    "binlog_pos": pos,
                    "gtid": gtid,
                    "users": bool(users_sql),
                    "skipped_accounts": skipped,
                    "start_time": started,
                    "stop_time": time.time(),
                    "attempts": attempt,
                    "dump_bytes": marks.size,
                })
                return w.commit()
        finally:
            proc.kill()
