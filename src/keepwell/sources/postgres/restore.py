"""Physical and point-in-time restore: data directory, recovery settings, optional start.

`restore_physical` plans (`plan.choose`), decides and checks every destination before writing
(`restoretarget`: the data directory, each tablespace in place or where the user mapped it,
never a path a running server uses), writes the data directory from the chosen base backup
(into an existing directory only as a delta), writes ``recovery.signal`` and the recovery settings
(``restore_command`` calling keepwell's guarded WAL fetch with the restore's `FetchPolicy`
(`walguard`), the target, ``recovery_target_action = 'promote'``), and, when asked, starts the
server, waits until recovery has reached the target and promoted, and reports where it stopped
(from the server's own log lines). Recovery to the end of the WAL that stops before the last
archived segment is a failure, not a success.

The server is started with the settings that could reach outside the data directory pinned
(`SAFE_START`): the data directory itself, no external pid file, the log on stderr.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from keepwell.errors import RestoreTargetError, UsageError
from keepwell.sources.files.targetdir import TargetDirs
from keepwell.sources.postgres import commands
from keepwell.sources.postgres.catalog import Catalog
from keepwell.sources.postgres.datadir import (
    ExtractStats,
    extract_tar,
    make_durable,
    own_file,
    remove_unlisted,
)
from keepwell.sources.postgres.errors import RecoveryError, ToolError
from keepwell.sources.postgres.plan import RestorePlan, Target, choose
from keepwell.sources.postgres.restoretarget import TargetLayout, plan_layout
from keepwell.sources.postgres.tools import find_program
from keepwell.sources.postgres.walguard import FetchPolicy
from keepwell.sources.postgres.walnames import Lsn, parse_segment_name, segment_name

RECOVERY_MARK = "# keepwell restore: recovery settings"
LOG_NAME = "keepwell-restore.log"
_STOP_RE = re.compile(r"LOG:\s+(recovery stopping .*)")
_LAST_RE = re.compile(r"LOG:\s+last completed transaction was at log time (.*)")
_REDO_DONE_RE = re.compile(r"LOG:\s+redo done at (\S+)")
_FATAL_RE = re.compile(r"(FATAL|PANIC):\s+(.*)")
_STANDBY_READY = "database system is ready to accept read-only connections"
_KEEPWELL_RE = re.compile(r"^keepwell: (.*(?:cannot|missing|refus|overwrite).*)$", re.M)


@dataclass(frozen=True)
class RestoreOptions:
    target_dir: str
    target: Target
    snapshot: str | None = None
    delta: bool = False
    tablespace_map: dict[str, str] | None = None
    tablespace_map_all: str | None = None
    allow_gap: bool = False
    standby: bool = False  # a standby that follows the archive (standby.signal), no target
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
            "gap": list(self.plan.gap) if self.plan.gap else None,
        }


def restore_command(opts: RestoreOptions, cluster: str, password_file: str,
                    policy: FetchPolicy) -> str:
    return commands.restore_command(repo=opts.repo_location, password_file=password_file,
                                    cluster=cluster, policy=policy.args())


def restore_physical(repo: Any, cluster: str, opts: RestoreOptions) -> RestoreResult:
    catalog = Catalog.build(repo.list_snapshots(), cluster)
    if opts.standby and opts.target.kind() != "end":
        raise UsageError("a standby follows the archive to its end: give it no recovery target")
    plan = choose(catalog, opts.target, opts.snapshot, allow_gap=opts.allow_gap)
    if opts.start and os.geteuid() == 0:
        raise ToolError("PostgreSQL refuses to run as root",
                        hint="run keepwell as the cluster's owner, e.g. runuser -u postgres --")
    if opts.start and opts.port and port_in_use(opts.port):
        raise RestoreTargetError(f"port {opts.port} is in use (by a running server?): the"
                                 " restored server must not take it", hint="pass another --port")
    layout = plan_layout(opts.target_dir, plan.backup, delta=opts.delta,
                         tablespace_map=opts.tablespace_map,
                         tablespace_map_all=opts.tablespace_map_all)
    root = layout.root
    os.makedirs(root, 0o700, exist_ok=True)
    os.chmod(root, 0o700)
    snap = repo.find_snapshot(plan.backup.snapshot_id)
    stats = ExtractStats()
    extract_tar(repo.iter_file(snap, "base.tar"), root, delta=opts.delta, stats=stats)
    _restore_tablespaces(repo, snap, layout, opts, stats)
    keep = {"postmaster.opts"}
    if opts.delta:
        stats.removed = sum(remove_unlisted(r, stats.seen, keep if r == root else set())
                            for r in layout.roots())
    _write_tablespace_map(root, layout)
    _make_dirs(root, "pg_wal/archive_status")
    password_file = _password_file(opts, root)
    policy = FetchPolicy("inside", _oid_map(opts, plan),
                         os.path.abspath(opts.tablespace_map_all)
                         if opts.tablespace_map_all else None, plan.timeline, opts.allow_gap,
                         "follow" if opts.standby else
                         "end" if plan.target.kind() == "end" else "point")
    write_recovery_settings(root, restore_command(opts, cluster, password_file, policy),
                            plan.target, opts.archive_mode, standby=opts.standby,
                            major=_major(plan.backup.version))
    # one flush of everything at the end (files were written without an fsync each)
    make_durable(layout.roots(), stats.synced)
    if not opts.start:
        return RestoreResult(plan, stats, root, False)
    return _start_and_wait(plan, stats, root, opts)


def _oid_map(opts: RestoreOptions, plan: RestorePlan) -> dict[str, str]:
    """The user's tablespace mapping by OID (names resolved through the backup)."""
    by_name = {str(m.get("name")): oid for oid, m in plan.backup.tablespaces.items()}
    return {(key if key.isdigit() else by_name[key]): os.path.abspath(value)
            for key, value in (opts.tablespace_map or {}).items()}


