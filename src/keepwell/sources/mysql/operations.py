"""The use cases behind ``keepwell mysql restore/check/info/forget``.

`restore` chooses what to restore (a named snapshot, the latest base, or the base a
point-in-time `plan.Target` needs), restores it (logical into a running server, physical into a
datadir) and replays the archived binlogs up to the target. A physical restore with a target is
replayed through a private server started on the new datadir (socket only, no grant checks),
which is then stopped, or kept running on ``port`` when ``start`` is asked. Everything that can
be refused is refused before the target is touched: an unknown database or table, a target
time beyond the archive, a target directory that is not empty or lies in a server's data
directory, one the server's user cannot enter, a port in use, and a server name whose
snapshots come from two servers without ``--new-server`` (the base must then be named).

`check` reports, per history of the name, the bases, binlogs, gaps and window, and as problems
the gaps and the histories another server started without ``--new-server``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keepwell.errors import PartialError, SourceError, UsageError
from keepwell.repository.retention import Policy, keep_bases, oldest_kept
from keepwell.sources.mysql import BASE_KINDS, KIND_LOGICAL, KIND_PHYSICAL
from keepwell.sources.mysql.catalog import ServerArchive, load_archive
from keepwell.sources.mysql.connection import ConnectionSettings
from keepwell.sources.mysql.identity import describe_server
from keepwell.sources.mysql.plan import ReplayPlan, Target, plan
from keepwell.sources.mysql.restore import (
    LocalServer,
    check_port,
    check_reachable,
    check_target_dir,
    flavor_of,
    replay,
    restore_logical,
    restore_physical,
    server_user,
    spool_binlog,
)
from keepwell.sources.postgres.walindex import DAMAGED, unreadable

Progress = Callable[[str], None]


@dataclass
class RestoreResult:
    snapshot: str
    kind: str
    plan: dict[str, Any] | None = None
    server_pid: int | None = None
    port: int | None = None
    notes: list[str] = field(default_factory=list)


def _base_snapshot(repo: Any, archive: ServerArchive, ref: str | None,
                   kinds: tuple[str, ...]) -> Any:
    if ref is None or ref == "latest":
        if archive.undeclared():
            raise SourceError("; ".join(archive.problems()),
                              hint="name the base to restore with --snapshot")
        bases = [b for b in archive.bases if b.kind in kinds]
        if not bases:
            raise SourceError("no MySQL/MariaDB base backup in this repository",
                              hint="take one with 'keepwell mysql backup'")
        return repo.find_snapshot(bases[-1].snapshot_id)
    snap = repo.find_snapshot(ref)
    if snap.kind not in BASE_KINDS:
        raise UsageError(f"snapshot {snap.short_id} is a {snap.kind} snapshot, not a MySQL base")
    return snap


def restore(repo: Any, *, snapshot: str | None = None, target: Target | None = None,
            target_db: ConnectionSettings | None = None, target_dir: str | None = None,
            databases: list[str] | None = None, tables: list[str] | None = None,
            users: bool = True, start: bool = False, port: int | None = None,
            owner: str | None = None, kind: str | None = None, host: str | None = None,
            progress: Progress = lambda msg: None) -> RestoreResult:
    if target_db is None and target_dir is None:
        raise UsageError("give --target-db-url (logical) or --target-dir (physical)")
    if target_db is not None and target_dir is not None:
        raise UsageError("give only one of --target-db-url and --target-dir")
    kinds: tuple[str, ...] = (KIND_LOGICAL,) if target_db is not None else (KIND_PHYSICAL,)
    if kind is not None:
        kinds = (kind,)
    if target is not None and (databases or tables):
        raise UsageError("--database/--table restore a base only; point-in-time restore "
                         "replays the whole server")
    if target_dir is not None and (databases or tables):
        raise UsageError("--database/--table apply to logical dumps only")
    if target_dir is not None:
        check_target_dir(Path(target_dir))
        if start:
            check_port(port or 3306)
        if start or target is not None:
            check_reachable(Path(target_dir), server_user(owner))
    if host is None and snapshot not in (None, "latest"):
        host = repo.find_snapshot(snapshot).host  # a named base names its server
    archive = load_archive(repo, host)
    replay_plan: ReplayPlan | None = None
    with tempfile.TemporaryDirectory(prefix="keepwell-binlog-") as spool:
        if target is not None:
            ref = None if snapshot in (None, "latest") else snapshot
            base_id = repo.find_snapshot(ref).id if ref else None
            replay_plan = plan(archive, target, lambda f: spool_binlog(repo, f, spool),
                               base_id=base_id, kinds=kinds)
            snap = repo.find_snapshot(replay_plan.base.snapshot_id)
            progress(f"base {snap.short_id} ({snap.kind}) at {replay_plan.base.position}, "
                     f"replaying {len(replay_plan.files)} binlog(s) to {replay_plan.stop}")
        else:
            snap = _base_snapshot(repo, archive, snapshot, kinds)
        if snap.kind == KIND_LOGICAL and target_db is None:
            raise UsageError(f"snapshot {snap.short_id} is a logical dump: restore it with "
                             "--target-db-url")
        if snap.kind == KIND_PHYSICAL and target_dir is None:
            raise UsageError(f"snapshot {snap.short_id} is a physical backup: restore it with "
                             "--target-dir")
        result = RestoreResult(snapshot=snap.short_id, kind=snap.kind,
                               plan=replay_plan.describe() if replay_plan else None,
                               notes=list(replay_plan.notes) if replay_plan else [])
        own = archive.catalog_of(snap.id)
        if own is not None and len(archive.catalogs) > 1:
            result.notes.append(f"{snap.short_id} is of history {own.history}: "
                                f"{describe_server(own.identity)}")
        for note in result.notes:
            progress(f"note: {note}")
        if snap.kind == KIND_LOGICAL:
            assert target_db is not None
            progress(f"restoring dump {snap.short_id} into {target_db.describe()}")
            restore_logical(repo, snap, target_db, databases=databases, tables=tables,
                            users=users)
            if replay_plan is not None:
                progress("replaying binlogs")
                replay(repo, replay_plan, target_db, spool)
            return result
        assert target_dir is not None
        progress(f"extracting and preparing {snap.short_id} into {target_dir}")
        restore_physical(repo, snap, target_dir, owner=owner)
        if replay_plan is not None and replay_plan.files:
            progress("replaying binlogs through a private server")
            server = LocalServer.start(target_dir, user=owner, private=True,
                                       flavor=flavor_of(snap))
            try:
                replay(repo, replay_plan, server.settings(), spool)
            finally:
                server.stop()
        if start:
            server = LocalServer.start(target_dir, port=port, user=owner,
                                       flavor=flavor_of(snap))
            result.server_pid, result.port = server.pid, port or 3306
        return result


def check(repo: Any, host: str | None = None) -> dict[str, Any]:
    """Binlog continuity from every base to now, and the PITR window, per history."""
    archive = load_archive(repo, host)
    report = archive.report()
    several = len(archive.catalogs) > 1
    problems = list(archive.problems())
    for gap in report["gaps"]:
        problems.append(f"binlogs missing between {gap['after']} and {gap['before']}"
                        + (f" (history {gap['history']})" if several else "") + ": "
                        + ", ".join(gap["missing"]))
    for cat in archive.catalogs:
        for b in cat.bases:
            if b.position is not None and cat.reach(b) is None and cat.files:
                problems.append(f"base {b.short_id} starts in {b.position.file}, which is not "
                                "archived")
    held = {s.id: [str(f.get("name")) for f in (s.source or {}).get("files") or []]
            for c in archive.catalogs for s in c.binlog_snapshots}
    lost = unreadable(repo, [*held, *(b.snapshot_id for b in archive.bases)])
    for sid, paths in sorted(lost.items()):
        names = [p.rsplit("/", 1)[-1] for p in paths if p.startswith("binlog/")] or (
            held.get(sid, []) if any(p.startswith("(its") for p in paths) else [])
        what = (f"binlog(s) {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                if names else "base" if any(b.snapshot_id == sid for b in archive.bases)
                else "its files")
        why = ("damaged (a check found their data corrupt)" if DAMAGED in paths.values()
               else "chunks that no index lists ('keepwell prune' indexes stored packs again)")
        problems.append(f"snapshot {sid[:8]}: {what} cannot be read, {why}: a restore that"
                        " needs them fails")
    report["unreadable"] = {sid[:8]: list(paths) for sid, paths in lost.items()}
    report["problems"] = problems
    report["ok"] = not problems
    return report


def ensure_ok(report: dict[str, Any]) -> None:
    if not report["ok"]:
        raise PartialError(report["problems"][0]
                           + (f" (and {len(report['problems']) - 1} more)"
                              if len(report["problems"]) > 1 else ""),
                           hint="point-in-time restore cannot cross a gap; take a new base")


@dataclass
class ForgetPlan:
    """What ``forget`` drops: bases outside the policy, and the binlog snapshots that hold
    nothing a kept base needs (files before the oldest kept base's binlog, and superseded
    copies of a file that grew)."""

    bases: list[str] = field(default_factory=list)
    binlogs: list[str] = field(default_factory=list)
    kept: dict[str, list[str]] = field(default_factory=dict)
    binlog_floor: str | None = None

    def ids(self) -> list[str]:
        return self.bases + self.binlogs

    def as_dict(self) -> dict[str, Any]:
        return {"bases": self.bases, "binlogs": self.binlogs,
                "keep": [{"id": i, "reasons": why} for i, why in self.kept.items()],
                "binlogs_kept_from": self.binlog_floor}


def forget_plan(repo: Any, policy: Policy, *, host: str | None = None) -> ForgetPlan:
    """Apply ``policy`` to the bases of each kind; keep every binlog from the oldest kept
    base's position on, so each kept base still rolls forward to the end of the archive."""
    if policy.empty():
        raise UsageError("no --keep-* policy given: refusing to forget every base")
    snaps = [s for s in repo.list_snapshots() if s.kind in BASE_KINDS
             and (host is None or s.host == host)]
    archive = load_archive(repo, host)
    verdict = keep_bases(snaps, policy, group_by=lambda s: s.kind)
    binlogs: list[str] = []
    floor = None
    for cat in archive.catalogs:
        kept = [b for b in cat.bases if verdict.keeps(b.snapshot_id)]
        if not kept and cat is not archive.current:
            # an earlier history with no base left: its binlogs roll nothing forward
            binlogs += [s.id for s in cat.binlog_snapshots]
            continue
        binlogs += cat.binlog_snapshots_to_forget(kept)
        if cat is archive.current:
            oldest = oldest_kept(cat.bases, verdict, lambda b: b.position)
            floor = oldest.position.file if oldest is not None else None
    return ForgetPlan(bases=verdict.forget, binlogs=binlogs, kept=verdict.kept,
                      binlog_floor=floor)
