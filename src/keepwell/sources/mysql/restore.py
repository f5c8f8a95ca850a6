"""Restoring: logical dumps into a running server, physical backups into a datadir, and binlog
replay up to a target.

- `restore_logical` pipes the stored dump (all of it, chosen databases or tables of one
  database, see `dumpfilter`) and the accounts into the ``mariadb`` client of the target
  server. Every name given must be in the dump: checked against the dump's inventory before
  the target is touched (older snapshots have none; the filter then sends nothing for a name
  it does not find).
- `restore_physical` extracts the stored xbstream with ``mbstream`` (``xbstream`` for MySQL)
  into a directory beside the target, runs ``mariabackup --prepare`` and ``--move-back`` into
  the empty target datadir (a rename on the same file system), and gives the files to the
  owner the server runs as. It writes only inside the target and that hidden directory beside
  it, and refuses a target inside another server's data directory (`check_target_dir`).
- `replay` writes the archived binlogs of a `plan.ReplayPlan` to a spool directory and runs one
  ``mariadb-binlog --start-position --stop-position`` into one client session, so the replay
  stops exactly at the planned position.
- `LocalServer` starts a server on a restored datadir (`keepwell.sources.tempserver`):
  privately (socket only, no grant checks) for replay and drills, or on a port for ``--start``.
  It runs as the datadir's owner; a private server's socket directory is made for that user,
  and `check_reachable` refuses, before anything is restored, a target that user could not
  enter.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keepwell.errors import IntegrityError, RestoreTargetError, SourceError, UsageError
from keepwell.sources.mysql.binlog import is_binlog_name
from keepwell.sources.mysql.catalog import BinlogFile
from keepwell.sources.mysql.connection import ConnectionSettings
from keepwell.sources.mysql.dumpfilter import filter_dump, lines_of
from keepwell.sources.mysql.plan import ReplayPlan
from keepwell.sources.mysql.tools import MARIADB, MYSQL, find, find_tool
from keepwell.sources.streams import widen_pipe
from keepwell.sources.tempserver import TempServer, hand_over, unreachable
from keepwell.sources.tools import ToolProcess, run_tool, socket_directory

PIPE_BLOCK = 1 << 20
_HISTORY_KEY = re.compile(r"h-?\d+(?:-\d+)?")  # keepwell.sources.mysql.catalog.Catalog.key
_SOCKDIR_PREFIX = "keepwell-mysqld-"


def _feed(proc: ToolProcess, chunks: Iterator[bytes]) -> None:
    assert proc.proc.stdin is not None
    widen_pipe(proc.proc.stdin)
    try:
        for chunk in chunks:
            proc.proc.stdin.write(chunk)
    except BrokenPipeError:
        pass  # the client stopped on an error: finish() reports it
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.proc.stdin.close()


def flavor_of(snap_or_source: Any) -> str:
    """Whose server wrote a snapshot (``mariadb`` unless it recorded ``mysql``)."""
    src = getattr(snap_or_source, "source", snap_or_source) or {}
    return MYSQL if (src.get("server") or {}).get("flavor") == MYSQL else MARIADB


def client_argv(option_file: str, *extra: str, flavor: str | None = None) -> list[str]:
    return [find_tool("client", flavor), f"--defaults-file={option_file}", "--binary-mode",
            "--max-allowed-packet=1G", "--default-character-set=utf8mb4", *extra]


def run_sql_stream(settings: ConnectionSettings, chunks: Iterator[bytes], what: str,
                   flavor: str | None = None) -> None:
    with settings.option_file() as opt:
        proc = ToolProcess(client_argv(opt, flavor=flavor), stdin=subprocess.PIPE,
                           stdout=subprocess.DEVNULL,
                           what=what)
        try:
            _feed(proc, chunks)
            proc.finish()
        finally:
            proc.kill()


def read_inventory(repo: Any, snap: Any) -> dict[str, list[str]] | None:
    """The databases and tables a logical snapshot's dump holds (None for older snapshots)."""
    name = (snap.source or {}).get("inventory")
    if not name:
        return None
    data: dict[str, list[str]] = json.loads(b"".join(repo.iter_file(snap, name)))
    return data


