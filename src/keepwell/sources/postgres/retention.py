"""Retention for PostgreSQL snapshots: forget backups by policy, and WAL nobody needs anymore.

The keep policy is the one every ``forget`` takes (`keepwell.repository.retention`), applied to
the complete base backups (dated by their stop time, from which they restore) and, separately,
to the logical dumps. A base backup is worth something with the WAL that rolls it forward, so
base backups also keep the *window start* (with ``within``: the newest base older than the
window, from which the window's first moment is restored), and an incomplete base backup is
kept while it is the newest (its WAL may still be arriving); it never counts toward the policy.
A dump rolls nothing forward: it is kept by the policy alone. WAL snapshots are forgotten only
when every file in them lies before the start of the oldest kept base backup (the *WAL floor*);
history files are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from keepwell.errors import UsageError
from keepwell.repository.retention import Item, Policy, apply_policy, keep_bases
from keepwell.sources.postgres.catalog import Catalog
from keepwell.sources.postgres.walnames import parse_segment_name, wal_kind

NEWEST_INCOMPLETE = "newest, incomplete"


@dataclass
class ForgetPlan:
    physical: list[str] = field(default_factory=list)
    logical: list[str] = field(default_factory=list)
    wal: list[str] = field(default_factory=list)
    kept_physical: list[str] = field(default_factory=list)
    kept: dict[str, list[str]] = field(default_factory=dict)  # base or dump -> its reasons
    wal_floor: str | None = None

    def ids(self) -> list[str]:
        return self.physical + self.logical + self.wal

    def as_dict(self) -> dict[str, Any]:
        return {"forget_physical": [i[:8] for i in self.physical],
                "forget_logical": [i[:8] for i in self.logical],
                "forget_wal_snapshots": len(self.wal),
                "kept_physical": [i[:8] for i in self.kept_physical],
                "keep": [{"id": i, "reasons": why} for i, why in self.kept.items()],
                "wal_kept_from": self.wal_floor}


def plan_forget(cat: Catalog, policy: Policy, *, now: datetime | None = None) -> ForgetPlan:
    """What ``forget`` drops under ``policy``; ``now`` only tells which backups lie in the
    future (see `keepwell.repository.retention`)."""
    if policy.empty():
        raise UsageError("no --keep-* policy given: refusing to forget every backup")
    plan = ForgetPlan()
    complete = {b.snapshot_id for b in cat.complete_backups()}
    verdict = keep_bases([Item(b.snapshot_id, b.stop_time, b.tags) for b in cat.backups
                          if b.snapshot_id in complete], policy, group_by=lambda _: None, now=now)
    newest = max(cat.backups, key=lambda b: b.time, default=None)
    if newest is not None and newest.snapshot_id not in complete:
        verdict.kept[newest.snapshot_id] = [NEWEST_INCOMPLETE]
    for b in cat.backups:
        if verdict.keeps(b.snapshot_id):
            plan.kept_physical.append(b.snapshot_id)
            plan.kept[b.snapshot_id] = verdict.kept[b.snapshot_id]
        else:
            plan.physical.append(b.snapshot_id)
    dumps, forgotten = apply_policy([Item(d.snapshot_id, d.time, d.tags) for d in cat.logical],
                                    policy, group_by=lambda _: None, now=now)
    plan.kept.update((d.id, why) for d, why in dumps)
    gone = {d.id for d in forgotten}
    plan.logical = [d.snapshot_id for d in cat.logical if d.snapshot_id in gone]
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
