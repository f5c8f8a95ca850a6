"""Point-in-time restore planning: which base backup and which recovery settings reach a target.

Pure logic over a `Catalog`. The rule is pgBackRest's and the documentation's: the newest
*complete* base backup that became consistent before the target, and archived WAL without a gap
from that backup's start up to the target.

A restore point (``--target-name``) has a known position only when it was made through keepwell
(`restorepoint`): then the backup must end before it, and no other point of the same name may
lie between the backup's start and it (recovery stops at the first one it meets). The newest
recorded point of a name is the target. For a name keepwell does not know, the newest complete
backup is used and the plan carries a note saying so.

A target must lie within the WAL the backup reaches without a gap: an LSN or a time past its end
is refused before anything is restored, and so is a restore to the end of the WAL when archived
WAL lies beyond a gap (it would stop at the gap and lose the rest) unless the gap is accepted
(``allow_gap``); the plan then names the gap (`RestorePlan.gap`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from keepwell.errors import UsageError
from keepwell.sources.postgres.catalog import BaseBackup, Catalog, RestorePoint
from keepwell.sources.postgres.errors import RestorePlanError
from keepwell.sources.postgres.walnames import Lsn, parse_segment_name


@dataclass(frozen=True)
class Target:
    """What to recover to: one of time, lsn, xid, name, immediate, or none (end of WAL)."""

    time: datetime | None = None
    lsn: Lsn | None = None
    xid: int | None = None
    name: str | None = None
    immediate: bool = False
    timeline: str | None = None  # "latest", "current" or a number
    exclusive: bool = False

    def kind(self) -> str:
        for kind in ("time", "lsn", "xid", "name"):
            if getattr(self, kind) is not None:
                return kind
        return "immediate" if self.immediate else "end"

    def describe(self) -> str:
        kind = self.kind()
        if kind == "time":
            assert self.time is not None
            return f"time {self.time.isoformat()}"
        if kind in ("lsn", "xid", "name"):
            return f"{kind} {getattr(self, kind)}"
        return "the end of the backup" if kind == "immediate" else "the end of the archived WAL"

    def recovery_settings(self) -> dict[str, str]:
        out: dict[str, str] = {}
        kind = self.kind()
        if kind == "time":
            assert self.time is not None
            out["recovery_target_time"] = self.time.astimezone(UTC).isoformat(sep=" ")
        elif kind == "lsn":
            out["recovery_target_lsn"] = str(self.lsn)
        elif kind == "xid":
            out["recovery_target_xid"] = str(self.xid)
        elif kind == "name":
            out["recovery_target_name"] = str(self.name)
        elif kind == "immediate":
            out["recovery_target"] = "immediate"
        if kind in ("time", "lsn", "xid") and self.exclusive:
            out["recovery_target_inclusive"] = "off"
        if self.timeline:
            out["recovery_target_timeline"] = self.timeline
        return out


def count_targets(target: Target) -> int:
    given = [target.time, target.lsn, target.xid, target.name]
    return sum(v is not None for v in given) + int(target.immediate)


@dataclass(frozen=True)
class RestorePlan:
    backup: BaseBackup
    target: Target
    timeline: int
    wal_end: Lsn
    wal_end_time: datetime | None
    point: RestorePoint | None = None  # the recorded restore point of a --target-name
    note: str | None = None
    gap: tuple[str, str] | None = None  # (first missing segment, last archived after it)


def point_reached(backup: BaseBackup, points: list[RestorePoint]) -> RestorePoint | None:
    """The restore point (of one name, sorted by LSN) recovery from `backup` stops at.

    Recovery meets the first point after the backup's start; if that one lies before the
    backup is consistent, recovery fails, so there is none.
    """
    for p in points:
        if p.lsn >= backup.start_lsn:
            return p if p.lsn >= backup.stop_lsn else None
    return None


def _usable_before(backup: BaseBackup, target: Target,
                   points: list[RestorePoint] | None = None) -> bool:
    kind = target.kind()
    if kind == "name" and points:
        return point_reached(backup, points) is not None
    if kind == "time":
        assert target.time is not None
        return backup.stop_time <= target.time
    if kind == "lsn":
        assert target.lsn is not None
        return backup.stop_lsn <= target.lsn
    if kind == "xid":
        assert target.xid is not None
        return backup.next_xid is not None and backup.next_xid <= target.xid
    return True


def choose(catalog: Catalog, target: Target, snapshot_id: str | None = None, *,
           allow_gap: bool = False) -> RestorePlan:
    if count_targets(target) > 1:
        raise RestorePlanError(
            "give at most one of --target-time, --target-lsn, --target-xid, --target-name,"
            " --immediate"
        )
    timeline = _timeline_number(catalog, target)

    def follows(b: BaseBackup) -> int:  # the timeline recovery from `b` follows
        return b.timeline if timeline is None else timeline

    points = catalog.points_named(target.name) if target.name is not None else []
    if points and timeline is not None:  # recovery meets only the points of its history
        met = [p for p in points if catalog.point_on(p, timeline)]
        if not met:
            shown = points[-1]
            raise RestorePlanError(
                f"restore point {shown.name!r} (timeline {shown.timeline}, LSN {shown.lsn}) is"
                f" not in the history of timeline {timeline}{_fork(catalog, shown.timeline, timeline)}:"
                " recovery following it never reaches the point",
                hint=f"pass --target-timeline {shown.timeline}")
        points = met
    passed: list[BaseBackup] = []  # newer backups the timeline does not descend from
    if snapshot_id == "latest":
        snapshot_id = None
    if snapshot_id is not None:
        ref = snapshot_id.lower()
        if len(ref) < 4 or any(c not in "0123456789abcdef" for c in ref):
            raise UsageError(f"{snapshot_id!r} is not a snapshot id",
                             hint="give 'latest' or at least 4 hex digits of an id")
        chosen = [b for b in catalog.backups if b.snapshot_id.startswith(ref)]
        if not chosen:
            raise RestorePlanError(f"no physical backup {snapshot_id} of cluster {catalog.cluster}")
        if len(chosen) > 1:  # never one of them at random
            raise UsageError(f"snapshot id {snapshot_id} is ambiguous ({len(chosen)} physical"
                             f" backups match: {', '.join(b.short_id for b in chosen)});"
                             " give more digits")
        backup = chosen[0]
        if not catalog.is_complete(backup):
            missing = catalog.reach(backup, backup.timeline).missing
            raise RestorePlanError(
                f"backup {backup.short_id} is incomplete: WAL {missing[0]}"
                f"{' .. ' + missing[-1] if len(missing) > 1 else ''} is not in the repository"
            )
        if not _usable_before(backup, target, points):
            raise RestorePlanError(
                f"backup {backup.short_id} ends after {_describe(target, points, backup)};"
                " choose an older one"
            )
        if not catalog.leads_to(backup, follows(backup)):
            raise RestorePlanError(
                f"backup {backup.short_id} (timeline {backup.timeline}) is not in the history"
                f" of timeline {follows(backup)}{_fork(catalog, backup.timeline, timeline)}:"
                " recovery from it cannot follow that timeline",
                hint=f"pass --target-timeline {backup.timeline} to stay on the backup's"
                     " timeline, or --snapshot a backup that the timeline descends from")
    else:
        if not catalog.backups:
            raise RestorePlanError(f"no physical backup of cluster {catalog.cluster}")
        before = [b for b in catalog.complete_backups() if _usable_before(b, target, points)]
        candidates = [b for b in before if catalog.leads_to(b, follows(b))]
        if not candidates:
            raise RestorePlanError(
                f"no complete physical backup of cluster {catalog.cluster} ends before "
                f"{_describe(target, points)}"
                + (f" on the history of timeline {timeline}" if before else ""),
                hint="see 'keepwell postgres info' for the backups, timelines and restore"
                     " windows" + ("; --target-timeline picks another timeline" if before
                                   else ""))
        if points:  # the newest point any backup reaches, from the newest such backup
            def rank(b: BaseBackup) -> tuple[Lsn, Lsn, datetime]:
                p = point_reached(b, points)
                assert p is not None
                return (p.lsn, b.stop_lsn, b.time)
            backup = max(candidates, key=rank)
        else:
            backup = max(candidates, key=lambda b: (b.stop_lsn, b.time))
        passed = [b for b in before if b not in candidates and b.time > backup.time]
    point = point_reached(backup, points) if points else None
    note = None
    if target.name is not None and not points:
        note = (f"restore point {target.name!r} is not recorded in the repository (made"
                f" without 'keepwell postgres restore-point'), so its position is unknown:"
                f" using backup {backup.short_id}; if the point is older than that backup,"
                f" recovery fails; then pass --snapshot with an older backup")
    elif point is not None and len(points) > 1:
        note = (f"{len(points)} restore points are named {target.name!r} and recovery stops at"
                f" the first one after the backup: this restore reaches the one at LSN"
                f" {point.lsn} ({point.time:%Y-%m-%d %H:%M:%S})")
    elif passed:
        note = (f"newer backup{'s' if len(passed) > 1 else ''}"
                f" {', '.join(b.short_id for b in passed)} (timeline"
                f" {', '.join(sorted({str(b.timeline) for b in passed}))}) not in the history of"
                f" timeline {timeline}: using backup {backup.short_id}; --target-timeline picks"
                " another timeline")
    reach = catalog.reach(backup, follows(backup))
    gap = gap_after(catalog, reach.timeline, reach.end_lsn)
    _check_reach(target, reach.end_lsn, reach.end_time, backup, point, gap)
    if gap is not None and target.kind() == "end" and not allow_gap:
        raise RestorePlanError(
            f"WAL segment {gap[0]} is missing from the archive, which goes on to {gap[1]}: a"
            f" restore to the end would stop at the gap ({reach.end_lsn}"
            f"{', ' + reach.end_time.isoformat() if reach.end_time else ''}) and lose everything"
            " archived after it",
            hint="restore to a point before the gap (--target-time/--target-lsn), or pass"
                 " --allow-gap to accept the loss")
    return RestorePlan(backup, target, reach.timeline, reach.end_lsn, reach.end_time, point,
                       note, gap)


def gap_after(catalog: Catalog, timeline: int, end: Lsn) -> tuple[str, str] | None:
    """(first missing, last archived) when archived WAL on `timeline`'s lineage lies past `end`,
    the end of the gap-free WAL."""
    lineage = catalog.lineage(timeline)
    first = end.segno(catalog.segment_size)
    later = sorted(n for n in list(catalog.wal) + list(catalog.partials)
                   if (p := parse_segment_name(n, catalog.segment_size)) is not None
                   and p[1] > first and catalog.segment_for(p[1], lineage) == n)
    if not later:
        return None
    return catalog.segment_for(first, lineage), later[-1]


def _describe(target: Target, points: list[RestorePoint],
              backup: BaseBackup | None = None) -> str:
    if not points:
        return target.describe()
    shown = points[-1]
    if backup is not None:
        shown = next((p for p in points if p.lsn >= backup.start_lsn), points[-1])
    return f"restore point {shown.name!r} (LSN {shown.lsn})"


def _timeline_number(catalog: Catalog, target: Target) -> int | None:
    """The timeline recovery follows; None for ``current``: each backup's own."""
    if target.timeline in (None, "latest"):
        return catalog.latest_timeline()
    if target.timeline == "current":
        return None
    try:
        number = int(str(target.timeline), 0)
    except ValueError:
        raise RestorePlanError(f"invalid --target-timeline {target.timeline!r}") from None
    if number < 1 or not catalog.known_timeline(number):
        known = sorted(t for t in range(1, catalog.latest_timeline() + 1)
                       if catalog.known_timeline(t))
        raise RestorePlanError(
            f"timeline {target.timeline} is not in the archive of cluster {catalog.cluster}"
            f" (it has timeline{'s' if len(known) > 1 else ''}"
            f" {', '.join(map(str, known))})",
            hint="--target-timeline takes 'latest', 'current' or a timeline the archive holds")
    return number


