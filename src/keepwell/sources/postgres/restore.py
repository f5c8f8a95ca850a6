"""Physical and point-in-time restore: data directory, recovery settings, optional start.

`restore_physical` plans (`plan.choose`), writes the data directory from the chosen base backup
(remapping tablespaces on request; into an existing directory only as a delta), writes
``recovery.signal`` and the recovery settings (``restore_command`` calling keepwell's WAL fetch,
the target, ``recovery_target_action = 'promote'``) and, when asked, starts the server, waits
until recovery has reached the target and promoted, and reports where it stopped (from the
server's own log lines).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from keepwell.errors import RestoreTargetError
from keepwell.sources.postgres import commands
from keepwell.sources.postgres.catalog import Catalog
from keepwell.sources.postgres.datadir import (
    ExtractStats,
    extract_tar,
    make_durable,
    remove_unlisted,
)
from keepwell.sources.postgres.errors import RecoveryError, ToolError
from keepwell.sources.postgres.plan import RestorePlan, Target, choose
from keepwell.sources.postgres.tools import find_program

RECOVERY_MARK = "# keepwell restore: recovery settings"
LOG_NAME = "keepwell-restore.log"
_STOP_RE = re.compile(r"LOG:\s+(recovery stopping .*)")
_LAST_RE = re.compile(r"LOG:\s+last completed transaction was at log time (.*)")
_REDO_DONE_RE = re.compile(r"LOG:\s+redo done at (\S+)")
_FATAL_RE = re.compile(r"(FATAL|PANIC):\s+(.*)")


@dataclass(frozen=True)
class RestoreOptions:
    target_dir: str
    target: Target
    snapshot: str | None = None
    delta: bool = False
    tablespace_map: dict[str, str] | None = None
    start: bool = False
    port: int | None = None
    archive_mode: str = "off"  # "off" or "preserve"
    wait_timeout: float = 600.0
    repo_location: str = ""
    password_file: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class RestoreResult:
    plan: RestorePlan
    stats: ExtractStats
    target_dir: str
    started: bool
    stopped_at: str | None = None
    last_transaction_time: str | None = None
    redo_done_at: str | None = None
    timeline: int | None = None
    port: int | None = None

    def as_dict(self) -> dict[str, Any]:
        b = self.plan.backup
        return {
            "backup": b.short_id, "backup_time": b.time.isoformat(),
            "target": self.plan.target.describe(), "target_dir": self.target_dir,
            "files": self.stats.files, "bytes": self.stats.bytes,
            "written_files": self.stats.written_files, "written_bytes": self.stats.written_bytes,
            "removed": self.stats.removed, "started": self.started, "port": self.port,
            "stopped_at": self.stopped_at, "last_transaction_time": self.last_transaction_time,
            "redo_done_at": self.redo_done_at, "timeline": self.timeline,
            "restore_point_lsn": str(self.plan.point.lsn) if self.plan.point else None,
            "note": self.plan.note,
        }


def restore_command(opts: RestoreOptions, cluster: str, password_file: str) -> str:
    return commands.restore_command(repo=opts.repo_location, password_file=password_file,
                                    cluster=cluster)


def _check_target_dir(opts: RestoreOptions) -> None:
    d = opts.target_dir
    if os.path.exists(d) and not os.path.isdir(d):
        raise RestoreTargetError(f"{d} exists and is not a directory")
    if os.path.isdir(d) and os.listdir(d):
        if not opts.delta:
            raise RestoreTargetError(
                f"{d} is not empty", hint="restore into an empty directory, or pass --delta"
            )
        if os.path.exists(os.path.join(d, "postmaster.pid")):
            raise RestoreTargetError(
                f"{d} holds a running server (postmaster.pid)", hint="stop the server first"
            )


def restore_physical(repo: Any, cluster: str, opts: RestoreOptions) -> RestoreResult:
    catalog = Catalog.build(repo.list_snapshots(), cluster)
    plan = choose(catalog, opts.target, opts.snapshot)
    if opts.start and os.geteuid() == 0:
        raise ToolError("PostgreSQL refuses to run as root",
                        hint="run keepwell as the cluster's owner, e.g. runuser -u postgres --")
    _check_target_dir(opts)
    root = os.path.abspath(opts.target_dir)
    os.makedirs(root, 0o700, exist_ok=True)
    os.chmod(root, 0o700)
    snap = repo.find_snapshot(plan.backup.snapshot_id)
    stats = ExtractStats()
    extract_tar(repo.iter_file(snap, "base.tar"), root, delta=opts.delta, stats=stats)
    ts_lines = _restore_tablespaces(repo, snap, plan, opts, stats)
    keep = {"postmaster.opts"}
    if opts.delta:
        stats.removed = remove_unlisted(root, stats.seen, keep)
    if ts_lines is not None:
        with open(os.path.join(root, "tablespace_map"), "w", encoding="utf-8") as f:
            f.write("".join(ts_lines))
    for sub in ("pg_wal", "pg_wal/archive_status"):
        os.makedirs(os.path.join(root, sub), 0o700, exist_ok=True)
    password_file = _password_file(opts, root)
    write_recovery_settings(root, restore_command(opts, cluster, password_file),
                            plan.target, opts.archive_mode)
    # one flush of everything at the end (files were written without an fsync each)
    make_durable([root, *(line.split(" ", 1)[1].rstrip("\n") for line in ts_lines or [])], stats.synced)
    if not opts.start:
        return RestoreResult(plan, stats, root, False)
    return _start_and_wait(plan, stats, root, opts)


def _restore_tablespaces(repo: Any, snap: Any, plan: RestorePlan, opts: RestoreOptions,
                         stats: ExtractStats) -> list[str] | None:
    spaces = plan.backup.tablespaces
    if not spaces:
        return None
    mapping = opts.tablespace_map or {}
    lines = []
    for oid, meta in sorted(spaces.items()):
        location = mapping.get(oid) or mapping.get(str(meta.get("name"))) or meta["location"]
        location = os.path.abspath(location)
        if os.path.isdir(location) and os.listdir(location) and not opts.delta:
            raise RestoreTargetError(
                f"tablespace {meta.get('name')} location {location} is not empty",
                hint="remap it with --tablespace-map NAME=DIR, or pass --delta",
            )
        extract_tar(repo.iter_file(snap, f"tablespaces/{oid}.tar"), location, delta=opts.delta,
                    stats=stats)
        os.chmod(location, 0o700)
        lines.append(f"{oid} {location}\n")
    return lines


def _password_file(opts: RestoreOptions, root: str) -> str:
    if opts.password_file:
        return os.path.abspath(opts.password_file)
    path = os.path.join(root, "keepwell-restore.password")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write((opts.password or "") + "\n")
    return path


def write_recovery_settings(root: str, command: str, target: Target, archive_mode: str) -> None:
    """Append recovery settings to postgresql.auto.conf and create recovery.signal."""
    auto = os.path.join(root, "postgresql.auto.conf")
    try:
        with open(auto, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    if RECOVERY_MARK in text:
        text = text[: text.index(RECOVERY_MARK)]
    settings = {"restore_command": command, **target.recovery_settings(),
                "recovery_target_action": "promote"}
    if archive_mode == "off":
        settings["archive_mode"] = "off"
    body = "".join(f"{k} = '{str(v).replace(chr(39), chr(39) * 2)}'\n"
                   for k, v in settings.items())
    with open(auto, "w", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + ("\n" if text.strip() else "") + RECOVERY_MARK + "\n" + body)
    open(os.path.join(root, "recovery.signal"), "w").close()
    for stale in ("standby.signal", "postmaster.pid", "backup_label.old"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(root, stale))


def _start_and_wait(plan: RestorePlan, stats: ExtractStats, root: str,
                    opts: RestoreOptions) -> RestoreResult:
    major = int(plan.backup.version.split(".")[0]) if plan.backup.version else None
    pg_ctl = find_program("pg_ctl", major)
    log = os.path.join(root, LOG_NAME)
    extra = f"-p {opts.port}" if opts.port else ""
    argv = [pg_ctl, "-D", root, "-l", log, "-W"]
    if extra:
        argv += ["-o", extra]
    res = subprocess.run([*argv, "start"], capture_output=True, text=True)
    if res.returncode != 0:
        raise RecoveryError(f"pg_ctl start failed: {res.stderr.strip() or res.stdout.strip()}")
    deadline = time.monotonic() + opts.wait_timeout
    while time.monotonic() < deadline:
        text = _read(log)
        if _promoted(text):
            break
        fatal = _FATAL_RE.findall(text)
        if fatal and not _running(pg_ctl, root):
            raise RecoveryError(f"recovery failed: {fatal[-1][1]}")
        time.sleep(0.2)
    else:
        raise RecoveryError(f"recovery did not finish within {opts.wait_timeout:.0f} s")
    text = _read(log)
    stop = _STOP_RE.findall(text)
    last = _LAST_RE.findall(text)
    redo = _REDO_DONE_RE.findall(text)
    tli = re.findall(r"selected new timeline ID: (\d+)", text)
    return RestoreResult(
        plan, stats, root, True, stopped_at=stop[-1] if stop else None,
        last_transaction_time=last[-1] if last else None,
        redo_done_at=redo[-1] if redo else None,
        timeline=int(tli[-1]) if tli else None, port=opts.port,
    )


def _promoted(log_text: str) -> bool:
    return "database system is ready to accept connections" in log_text and (
        "selected new timeline ID" in log_text or "archive recovery complete" in log_text
    )


def _running(pg_ctl: str, root: str) -> bool:
    res = subprocess.run([pg_ctl, "-D", root, "status"], capture_output=True)
    return res.returncode == 0


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""