def _restore_tablespaces(repo: Any, snap: Any, layout: TargetLayout, opts: RestoreOptions,
                         stats: ExtractStats) -> None:
    for place in layout.tablespaces:
        location = place.path(layout.root)
        if place.directory is None:  # the link the base backup holds there is replaced
            _make_dirs(layout.root, f"pg_tblspc/{place.oid}")
        extract_tar(repo.iter_file(snap, f"tablespaces/{place.oid}.tar"), location,
                    delta=opts.delta, stats=stats)
        os.chmod(location, 0o700)


def _make_dirs(root: str, rel: str) -> None:
    """The directory ``rel`` inside ``root`` and those above it, made where missing; a link or
    file in the way is removed (the link itself, never what it names)."""
    dirs = TargetDirs(root, replace=True)
    try:
        dirs.acquire(rel, create=True)
        dirs.release(rel)
    finally:
        dirs.close()


def _write_tablespace_map(root: str, layout: TargetLayout) -> None:
    """``tablespace_map`` names the tablespaces outside the data directory; one from the backup
    would point PostgreSQL at the original (possibly live) locations, so it never stays."""
    path = os.path.join(root, "tablespace_map")
    lines = layout.map_lines()
    if lines or os.path.lexists(path):
        with open(own_file(path), "w", encoding="utf-8") as f:
            f.write("".join(lines))


def _password_file(opts: RestoreOptions, root: str) -> str:
    if opts.password_file:
        return os.path.abspath(opts.password_file)
    path = own_file(os.path.join(root, "keepwell-restore.password"))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write((opts.password or "") + "\n")
    return path


def _major(version: str) -> int | None:
    head = version.split(".")[0]
    return int(head) if head.isdigit() else None


