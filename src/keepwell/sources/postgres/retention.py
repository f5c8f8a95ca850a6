"""Retention for PostgreSQL snapshots: forget backups by policy, and WAL nobody needs anymore.

Base backups and logical dumps are kept by ``keep_last`` and ``keep_within``; keeping a PITR
window of ``keep_within`` also keeps the newest base backup older than the window (the base that
restores to its first second). WAL snapshots are forgotten only when every file in them lies
before the start of the oldest kept base backup; history files are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from keepwell.sources.postgres.catalog import Catalog
from keepwell.sources.postgres.walnames import parse_segment_name, wal_kind


@dataclass
class ForgetPlan:
    physical: list[str] = field(default_factory=list)
    logical: list[str] = field(default_factory=list)
    wal: list[str] = field(default_factory=list)
    kept_physical: list[str] = field(default_factory=list)
    wal_floor: str | None = None

    def ids(self) -> list[str]:
        return self.physical + self.logical + self.wal

    def as_dict(self) -> dict[str, Any]:
        return {"forget_physical": [i[:8] for i in self.physical],
                "forget_logical": [i[:8] for i in self.logical],
                "forget_wal_snapshots": len(self.wal),
                "kept_physical": [i[:8] for i in self.kept_physical],
                "wal_kept_from": self.wal_floor}


def _keep(items: list[tuple[str, datetime]], keep_last: int | None,
          keep_within: timedelta | None, now: datetime) -> set[str]:
    ordered = sorted(items, key=lambda x: x[1])
    keep: set[str] = set()
    if keep_last:
        keep.update(i for i, _ in ordered[-keep_last:])
    if keep_within is not None:
        cutoff = now - keep_within
        inside = [i for i, t in ordered if t >= cutoff]
        keep.update(inside)
        older = [i for i, t in ordered if t < cutoff]
        if older:
            keep.add(older[-1])
    if keep_last is None and keep_within is None:
        keep.update(i for i, _ in ordered)
    return keep


def plan_forget(cat: Catalog, *, keep_last: int | None, keep_within: timedelta | None,
                now: datetime | None = None) -> ForgetPlan:
    now = now or datetime.now(UTC)
    plan = ForgetPlan()
    complete = {b.snapshot_id for b in cat.complete_backups()}
    # Count only complete backups toward the policy: an incomplete one cannot restore anything.
    keep_phys = _keep([(b.snapshot_id, b.stop_time) for b in cat.backups
                       if b.snapshot_id in complete], keep_last, keep_within, now)
    newest = max(cat.backups, key=lambda b: b.time, default=None)
    for b in cat.backups:
        if b.snapshot_id in keep_phys or (b.snapshot_id not in complete and b is newest):
            plan.kept_physical.append(b.snapshot_id)
        else:
            plan.physical.append(b.snapshot_id)
    keep_log = _keep([(lb.snapshot_id, lb.time) for lb in cat.logical], keep_last, keep_within,
                     now)
    plan.logical = [lb.snapshot_id for lb in cat.logical if lb.snapshot_id not in keep_log]
    kept = [b for b in cat.backups if b.snapshot_id in plan.kept_physical]
    floor = cat.needed_segment_floor(kept)
    if floor is None:
        return plan  # no base backup left: keep the WAL, it is all there is
    plan.wal_floor = hex(floor)
    for sid, names in cat.wal_snapshots.items():
        if all(_before(n, floor, cat.segment_size) for n in names):
            plan.wal.append(sid)
    return plan


def _before(name: str, floor: int, segment_size: int) -> bool:
    kind = wal_kind(name)
    if kind == "history":
        return False
    base = name[:24]
    parsed = parse_segment_name(base, segment_size)
    return parsed is not None and parsed[1] < floor