def check_names(snap: Any, inventory: dict[str, list[str]] | None,
                databases: list[str], tables: list[str]) -> list[str]:
    """The databases to restore, after checking every name given is in the snapshot."""
    dbs = list((snap.source or {}).get("databases") or []) or list(inventory or {})
    if tables and not databases:
        if len(dbs) != 1:
            raise UsageError("--table needs --database (the dump holds several databases)")
        databases = [dbs[0]]
    if tables and len(databases) > 1:
        raise UsageError("--table restores tables of one database: give one --database with it")
    missing = [d for d in databases if dbs and d not in dbs]
    if missing:
        raise SourceError(f"database {', '.join(missing)} is not in snapshot {snap.short_id} "
                          f"(it holds {', '.join(dbs)})")
    if tables and inventory is not None:
        have = inventory.get(databases[0], [])
        missing = [t for t in tables if t not in have]
        if missing:
            shown = ", ".join(have[:12]) + (", ..." if len(have) > 12 else "")
            raise SourceError(f"table {', '.join(missing)} is not in database {databases[0]} "
                              f"of snapshot {snap.short_id} (it holds {shown or 'no tables'})")
    return databases


def restore_logical(repo: Any, snap: Any, target: ConnectionSettings, *,
                    databases: list[str] | None = None, tables: list[str] | None = None,
                    users: bool = True) -> None:
    chosen = check_names(snap, read_inventory(repo, snap), list(databases or []),
                         list(tables or []))
    chunks: Iterator[bytes] = repo.iter_file(snap, "dump.sql")
    if chosen:
        chunks = filter_dump(lines_of(chunks), chosen, list(tables or []) or None)
    flavor = flavor_of(snap)
    run_sql_stream(target, chunks, "the client (restoring the dump)", flavor)
    if users and not chosen and (snap.source or {}).get("users"):
        run_sql_stream(target, repo.iter_file(snap, "users.sql"),
                       "the client (restoring accounts)", flavor)


def _looks_like_datadir(path: Path) -> bool:
    return (path / "mysql").is_dir() and any(
        (path / n).exists() for n in ("ibdata1", "aria_log_control", "auto.cnf"))


def check_target_dir(target: Path) -> None:
    """Refuse a target that is not empty, or lies inside a server's data directory (the
    server would take the restored directory for one of its databases)."""
    full = target.resolve()
    for parent in full.parents:
        if _looks_like_datadir(parent):
            raise RestoreTargetError(f"{target} is inside {parent}, the data directory of a "
                                     "MySQL/MariaDB server",
                                     hint="choose a --target-dir outside any data directory")
    if target.exists() and any(target.iterdir()):
        what = ("the data directory of a MySQL/MariaDB server" if _looks_like_datadir(full)
                else "not empty")
        raise RestoreTargetError(f"{target} is {what}",
                                 hint="give an empty or new --target-dir")


def check_reachable(target: Path, user: str) -> None:
    """Refuse a target the server's user could not enter (a private parent such as /root)."""
    try:
        where = unreachable(target, user)
    except KeyError:
        raise SourceError(f"user {user} does not exist", hint="pass an existing --owner") from None
    if where is not None:
        raise RestoreTargetError(f"the restored server would run as {user}, which cannot enter "
                                 f"{where}",
                                 hint=f"choose a --target-dir {user} can reach, or pass --owner")


