"""Retention: which snapshots a `forget --keep-*` policy keeps, with the reason for each.

The rules are the ones restic users know: within each group (host + paths + kind by default),
snapshots are sorted newest first; ``keep_last`` keeps the n newest; ``keep_hourly`` etc. keep
the newest snapshot of each of the n newest hours/days/weeks/months/years that have one;
``keep_within`` keeps everything newer than a duration before the newest snapshot; ``keep_tags``
keeps every snapshot carrying one of the tags. A snapshot is kept if any rule keeps it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from keepwell.errors import UsageError
from keepwell.repository.snapshot import Snapshot


@dataclass
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: timedelta | None = None
    tags: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.last or self.hourly or self.daily or self.weekly or self.monthly
                    or self.yearly or self.within or self.tags)


def parse_duration(text: str) -> timedelta:
    """'2y5m7d3h' style durations (y=365 days, m=30 days), as restic's --keep-within takes."""
    m = re.fullmatch(r"(?:(\d+)y)?(?:(\d+)m)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?", text.strip())
    if not text.strip() or m is None:
        raise UsageError(f"invalid duration {text!r}", hint="use forms like 7d, 2w, 1y6m, 12h")
    y, mo, w, d, h = (int(g) if g else 0 for g in m.groups())
    return timedelta(days=365 * y + 30 * mo + 7 * w + d, hours=h)


_BUCKETS: list[tuple[str, Callable[[datetime], object]]] = [
    ("hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("daily", lambda t: (t.year, t.month, t.day)),
    ("weekly", lambda t: t.isocalendar()[:2]),
    ("monthly", lambda t: (t.year, t.month)),
    ("yearly", lambda t: t.year),
]


def apply_policy(snapshots: list[Snapshot], policy: Policy,
                 group_by: Callable[[Snapshot], object] | None = None
                 ) -> tuple[list[tuple[Snapshot, list[str]]], list[Snapshot]]:
    """Return (kept with reasons, removed). An empty policy keeps everything."""
    if policy.empty():
        return [(s, ["no policy"]) for s in snapshots], []
    key = group_by or (lambda s: (s.host, tuple(sorted(s.paths)), s.kind))
    groups: dict[object, list[Snapshot]] = {}
    for s in snapshots:
        groups.setdefault(key(s), []).append(s)
    kept: list[tuple[Snapshot, list[str]]] = []
    removed: list[Snapshot] = []
    for members in groups.values():
        members = sorted(members, key=lambda s: s.time, reverse=True)
        reasons: dict[str, list[str]] = {s.id: [] for s in members}
        for i, s in enumerate(members):
            if i < policy.last:
                reasons[s.id].append("last")
        for name, bucket in _BUCKETS:
            budget = getattr(policy, name)
            seen: set[object] = set()
            for s in members:
                if len(seen) >= budget:
                    break
                b = bucket(s.time.astimezone())
                if b not in seen:
                    seen.add(b)
                    reasons[s.id].append(name)
        if policy.within is not None and members:
            newest = members[0].time
            for s in members:
                if newest - s.time <= policy.within:
                    reasons[s.id].append("within")
        if policy.tags:
            for s in members:
                if set(policy.tags) & set(s.tags):
                    reasons[s.id].append("tag")
        for s in members:
            if reasons[s.id]:
                kept.append((s, reasons[s.id]))
            else:
                removed.append(s)
    return kept, removed
