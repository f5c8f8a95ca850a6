"""Retention: which snapshots a keep policy keeps, and why. The one policy engine of keepwell.

Every ``forget`` (files, PostgreSQL, MySQL) and the daemon's retention decide here. The rules are
restic's; a snapshot is kept when any rule keeps it, and it lists every rule that did:

- ``last`` N: the N newest.
- ``hourly``, ``daily``, ``weekly``, ``monthly``, ``yearly`` N: walking from the newest, the
  newest snapshot of each of the N newest hours/days/weeks/months/years that hold one. Buckets
  follow the calendar in local time (``TZ``); weeks are ISO weeks, Monday to Sunday. When fewer
  than N buckets hold a snapshot, the oldest snapshot is kept as well (``oldest daily``), so a
  young history keeps all the past it has.
- ``within`` D: every snapshot not older than D before the *newest snapshot*, not before now: a
  source that stopped backing up keeps its last window however often forget runs. A snapshot
  dated in the future (a clock running ahead) does not count as the newest, and is kept.
- ``within_hourly`` ... ``within_yearly`` D: the newest snapshot of each hour/day/... among those
  within D of the newest (and the oldest of them, as above).
- ``tags``: every snapshot carrying one of the tags.

The rules apply to each group of snapshots on its own; the caller says what a group is
(`source_group`, restic's host + paths + kind, for ``forget``; the kind for database bases).
An empty policy keeps everything (the commands refuse it before: it is never "forget all").
Durations are read by `keepwell.units` with ``retention=True``, so ``6m`` is refused here
rather than read as minutes or months.

Bases that a log rolls forward (PostgreSQL WAL, MySQL binlog) keep a point-in-time *window*, not
just snapshots; `keep_bases` and `oldest_kept` add the two rules their forget plans need:

- *window start*: with ``within``, the newest base older than the window is kept too: the
  window's first moment can only be restored from the base before it, rolled forward.
- the *log floor*: every log file from the oldest kept base's start on is kept; `oldest_kept`
  names that base (each source knows what its log positions are).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from keepwell.errors import UsageError
from keepwell.units import parse_duration

WINDOW_START = "window start"

_CALENDAR: tuple[tuple[str, Callable[[datetime], Hashable]], ...] = (
    ("hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("daily", lambda t: (t.year, t.month, t.day)),
    ("weekly", lambda t: t.isocalendar()[:2]),
    ("monthly", lambda t: (t.year, t.month)),
    ("yearly", lambda t: t.year),
)
_DURATIONS = ("within", *(f"within_{name}" for name, _ in _CALENDAR))


class Dated(Protocol):
    """What the policy looks at: a snapshot record, or an `Item` standing for one."""

    @property
    def id(self) -> str: ...

    @property
    def time(self) -> datetime: ...

    @property
    def tags(self) -> Sequence[str]: ...


T = TypeVar("T", bound=Dated)


@dataclass(frozen=True)
class Item:
    """A snapshot as a source's catalog sees it (a base backup with the time it is usable from)."""

    id: str
    time: datetime
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Policy:
    """The keep rules (see the module's docstring); 0, None and () leave a rule out."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: timedelta | None = None
    within_hourly: timedelta | None = None
    within_daily: timedelta | None = None
    within_weekly: timedelta | None = None
    within_monthly: timedelta | None = None
    within_yearly: timedelta | None = None
    tags: tuple[str, ...] = ()

    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    @classmethod
    def from_options(cls, **options: Any) -> Policy:
        """A policy from the ``keep_*`` options, named as the commands and the configuration
        name them (``keep_last=3``, ``keep_within="7d"``, ``keep_tag=["x"]``; None and 0 mean
        unused). Bad values are one `UsageError` naming the option."""
        known = {f"keep_{f.name}" for f in fields(cls) if f.name != "tags"} | {"keep_tag"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown retention options: {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for name in ("last", *(name for name, _ in _CALENDAR)):
            n = options.get(f"keep_{name}") or 0
            if n < 0:
                raise UsageError(f"--keep-{name} must not be negative (got {n})")
            values[name] = int(n)
        for name in _DURATIONS:
            given = options.get(f"keep_{name}")
            if given == "":  # an empty or unset variable: never "no such rule"
                raise UsageError(f"--keep-{name.replace('_', '-')}: an empty value is no duration",
                                 hint="give a duration such as 7d, or leave the option out")
            if isinstance(given, timedelta) or not given:
                values[name] = given or None
            else:
                values[name] = parse_duration(given, "--keep-" + name.replace("_", "-"),
                                              retention=True)
        tags = tuple(options.get("keep_tag") or ())
        if "" in tags:  # a rule that keeps nothing would let everything else go
            raise UsageError("--keep-tag: an empty tag keeps nothing",
                             hint="give the tag, or leave the option out")
        if any("," in t for t in tags):
            raise UsageError("--keep-tag takes one tag",
                             hint="repeat it to keep snapshots with any of several")
        return cls(**values, tags=tags)


def source_group(snapshot: Any) -> Hashable:
    """restic's default grouping: snapshots of one host, of the same paths, of one kind."""
    return (snapshot.host, tuple(sorted(snapshot.paths)), snapshot.kind)