def check_port(port: int) -> None:
    """Refuse a port something already listens on, before anything is restored."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the server binds: a closed connection lingering on the port does not count
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise UsageError(f"port {port} is in use on 127.0.0.1 (a server runs there?)",
                             hint="choose a free --port for the restored server") from None


def server_user(owner: str | None) -> str:
    """Who a server started on a restored datadir runs as (its files' owner)."""
    if owner:
        return owner
    if os.geteuid() == 0:
        return "mysql" if _has_user("mysql") else "root"
    return pwd.getpwuid(os.geteuid()).pw_name


def _files_owner(owner: str | None) -> str | None:
    """Who the restored files are given to: ``owner``, else (as root) ``mysql`` if it exists."""
    if owner is None:
        return "mysql" if os.geteuid() == 0 and _has_user("mysql") else None
    if not _has_user(owner):
        raise SourceError(f"user {owner} does not exist", hint="pass an existing --owner")
    return owner


def prepare_memory() -> str:
    """Buffer pool for ``--prepare``: a quarter of the available memory, 128 MiB to 2 GiB
    (the tools' default of 100 MiB makes applying a large redo log flush over and over)."""
    avail = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    size = min(max(avail // 4, 128 << 20), 2 << 30) if avail else 256 << 20
    return f"{size >> 20}M"


def _work_dir(target: Path, work_dir: str | None) -> str | None:
    """Where to extract: beside the target, so ``--move-back`` is a rename and a large backup
    never lands in a small /tmp; the temporary directory when the parent is read-only."""
    if work_dir is not None:
        return work_dir
    parent = target.resolve().parent
    return str(parent) if os.access(parent, os.W_OK | os.X_OK) else None


def restore_physical(repo: Any, snap: Any, target_dir: str, *, owner: str | None = None,
                     work_dir: str | None = None, memory: str | None = None) -> None:
    target = Path(target_dir)
    check_target_dir(target)
    target.mkdir(parents=True, exist_ok=True)
    memory = memory or prepare_memory()
    with tempfile.TemporaryDirectory(prefix=".keepwell-restore-",
                                     dir=_work_dir(target, work_dir)) as tmp:
        flavor = flavor_of(snap)
        extract = find("extract", flavor)
        ext = ToolProcess([extract.path, "-x", "-C", tmp], stdin=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, what=extract.name)
        try:
            _feed(ext, repo.iter_file(snap, "backup.xbstream"))
            ext.finish()
        finally:
            ext.kill()
        backup = find("backup", flavor)
        run_tool([backup.path, "--no-defaults", "--prepare", f"--target-dir={tmp}",
                  f"--use-memory={memory}"], what=f"{backup.name} --prepare")
        run_tool([backup.path, "--no-defaults", "--move-back", f"--target-dir={tmp}",
                  f"--datadir={target}"], what=f"{backup.name} --move-back")
    hand_over(str(target), _files_owner(owner))


@dataclass
class LocalServer:
    """A mariadbd on a restored datadir, started by keepwell (`keepwell.sources.tempserver`):
    stopped by `stop`, or left running for the user (``--start``)."""

    datadir: str
    socket: str
    port: int | None
    server: TempServer

    @property
    def pid(self) -> int:
        return self.server.pid

    @classmethod
    def start(cls, datadir: str, *, port: int | None = None, user: str | None = None,
              private: bool = False, server_id: int | None = None,
              timeout: float = 120, flavor: str = MARIADB,
              stop: Callable[[], None] | None = None) -> LocalServer:
        run_as = server_user(user)
        if private:
            # the server creates its socket there: the directory must be its user's
            try:
                pw = pwd.getpwnam(run_as)
            except KeyError:
                raise SourceError(f"user {run_as} does not exist",
                                  hint="pass an existing --owner") from None
            sockdir = tempfile.mkdtemp(prefix=_SOCKDIR_PREFIX)
            if os.geteuid() == 0 and pw.pw_uid != 0:
                os.chown(sockdir, pw.pw_uid, pw.pw_gid)
            sock = os.path.join(sockdir, "mysqld.sock")
        else:
            sockdir = socket_directory(datadir, "mysqld.sock", _SOCKDIR_PREFIX)
            if sockdir != datadir:
                hand_over(sockdir, run_as)
            sock = os.path.join(sockdir, "mysqld.sock")
        log = os.path.join(datadir, "keepwell-restore.err")
        argv = [find_tool("server", flavor), "--no-defaults", f"--datadir={datadir}", f"--socket={sock}",
                f"--user={run_as}", f"--pid-file={os.path.join(datadir, 'keepwell.pid')}",
                f"--log-error={log}"]
        if private:
            # MySQL 8.0.26+ renamed the option; 8.4 no longer knows the old name
            argv += ["--skip-networking", "--skip-grant-tables", "--skip-log-bin",
                     "--skip-replica-start" if flavor == MYSQL else "--skip-slave-start"]
        else:
            argv += [f"--port={port or 3306}", "--bind-address=127.0.0.1"]
        if server_id is not None:
            argv.append(f"--server-id={server_id}")
        server = cls(datadir, sock, port, TempServer(
            argv, ready=lambda: os.path.exists(sock), why=lambda: _start_error(log)))
        try:
            server.server.start(timeout, stop)
        except BaseException:
            server.stop()
            raise
        return server

    def settings(self) -> ConnectionSettings:
        return ConnectionSettings(host="localhost", socket=self.socket, user="root")

    def stop(self, timeout: float = 120) -> None:
        self.server.stop(timeout)
        sockdir = os.path.dirname(self.socket)
        if os.path.basename(sockdir).startswith(_SOCKDIR_PREFIX):
            shutil.rmtree(sockdir, ignore_errors=True)


def _start_error(log: str) -> str | None:
    """The last error of the server's log that says why it stopped ("Aborting" only says that
    it did)."""
    text = Path(log).read_text(errors="replace") if os.path.exists(log) else ""
    lines = ([ln for ln in text.splitlines() if "ERROR" in ln
              and not ln.rstrip().endswith("Aborting")] or text.splitlines())
    return lines[-1] if lines else None


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def spool_binlog(repo: Any, f: BinlogFile, directory: str) -> str:
    """Write one archived binlog under ``directory`` (in a folder of its history: two histories
    may hold files of the same name); return its path. The name comes from the snapshot, which
    any host writing to the repository could have forged: one that is not the name of a binlog
    file (``base.NNNNNN``, no ``/``) is refused, never joined to ``directory``."""
    if not is_binlog_name(f.name) or not _HISTORY_KEY.fullmatch(f.history):
        raise IntegrityError(
            f"snapshot {f.snapshot_id[:8]} holds a binary log named {f.name!r} (history "
            f"{f.history!r}), which is not a binary log file name: not restored",
            hint=f"forget the snapshot with 'keepwell forget {f.snapshot_id[:8]}'")
    os.makedirs(os.path.join(directory, f.history), exist_ok=True)
    path = os.path.join(directory, f.history, f.name)
    if os.path.exists(path) and os.path.getsize(path) >= f.size:
        return path
    snap = repo.find_snapshot(f.snapshot_id)
    with open(path, "wb") as out:
        for chunk in repo.iter_file(snap, f"binlog/{f.name}"):
            out.write(chunk)
    return path


def replay(repo: Any, p: ReplayPlan, target: ConnectionSettings, spool_dir: str) -> None:
    """Apply the planned binlog range to the target in one client session."""
    if not p.files:
        return
    paths = [spool_binlog(repo, f, spool_dir) for f in p.files]
    flavor = MYSQL if p.base.server.get("flavor") == MYSQL else MARIADB
    tool = find("binlog", flavor)
    argv = [tool.path, "--no-defaults", f"--start-position={p.start_offset}"]
    if p.stop_offset is not None:
        argv.append(f"--stop-position={p.stop_offset}")
    argv += paths
    with target.option_file() as opt:
        reader = ToolProcess(argv, what=tool.name)
        client = ToolProcess(client_argv(opt, flavor=flavor), stdin=reader.stdout,
                             stdout=subprocess.DEVNULL, what="the client (replaying binlogs)")
        reader.stdout.close()  # the client holds the pipe now; it must see the reader's EOF
        try:
            client.finish()
            reader.finish()
        finally:
            client.kill()
            reader.kill()
