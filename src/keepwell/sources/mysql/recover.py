"""The use cases behind ``keepwell mysql restore/check/info/forget``.

`restore` chooses what to restore (a named snapshot, the latest base, or the base a
point-in-time `plan.Target` needs), restores it (logical into a running server, physical into a
datadir) and replays the archived binlogs up to the target. A physical restore with a target is
replayed through a private server started on the new datadir (socket only, no grant checks),
which is then stopped, or kept running on ``port`` when ``start`` is asked.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keepwell.errors import PartialError, SourceError, UsageError
from keepwell.repository.policy import Policy
from keepwell.sources.mysql import BASE_KINDS, KIND_LOGICAL, KIND_PHYSICAL
from keepwell.sources.mysql.archive import load_catalog
from keepwell.sources.mysql.catalog import Catalog
from keepwell.sources.mysql.connection import ConnectionSettings
from keepwell.sources.mysql.plan import ReplayPlan, Target, plan
from keepwell.sources.mysql.restore import (
    LocalServer,
    flavor_of,
    replay,
    restore_logical,
    restore_physical,
    spool_binlog,
)
from keepwell.sources.retention import keep_bases, oldest_kept

Progress = Callable[[str], None]


@dataclass
class RestoreResult:
    snapshot: str
    kind: str
    plan: dict[str, Any] | None = None
    server_pid: int | None = None
    port: int | None = None
    notes: list[str] = field(default_factory=list)


def _base_snapshot(repo: Any, ref: str | None, kinds: tuple[str, ...], host: str | None) -> Any:
    if ref is None or ref == "latest":
        snaps = [s for s in repo.list_snapshots() if s.kind in kinds
                 and (host is None or s.host == host)]
        if not snaps:
            raise SourceError("no MySQL/MariaDB base backup in this repository",
                              hint="take one with 'keepwell mysql backup'")
        return snaps[-1]
    snap = repo.find_snapshot(ref)
    if snap.kind not in BASE_KINDS:
        raise UsageError(f"snapshot {snap.short_id} is a {snap.kind} snapshot, not a MySQL base")
    return snap


def restore(repo: Any, *, snapshot: str | None = None, target: Target | None = None,
            target_db: ConnectionSettings | None = None, target_dir: str | None = None,
            database: str | None = None, table: str | None = None, users: bool = True,
            start: bool = False, port: int | None = None, owner: str | None = None,
            kind: str | None = None, host: str | None = None,
            progress: Progress = lambda msg: None) -> RestoreResult:
    if target_db is None and target_dir is None:
        raise UsageError("give --target-db-url (logical) or --target-dir (physical)")
    if target_db is not None and target_dir is not None:
        raise UsageError("give only one of --target-db-url and --target-dir")
    kinds: tuple[str, ...] = (KIND_LOGICAL,) if target_db is not None else (KIND_PHYSICAL,)
    if kind is not None:
        kinds = (kind,)
    if target is not None and (database or table):
        raise UsageError("--database/--table restore a base only; point-in-time restore "
                         "replays the whole server")
    replay_plan: ReplayPlan | None = None
    with tempfile.TemporaryDirectory(prefix="keepwell-binlog-") as spool:
        if target is not None:
            cat = load_catalog(repo, host)
            ref = None if snapshot in (None, "latest") else snapshot
            base_id = repo.find_snapshot(ref).id if ref else None
            replay_plan = plan(cat, target, lambda f: spool_binlog(repo, f, spool),
                               base_id=base_id, kinds=kinds)
            snap = repo.find_snapshot(replay_plan.base.snapshot_id)
            progress(f"base {snap.short_id} ({snap.kind}) at {replay_plan.base.position}, "
                     f"replaying {len(replay_plan.files)} binlog(s) to {replay_plan.stop}")
        else:
            snap = _base_snapshot(repo, snapshot, kinds, host)
        if snap.kind == KIND_LOGICAL and target_db is None:
            raise UsageError(f"snapshot {snap.short_id} is a logical dump: restore it with "
                             "--target-db-url")
        if snap.kind == KIND_PHYSICAL and target_dir is None:
            raise UsageError(f"snapshot {snap.short_id} is a physical backup: restore it with "
                             "--target-dir")
        result = RestoreResult(snapshot=snap.short_id, kind=snap.kind,
                               plan=replay_plan.describe() if replay_plan else None)
        if snap.kind == KIND_LOGICAL:
            assert target_db is not None
            progress(f"restoring dump {snap.short_id} into {target_db.describe()}")
            restore_logical(repo, snap, target_db, database=database, table=table, users=users)
            if replay_plan is not None:
                progress("replaying binlogs")
                replay(repo, replay_plan, target_db, spool)
            return result
        assert target_dir is not None
        if database or table:
            raise UsageError("--database/--table apply to logical dumps only")
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
            result.server_pid, result.port = server.pid, port
        return result


def check(repo: Any, host: str | None = None) -> dict[str, Any]:
    """Binlog continuity from every base to now, and the PITR window."""
    cat = load_catalog(repo, host)
    report = cat.report()
    problems = []
    for gap in report["gaps"]:
        problems.append(f"binlogs missing between {gap['after']} and {gap['before']}: "
                        + ", ".join(gap["missing"]))
    for b in cat.bases:
        if b.position is not None and cat.reach(b) is None and cat.files:
            problems.append(f"base {b.short_id} starts in {b.position.file}, which is not "
                            "archived")
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
    snaps = [s for s in repo.list_snapshots() if s.kind.startswith("mysql-")
             and (host is None or s.host == host)]
    cat: Catalog = load_catalog(repo, host)
    verdict = keep_bases([s for s in snaps if s.kind in BASE_KINDS], policy)
    oldest = oldest_kept(cat.bases, verdict, lambda b: b.position)
    kept = [b for b in cat.bases if verdict.keeps(b.snapshot_id)]
    return ForgetPlan(bases=verdict.forget, binlogs=cat.binlog_snapshots_to_forget(kept),
                      kept=verdict.kept,
                      binlog_floor=oldest.position.file if oldest is not None else None)