def write_recovery_settings(root: str, command: str, target: Target, archive_mode: str, *,
                            standby: bool = False, major: int | None = None) -> None:
    """Append recovery settings to postgresql.auto.conf and create recovery.signal (a standby:
    standby.signal, no target, and WAL from the archive only, not streamed from a primary the
    restored configuration may name, which would bypass the fetch's guard)."""
    auto = os.path.join(root, "postgresql.auto.conf")
    try:
        with open(auto, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    if RECOVERY_MARK in text:
        text = text[: text.index(RECOVERY_MARK)]
    settings = {"restore_command": command,
                # tablespaces kept inside the data directory are directories in pg_tblspc,
                # which recovery refuses to finish with unless this is on
                "allow_in_place_tablespaces": "on",
                # the backed-up server's own commands (pg_archivecleanup of its archive, a
                # script of its failover) would act on the live cluster's files: never run
                "recovery_end_command": "", "archive_cleanup_command": ""}
    if major is not None and major <= 15:
        # a restored standby would promote itself on the live standby's trigger file, and
        # remove it (PostgreSQL 16 has no such setting, and refuses one it does not know)
        settings["promote_trigger_file"] = ""
    if standby:
        settings.update(primary_conninfo="", primary_slot_name="")
    else:
        settings.update(**target.recovery_settings(), recovery_target_action="promote")
    if archive_mode == "off":
        # a copy, not the cluster's successor: it neither archives into the cluster's archive
        # nor starts its subscriptions, which would take the live subscriber's slots on the
        # publishers and consume the changes the live subscriber then never gets
        settings.update(archive_mode="off", max_logical_replication_workers="0")
    body = "".join(f"{k} = '{str(v).replace(chr(39), chr(39) * 2)}'\n"
                   for k, v in settings.items())
    with open(own_file(auto), "w", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + ("\n" if text.strip() else "") + RECOVERY_MARK + "\n" + body)
    signal, stale_signal = ("standby.signal", "recovery.signal") if standby else (
        "recovery.signal", "standby.signal")
    open(own_file(os.path.join(root, signal)), "w").close()
    for stale in (stale_signal, "postmaster.pid", "backup_label.old"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(root, stale))


def _start_and_wait(plan: RestorePlan, stats: ExtractStats, root: str,
                    opts: RestoreOptions) -> RestoreResult:
    pg_ctl = find_program("pg_ctl", _major(plan.backup.version))
    log = own_file(os.path.join(root, LOG_NAME))
    with open(log, "w", encoding="utf-8"):
        pass  # a log restored with the data directory (of an earlier restore) says nothing now
    if not os.path.exists(os.path.join(root, "postgresql.conf")):
        raise RecoveryError(
            f"{root} holds no postgresql.conf (the cluster keeps its configuration outside its"
            " data directory, as Debian's packages do): the restored server was not started",
            hint="copy the cluster's postgresql.conf and pg_hba.conf into it, without the"
                 " data_directory, hba_file and ident_file lines that name the live cluster's,"
                 " then start it with pg_ctl")
    configured = None if opts.port else configured_port(root)
    if configured is not None and port_in_use(configured):
        raise RecoveryError(f"port {configured} of the restored configuration is in use (by the"
                            " live server?): the restored server was not started",
                            hint="start it with pg_ctl -o '-p PORT', or restore with --port")
    argv = [pg_ctl, "-D", root, "-l", log, "-W", "-o", safe_start_options(root, opts.port)]
    res = subprocess.run([*argv, "start"], capture_output=True, text=True)
    if res.returncode != 0:
        raise RecoveryError(f"pg_ctl start failed: {res.stderr.strip() or res.stdout.strip()}")
    started = time.monotonic()
    deadline = started + opts.wait_timeout
    looked = started
    while time.monotonic() < deadline:
        text = _read(log)
        if _promoted(text) or opts.standby and _STANDBY_READY in text and reached_end(plan, text):
            break  # a standby: once it has replayed the archive as it was
        fatal = _FATAL_RE.findall(text)
        if fatal and not _running(pg_ctl, root):
            ours = _KEEPWELL_RE.findall(text)  # the fetch says why it failed, in the same log
            raise RecoveryError(f"recovery failed: {fatal[-1][1]}"
                                + (f" ({ours[-1]})" if ours else ""),
                                hint=_not_reached_hint(plan) if _NOT_REACHED in fatal[-1][1]
                                else None)
        now = time.monotonic()
        if now - looked >= 3 and not os.path.exists(os.path.join(root, "postmaster.pid")):
            looked = now  # a server that stopped before it wrote a FATAL line (a bad setting)
            if not _running(pg_ctl, root):
                lines = [ln for ln in _read(log).splitlines() if ln.strip()]
                raise RecoveryError("the restored server stopped: "
                                    + (lines[-1] if lines else "it wrote nothing to its log"))
        time.sleep(0.2)
    else:
        raise RecoveryError(f"recovery did not finish within {opts.wait_timeout:.0f} s")
    text = _read(log)
    stop = _STOP_RE.findall(text)
    last = _LAST_RE.findall(text)
    redo = _REDO_DONE_RE.findall(text)
    tli = re.findall(r"selected new timeline ID: (\d+)", text)
    if plan.target.kind() == "end" and not opts.standby:
        check_reached_end(plan, text)
    return RestoreResult(
        plan, stats, root, True, stopped_at=stop[-1] if stop else None,
        last_transaction_time=last[-1] if last else None,
        redo_done_at=redo[-1] if redo else None,
        timeline=int(tli[-1]) if tli else None, port=opts.port,
    )


_NOT_REACHED = "recovery ended before configured recovery target was reached"


def _not_reached_hint(plan: RestorePlan) -> str:
    """What to do when recovery read all the WAL it could without meeting its target."""
    kind, b = plan.target.kind(), plan.backup
    if kind == "time":
        return ("PostgreSQL stops at the first commit after the target time, and no commit"
                " after it is archived: the state at that time is the end of the archived WAL;"
                " restore without a target, or wait until later WAL is archived")
    if kind == "name":
        return (f"the restore point is not in the WAL from backup {b.short_id} on: pass"
                " --snapshot with an older backup, or wait until the WAL holding it is archived")
    return (f"the {kind} target is not in the WAL from backup {b.short_id} to the end of the"
            " archive: restore to an earlier target, or wait until later WAL is archived")


def safe_start_arguments(root: str, port: int | None) -> list[str]:
    """Server arguments that keep a restored server inside its data directory, whatever the
    restored configuration says: no other data directory, an external pid file (if the
    configuration names one, it may be the live server's) inside it, its log on stderr (where
    keepwell reads it)."""
    pid_file = os.path.join(root, "keepwell-server.pid")
    args = ["-c", f"data_directory={root}", "-c", f"external_pid_file={pid_file}",
            "-c", "logging_collector=off"]
    return ["-p", str(int(port)), *args] if port else args


def safe_start_options(root: str, port: int | None) -> str:
    """`safe_start_arguments` as one ``pg_ctl -o`` string (its log file is where stderr goes)."""
    return shlex.join(safe_start_arguments(root, port))


def configured_port(root: str) -> int:
    """The port a data directory's own configuration sets (the last setting wins)."""
    port = 5432
    for name in ("postgresql.conf", "postgresql.auto.conf"):
        with contextlib.suppress(OSError), open(os.path.join(root, name), encoding="utf-8",
                                                errors="replace") as f:
            for m in re.finditer(r"^\s*port\s*=?\s*'?(\d+)'?", f.read(), re.M):
                port = int(m.group(1))
    return port


def port_in_use(port: int) -> bool:
    """Whether something listens on `port` of the loopback address."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


_NOT_ARCHIVED_RE = re.compile(
    r"keepwell: WAL (?:file|segment) ([0-9A-F]{24}) is (?:not in the repository|missing)")


def reached_end(plan: RestorePlan, log_text: str) -> bool:
    """Whether recovery read the last segment the plan counted on: the fetch reported a later
    one missing, or redo went on into that last segment."""
    size = plan.backup.segment_size
    last = plan.wal_end.segno(size) - 1
    asked = [parse_segment_name(n, size) for n in _NOT_ARCHIVED_RE.findall(log_text)]
    if any(p is not None and p[1] > last for p in asked):
        return True
    redo = _REDO_DONE_RE.findall(log_text)
    return bool(redo) and Lsn.parse(redo[-1]).segno(size) >= last


def check_reached_end(plan: RestorePlan, log_text: str) -> None:
    """Recovery to the end of the WAL that stopped short of it is a failure."""
    if reached_end(plan, log_text):
        return
    size = plan.backup.segment_size
    redo = _REDO_DONE_RE.findall(log_text)
    raise RecoveryError(
        f"recovery ended at {redo[-1] if redo else 'the start of the backup'}, before the end"
        f" of the archived WAL ({segment_name(plan.timeline, plan.wal_end.segno(size) - 1, size)}"
        "): the server read no further",
        hint=f"see the restored server's log {LOG_NAME} in the target directory")


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
