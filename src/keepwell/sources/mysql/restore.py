"""Restoring: logical dumps into a running server, physical backups into a datadir, and binlog
replay up to a target.

- `restore_logical` pipes the stored dump (all of it, one database or one table, see
  `dumpfilter`) and the accounts into the ``mariadb`` client of the target server.
- `restore_physical` extracts the stored xbstream with ``mbstream``, runs ``mariabackup
  --prepare`` and ``--copy-back`` into an empty target datadir, and gives the files to the
  owner the server runs as.
- `replay` writes the archived binlogs of a `plan.ReplayPlan` to a spool directory and runs one
  ``mariadb-binlog --start-position --stop-position`` into one client session, so the replay
  stops exactly at the planned position.
- `LocalServer` starts a server on a restored datadir: privately (socket only, no grant checks)
  for replay, or on a port for ``--start``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keepwell.errors import RestoreTargetError, SourceError
from keepwell.sources.mysql.catalog import BinlogFile
from keepwell.sources.mysql.connection import ConnectionSettings
from keepwell.sources.mysql.dumpfilter import filter_dump, lines_of
from keepwell.sources.mysql.plan import ReplayPlan
from keepwell.sources.mysql.tools import ToolProcess, find_tool, run_tool

PIPE_BLOCK = 1 << 20


def _feed(proc: ToolProcess, chunks: Iterator[bytes]) -> None:
    assert proc.proc.stdin is not None
    try:
        for chunk in chunks:
            proc.proc.stdin.write(chunk)
    except BrokenPipeError:
        pass  # the client stopped on an error: finish() reports it
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.proc.stdin.close()


def client_argv(option_file: str, *extra: str) -> list[str]:
    return [find_tool("client"), f"--defaults-file={option_file}", "--binary-mode",
            "--max-allowed-packet=1G", "--default-character-set=utf8mb4", *extra]


def run_sql_stream(settings: ConnectionSettings, chunks: Iterator[bytes], what: str) -> None:
    with settings.option_file() as opt:
        proc = ToolProcess(client_argv(opt), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                           what=what)
        try:
            _feed(proc, chunks)
            proc.finish()
        finally:
            proc.kill()


def restore_logical(repo: Any, snap: Any, target: ConnectionSettings, *,
                    database: str | None = None, table: str | None = None,
                    users: bool = True) -> None:
    dbs = list((snap.source or {}).get("databases") or [])
    if table is not None and database is None:
        if len(dbs) != 1:
            raise SourceError("--table needs --database (the dump holds several databases)")
        database = dbs[0]
    if database is not None and dbs and database not in dbs:
        raise SourceError(f"database {database} is not in snapshot {snap.short_id} "
                          f"(it holds {', '.join(dbs)})")
    chunks: Iterator[bytes] = repo.iter_file(snap, "dump.sql")
    if database is not None:
        chunks = filter_dump(lines_of(chunks), database, table)
    run_sql_stream(target, chunks, "mariadb (restoring the dump)")
    if users and database is None and (snap.source or {}).get("users"):
        run_sql_stream(target, repo.iter_file(snap, "users.sql"), "mariadb (restoring accounts)")


def _owner_ids(owner: str | None) -> tuple[int, int] | None:
    if owner is None:
        if os.geteuid() != 0:
            return None
        try:
            pw = pwd.getpwnam("mysql")
        except KeyError:
            return None
        return pw.pw_uid, pw.pw_gid
    try:
        pw = pwd.getpwnam(owner)
    except KeyError:
        raise SourceError(f"user {owner} does not exist", hint="pass an existing --owner") from None
    return pw.pw_uid, pw.pw_gid


def restore_physical(repo: Any, snap: Any, target_dir: str, *, owner: str | None = None,
                     work_dir: str | None = None, memory: str = "256M") -> None:
    target = Path(target_dir)
    if target.exists() and any(target.iterdir()):
        raise RestoreTargetError(f"{target} is not empty")
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="keepwell-mbx-", dir=work_dir) as tmp:
        ext = ToolProcess([find_tool("extract"), "-x", "-C", tmp], stdin=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, what="mbstream")
        try:
            _feed(ext, repo.iter_file(snap, "backup.xbstream"))
            ext.finish()
        finally:
            ext.kill()
        backup = find_tool("backup")
        run_tool([backup, "--no-defaults", "--prepare", f"--target-dir={tmp}",
                  f"--use-memory={memory}"], what="mariabackup --prepare")
        run_tool([backup, "--no-defaults", "--move-back", f"--target-dir={tmp}",
                  f"--datadir={target}"], what="mariabackup --move-back")
    ids = _owner_ids(owner)
    if ids is not None:
        for root, dirs, files in os.walk(target):
            for n in (*dirs, *files):
                os.lchown(os.path.join(root, n), *ids)
        os.chown(target, *ids)


@dataclass
class LocalServer:
    """A mariadbd on a restored datadir, started by keepwell."""

    datadir: str
    socket: str
    port: int | None
    pid: int
    proc: subprocess.Popen[bytes] | None

    @classmethod
    def start(cls, datadir: str, *, port: int | None = None, user: str | None = None,
              private: bool = False, server_id: int | None = None,
              timeout: float = 120) -> LocalServer:
        sock = os.path.join(tempfile.mkdtemp(prefix="keepwell-mysqld-"), "mysqld.sock") \
            if private else os.path.join(datadir, "mysqld.sock")
        run_as = user or ("root" if os.geteuid() == 0 and not _has_user("mysql") else
                          ("mysql" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name))
        argv = [find_tool("server"), "--no-defaults", f"--datadir={datadir}", f"--socket={sock}",
                f"--user={run_as}", f"--pid-file={os.path.join(datadir, 'keepwell.pid')}",
                f"--log-error={os.path.join(datadir, 'keepwell-restore.err')}"]
        if private:
            argv += ["--skip-networking", "--skip-grant-tables", "--skip-slave-start",
                     "--skip-log-bin"]
        else:
            argv += [f"--port={port or 3306}", "--bind-address=127.0.0.1"]
        if server_id is not None:
            argv.append(f"--server-id={server_id}")
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=not private)
        server = cls(datadir, sock, port, proc.pid, proc)
        server._wait(timeout)
        return server

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                log = os.path.join(self.datadir, "keepwell-restore.err")
                text = Path(log).read_text(errors="replace") if os.path.exists(log) else ""
                lines = [ln for ln in text.splitlines() if "ERROR" in ln] or text.splitlines()
                raise SourceError("the restored server did not start: "
                                  + (lines[-1] if lines else "no log"))
            if os.path.exists(self.socket):
                return
            time.sleep(0.1)
        raise SourceError(f"the restored server did not start within {timeout:.0f} s")

    def settings(self) -> ConnectionSettings:
        return ConnectionSettings(host="localhost", socket=self.socket, user="root")

    def stop(self, timeout: float = 120) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        sockdir = os.path.dirname(self.socket)
        if os.path.basename(sockdir).startswith("keepwell-mysqld-"):
            shutil.rmtree(sockdir, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def spool_binlog(repo: Any, f: BinlogFile, directory: str) -> str:
    """Write one archived binlog to ``directory``; return its path."""
    path = os.path.join(directory, f.name)
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
    argv = [find_tool("binlog"), "--no-defaults", f"--start-position={p.start_offset}"]
    if p.stop_offset is not None:
        argv.append(f"--stop-position={p.stop_offset}")
    argv += paths
    with target.option_file() as opt:
        reader = ToolProcess(argv, what="mariadb-binlog")
        client = ToolProcess(client_argv(opt), stdin=reader.stdout, stdout=subprocess.DEVNULL,
                             what="mariadb (replaying binlogs)")
        reader.stdout.close()  # the client holds the pipe now; it must see the reader's EOF
        try:
            client.finish()
            reader.finish()
        finally:
            client.kill()
            reader.kill()
