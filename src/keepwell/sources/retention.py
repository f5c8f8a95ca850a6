"""Retention shared by the database sources: which base backups a ``--keep-*`` policy keeps.

A database source keeps a *point-in-time window*, not just snapshots: a base backup is worth
something together with the log (PostgreSQL WAL, MySQL binlog) that rolls it forward. The
policy itself is the one every ``forget`` takes (`keepwell.repository.policy.Policy`: the newest
N, the newest of each of N hours/days/weeks/months/years, everything within a duration of the
newest, everything tagged), applied to the bases of each kind separately. Two rules are added
for databases:

- *window start*: with ``within``, the newest base older than the window is kept too. The
  window is "any moment of the last D"; its first moment can only be restored from the base
  before it, rolled forward.
- the *log floor*: the source keeps every log file from the oldest kept base's start on (each
  source knows what its positions are; `oldest_kept` names the base).

A group with no base in it keeps nothing and forgets nothing. An empty policy is refused by the
CLI, never taken as "forget everything".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from keepwell.repository.policy import Policy, apply_policy
from keepwell.repository.snapshot import Snapshot

WINDOW_START = "window start"


@dataclass
class BaseRetention:
    """The verdict on every base: kept (with the rules that kept it) or forgotten."""

    kept: dict[str, list[str]] = field(default_factory=dict)
    forget: list[str] = field(default_factory=list)

    def keeps(self, snapshot_id: str) -> bool:
        return snapshot_id in self.kept


def keep_bases(bases: Iterable[Snapshot], policy: Policy,
               group_by: Callable[[Snapshot], object] | None = None) -> BaseRetention:
    """Apply ``policy`` to the base snapshots, per kind unless ``group_by`` says otherwise."""
    key = group_by or (lambda s: s.kind)
    snaps = list(bases)
    kept, removed = apply_policy(snaps, policy, group_by=key)
    out = BaseRetention(kept={s.id: list(why) for s, why in kept})
    if policy.within is not None:
        groups: dict[object, list[Snapshot]] = {}
        for s in snaps:
            groups.setdefault(key(s), []).append(s)
        for members in groups.values():
            newest = max(s.time for s in members)
            older = [s for s in members if newest - s.time > policy.within]
            if older:
                start = max(older, key=lambda s: (s.time, s.id))
                out.kept.setdefault(start.id, []).append(WINDOW_START)
    out.forget = [s.id for s in removed if s.id not in out.kept]
    return out


def oldest_kept(bases: Iterable[Any], retention: BaseRetention,
                position: Callable[[Any], Any]) -> Any | None:
    """The kept base with the lowest log position (``position`` gives it, None for a base
    that needs no log): the one the log floor follows."""
    with_pos = [b for b in bases if retention.keeps(b.snapshot_id) and position(b) is not None]
    return min(with_pos, key=position, default=None)


def policy_of(*, last: int = 0, hourly: int = 0, daily: int = 0, weekly: int = 0,
              monthly: int = 0, yearly: int = 0, within: str | None = None,
              tags: list[str] | None = None) -> Policy:
    """A `Policy` from the ``--keep-*`` options (``within`` as ``7d``, ``2w``, ``1y6m``)."""
    from keepwell.errors import UsageError
    from keepwell.repository.policy import parse_duration

    counts = {"--keep-last": last, "--keep-hourly": hourly, "--keep-daily": daily,
              "--keep-weekly": weekly, "--keep-monthly": monthly, "--keep-yearly": yearly}
    for name, n in counts.items():
        if n < 0:
            raise UsageError(f"{name} must not be negative (got {n})")
    return Policy(last, hourly, daily, weekly, monthly, yearly,
                  parse_duration(within) if within else None, list(tags or []))