def _fork(catalog: Catalog, parent: int, timeline: int | None) -> str:
    """Where `timeline`'s history left timeline `parent`, described (or nothing)."""
    for switch in catalog.histories.get(timeline or 0, []):
        if switch.parent == parent:
            return f", which left timeline {parent} at {switch.switch_lsn}"
    return ""


def _check_reach(target: Target, end_lsn: Lsn, end_time: datetime | None,
                 backup: BaseBackup, point: RestorePoint | None = None,
                 gap: tuple[str, str] | None = None) -> None:
    after_gap = (f"; segment {gap[0]} is missing, though the archive goes on to {gap[1]}"
                 if gap else "")
    if point is not None and point.lsn > end_lsn:
        raise RestorePlanError(
            f"{_describe(target, [point])} is past the archived WAL (it ends at {end_lsn} after"
            f" backup {backup.short_id})", hint="wait for archiving, or switch WAL on the server"
        )
    if target.kind() == "lsn":
        assert target.lsn is not None
        if target.lsn > end_lsn:
            raise RestorePlanError(
                f"target LSN {target.lsn} is past the archived WAL (it ends at {end_lsn} after"
                f" backup {backup.short_id}{after_gap})"
            )
    if target.kind() == "time":
        assert target.time is not None
        if end_time is not None and target.time > end_time:
            raise RestorePlanError(
                f"target time {target.time.isoformat()} is past the archived WAL (it ends at"
                f" {end_time.isoformat()}, LSN {end_lsn}, after backup {backup.short_id}"
                f"{after_gap})", hint="wait for archiving (or switch WAL on the server), or"
                " restore to the end of the WAL without a target")