def _groups(items: Iterable[T], group_by: Callable[[T], Hashable]) -> list[list[T]]:
    """The groups, each sorted newest first."""
    groups: dict[Hashable, list[T]] = {}
    for s in items:
        groups.setdefault(group_by(s), []).append(s)
    return [sorted(members, key=lambda s: (s.time, s.id), reverse=True)
            for members in groups.values()]


def _newest(members: Sequence[Dated], now: datetime | None) -> datetime:
    """The time ``within`` counts back from: the newest snapshot that is not in the future."""
    now = now or datetime.now(UTC)
    return max((s.time for s in members if s.time <= now), default=now)


_UNSET = object()


def _bucket(rule: str, key: Hashable, previous: dict[str, object], oldest: bool) -> str | None:
    """The reason a bucket rule keeps a snapshot: the first (newest) of its bucket, or the
    oldest snapshot of all while the rule has buckets left."""
    new = key != previous.get(rule, _UNSET)
    if not (new or oldest):
        return None
    previous[rule] = key
    return rule if new else f"oldest {rule}"


def _judge(members: Sequence[Dated], policy: Policy, now: datetime | None) -> list[list[str]]:
    """The reasons to keep each of ``members`` (newest first); empty: forget it."""
    newest = _newest(members, now)
    left = {name: getattr(policy, name) for name, _ in _CALENDAR}
    previous: dict[str, object] = {}
    out: list[list[str]] = []
    for i, s in enumerate(members):
        why: list[str] = ["last"] if i < policy.last else []
        oldest = i == len(members) - 1
        local = s.time.astimezone()
        for name, bucket in _CALENDAR:
            if left[name] > 0 and (reason := _bucket(name, bucket(local), previous, oldest)):
                why.append(reason)
                left[name] -= 1
        if policy.within is not None and s.time >= newest - policy.within:
            why.append("within")
        for name, bucket in _CALENDAR:
            span = getattr(policy, f"within_{name}")
            if span is not None and s.time >= newest - span and (
                    reason := _bucket(f"{name} within", bucket(local), previous, oldest)):
                why.append(reason)
        if any(t in s.tags for t in policy.tags):
            why.append("tag")
        out.append(why)
    return out


def apply_policy(items: Iterable[T], policy: Policy, *, group_by: Callable[[T], Hashable],
                 now: datetime | None = None) -> tuple[list[tuple[T, list[str]]], list[T]]:
    """Return (kept with their reasons, forgotten), each group newest first. ``now`` only
    tells which snapshots lie in the future."""
    snaps = list(items)
    if policy.empty():
        return [(s, ["no policy"]) for s in snaps], []
    kept: list[tuple[T, list[str]]] = []
    removed: list[T] = []
    for members in _groups(snaps, group_by):
        for s, why in zip(members, _judge(members, policy, now), strict=True):
            if why:
                kept.append((s, why))
            else:
                removed.append(s)
    return kept, removed


@dataclass
class BaseRetention:
    """The verdict on every base: kept (with the rules that kept it) or forgotten."""

    kept: dict[str, list[str]] = field(default_factory=dict)
    forget: list[str] = field(default_factory=list)

    def keeps(self, snapshot_id: str) -> bool:
        return snapshot_id in self.kept


def keep_bases(bases: Iterable[T], policy: Policy, *, group_by: Callable[[T], Hashable],
               now: datetime | None = None) -> BaseRetention:
    """`apply_policy` to bases that a log rolls forward, plus the base the window starts from."""
    snaps = list(bases)
    kept, removed = apply_policy(snaps, policy, group_by=group_by, now=now)
    out = BaseRetention(kept={s.id: list(why) for s, why in kept})
    if policy.within is not None:
        for members in _groups(snaps, group_by):
            start = _newest(members, now) - policy.within
            before = next((s for s in members if s.time < start), None)
            if before is not None:
                out.kept.setdefault(before.id, []).append(WINDOW_START)
    out.forget = [s.id for s in removed if s.id not in out.kept]
    return out


def oldest_kept(bases: Iterable[Any], retention: BaseRetention,
                position: Callable[[Any], Any]) -> Any | None:
    """The kept base with the lowest log position (``position`` gives it, None for a base
    that needs no log): the one the log floor follows."""
    with_pos = [b for b in bases if retention.keeps(b.snapshot_id) and position(b) is not None]
    return min(with_pos, key=position, default=None)
