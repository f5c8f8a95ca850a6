"""What the repository holds for one cluster: base backups, WAL files, timelines, windows.

Built from snapshot records alone (their ``source`` dicts), never from file contents, so it is
cheap: `Catalog.build` is the one place that interprets the ``source`` fields written by
`physical`, `logical` and `archive`. Everything here is plain data and pure functions.

A base backup is *complete* when every segment from its start to its stop LSN is archived.
The *reach* of a complete backup is the last WAL position it can be rolled forward to without a
gap, following timeline switches as recovery does (newest timeline first).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from keepwell.sources.postgres import KIND_LOGICAL, KIND_PHYSICAL, KIND_RESTORE_POINT, KIND_WAL
from keepwell.sources.postgres.walnames import (
    DEFAULT_SEGMENT_SIZE,
    Lsn,
    TimelineSwitch,
    parse_history,
    parse_segment_name,
    segment_name,
    timeline_of,
    wal_kind,
)


@dataclass(frozen=True)
class WalFile:
    name: str
    snapshot_id: str
    path: str
    digest: str
    size: int
    mtime: datetime | None


@dataclass(frozen=True)
class BaseBackup:
    snapshot_id: str
    short_id: str
    time: datetime
    timeline: int
    start_lsn: Lsn
    stop_lsn: Lsn
    start_time: datetime
    stop_time: datetime
    segment_size: int
    next_xid: int | None
    version: str
    from_standby: bool
    tablespaces: dict[str, dict[str, str]]  # oid -> {name, location}
    tags: tuple[str, ...] = ()

    def start_segno(self) -> int:
        return self.start_lsn.segno(self.segment_size)

    def stop_segno(self) -> int:
        # The stop LSN points just past the last record; a stop exactly on a boundary needs
        # nothing from the next segment.
        return max(self.start_segno(), (self.stop_lsn.value - 1) // self.segment_size)


@dataclass(frozen=True)
class LogicalBackup:
    snapshot_id: str
    short_id: str
    time: datetime
    databases: list[str]
    globals_included: bool
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class RestorePoint:
    """A restore point created through keepwell, with where it is in the WAL."""

    snapshot_id: str
    name: str
    lsn: Lsn
    time: datetime
    timeline: int


@dataclass(frozen=True)
class Reach:
    """How far WAL goes on from a base backup without a gap."""

    timeline: int
    last_segment: str | None
    end_lsn: Lsn
    end_time: datetime | None
    missing: list[str]  # segments between start and stop that are not archived


def _dt(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


@dataclass
class Catalog:
    cluster: str
    system_identifier: int | None = None
    segment_size: int = DEFAULT_SEGMENT_SIZE
    wal: dict[str, WalFile] = field(default_factory=dict)
    partials: dict[str, WalFile] = field(default_factory=dict)
    histories: dict[int, list[TimelineSwitch]] = field(default_factory=dict)
    backups: list[BaseBackup] = field(default_factory=list)
    logical: list[LogicalBackup] = field(default_factory=list)
    restore_points: list[RestorePoint] = field(default_factory=list)
    wal_snapshots: dict[str, list[str]] = field(default_factory=dict)  # snapshot id -> names

    @classmethod
    def build(cls, snapshots: Iterable[Any], cluster: str) -> Catalog:
        cat = cls(cluster)
        for snap in sorted(snapshots, key=lambda s: s.time):
            src = snap.source or {}
            if src.get("cluster") != cluster or snap.kind not in (
                KIND_WAL, KIND_PHYSICAL, KIND_LOGICAL, KIND_RESTORE_POINT
            ):
                continue
            if snap.kind == KIND_RESTORE_POINT:
                cat._add_restore_point(snap, src)
                continue
            sysid = src.get("system_identifier")
            if cat.system_identifier is None and sysid:
                cat.system_identifier = int(sysid)
            if src.get("segment_size"):
                cat.segment_size = int(src["segment_size"])
            if snap.kind == KIND_WAL:
                cat._add_wal(snap, src)
            elif snap.kind == KIND_PHYSICAL:
                cat.backups.append(_base_backup(snap, src, cat.segment_size))
            else:
                cat.logical.append(LogicalBackup(
                    snap.id, snap.short_id, snap.time, list(src.get("databases", [])),
                    bool(src.get("globals")), tuple(snap.tags),
                ))
        return cat

    def _add_wal(self, snap: Any, src: dict[str, Any]) -> None:
        names: list[str] = []
        for name, info in (src.get("files") or {}).items():
            wf = WalFile(name, snap.id, str(info.get("path") or f"wal/{name[:8]}/{name}"),
                         str(info.get("hash", "")), int(info.get("size", 0)),
                         _dt(info.get("mtime")))
            names.append(name)
            kind = wal_kind(name)
            if kind == "partial":
                self.partials[name[: -len(".partial")]] = wf
            else:
                self.wal.setdefault(name, wf)
            if kind == "history" and info.get("text") is not None:
                self.histories[timeline_of(name)] = parse_history(str(info["text"]))
        self.wal_snapshots[snap.id] = names

    def _add_restore_point(self, snap: Any, src: dict[str, Any]) -> None:
        try:
            lsn = Lsn.parse(str(src["lsn"]))
        except (KeyError, ValueError):
            return
        self.restore_points.append(RestorePoint(
            snap.id, str(src.get("name", "")), lsn, _dt(src.get("time")) or snap.time,
            int(src.get("timeline", 1)),
        ))

    # --- lookups ---
    def points_named(self, name: str) -> list[RestorePoint]:
        """Recorded restore points called `name`, oldest first."""
        return sorted((p for p in self.restore_points if p.name == name), key=lambda p: p.lsn)

    def find(self, name: str) -> WalFile | None:
        """The archived file for `name`: the whole segment, else its newest partial."""
        return self.wal.get(name) or self.partials.get(name)

    def timelines(self) -> dict[int, tuple[int, int]]:
        """Per timeline, the lowest and highest archived segment numbers."""
        out: dict[int, tuple[int, int]] = {}
        for name in list(self.wal) + list(self.partials):
            parsed = parse_segment_name(name, self.segment_size)
            if parsed is None:
                continue
            tli, segno = parsed
            lo, hi = out.get(tli, (segno, segno))
            out[tli] = (min(lo, segno), max(hi, segno))
        return out

    def latest_timeline(self) -> int:
        tls = set(self.timelines()) | set(self.histories) | {b.timeline for b in self.backups}
        return max(tls) if tls else 1

    def lineage(self, timeline: int) -> list[tuple[int, int]]:
        """[(timeline, first segment number it serves)], newest first, as recovery reads WAL."""
        switches = self.histories.get(timeline, [])
        out = [(timeline, switches[-1].switch_lsn.segno(self.segment_size) if switches else 0)]
        for i in range(len(switches) - 1, -1, -1):
            begin = switches[i - 1].switch_lsn.segno(self.segment_size) if i > 0 else 0
            out.append((switches[i].parent, begin))
        return out

    def known_timeline(self, timeline: int) -> bool:
        """Whether the archive knows `timeline`: timeline 1, a history file, a backup or WAL."""
        return (timeline == 1 or timeline in self.histories or timeline in self.timelines()
                or any(b.timeline == timeline for b in self.backups))

    def leads_to(self, backup: BaseBackup, timeline: int) -> bool:
        """Whether recovery from `backup` can follow `timeline`: the backup's timeline is in its
        history, and that history left the backup's timeline only after the backup ended
        (PostgreSQL refuses a timeline that is "not a child of this server's history")."""
        if backup.timeline == timeline:
            return True
        for switch in self.histories.get(timeline, []):
            if switch.parent == backup.timeline:
                return backup.stop_lsn <= switch.switch_lsn
        return False

    def point_on(self, point: RestorePoint, timeline: int) -> bool:
        """Whether recovery following `timeline` meets `point`: on that timeline, or on one of
        its history before the history left it."""
        if point.timeline == timeline:
            return True
        for switch in self.histories.get(timeline, []):
            if switch.parent == point.timeline:
                return point.lsn < switch.switch_lsn
        return False

    def segment_for(self, segno: int, lineage: list[tuple[int, int]]) -> str:
        for tli, begin in lineage:
            if segno >= begin:
                return segment_name(tli, segno, self.segment_size)
        return segment_name(lineage[-1][0], segno, self.segment_size)

    def reach(self, backup: BaseBackup, timeline: int | None = None) -> Reach:
        tli = timeline or self.latest_timeline()
        lineage = self.lineage(tli)
        if not self.leads_to(backup, tli):  # recovery cannot follow it: the backup's own
            lineage = self.lineage(backup.timeline)
            tli = backup.timeline
        missing = [
            self.segment_for(s, lineage)
            for s in range(backup.start_segno(), backup.stop_segno() + 1)
            if self.segment_for(s, lineage) not in self.wal
        ]
        segno = backup.start_segno()
        last: WalFile | None = None
        last_name: str | None = None
        while True:
            name = self.segment_for(segno, lineage)
            wf = self.wal.get(name)
            if wf is None:
                partial = self.partials.get(name)
                if partial is not None:
                    last, last_name = partial, name
                    segno += 1
                break
            last, last_name = wf, name
            segno += 1
        end_lsn = Lsn(segno * self.segment_size) if last_name else backup.start_lsn
        end_time = last.mtime if last is not None else None
        if end_time is not None and end_time < backup.stop_time:
            end_time = backup.stop_time
        return Reach(tli, last_name, end_lsn, end_time, missing)

    def is_complete(self, backup: BaseBackup) -> bool:
        return not self.reach(backup, backup.timeline).missing

    def complete_backups(self) -> list[BaseBackup]:
        return [b for b in self.backups if self.is_complete(b)]

    def gaps(self) -> list[tuple[int, str, str]]:
        """(timeline, first missing, last missing) runs inside each timeline's archived range."""
        out: list[tuple[int, str, str]] = []
        present: dict[int, set[int]] = {}
        for name in list(self.wal) + list(self.partials):
            parsed = parse_segment_name(name, self.segment_size)
            if parsed is not None:
                present.setdefault(parsed[0], set()).add(parsed[1])
        for tli, segs in sorted(present.items()):
            run_start: int | None = None
            for s in range(min(segs), max(segs) + 2):
                if s not in segs and s <= max(segs):
                    if run_start is None:
                        run_start = s
                elif run_start is not None:
                    out.append((tli, segment_name(tli, run_start, self.segment_size),
                                segment_name(tli, s - 1, self.segment_size)))
                    run_start = None
        return out

    def needed_segment_floor(self, kept: Iterable[BaseBackup]) -> int | None:
        """The lowest segment number any kept base backup needs (None: keep all WAL)."""
        starts = [b.start_segno() for b in kept]
        return min(starts) if starts else None


def _base_backup(snap: Any, src: dict[str, Any], default_segsize: int) -> BaseBackup:
    start_time = _dt(src.get("start_time")) or snap.time
    return BaseBackup(
        snapshot_id=snap.id,
        short_id=snap.short_id,
        time=snap.time,
        timeline=int(src.get("timeline", 1)),
        start_lsn=Lsn.parse(str(src.get("start_lsn", "0/0"))),
        stop_lsn=Lsn.parse(str(src.get("stop_lsn", "0/0"))),
        start_time=start_time,
        stop_time=_dt(src.get("stop_time")) or snap.time,
        segment_size=int(src.get("segment_size") or default_segsize),
        next_xid=int(src["next_xid"]) if src.get("next_xid") is not None else None,
        version=str(src.get("version", "")),
        from_standby=bool(src.get("from_standby")),
        tablespaces={
            str(k): {"name": str(v.get("name", k)), "location": str(v.get("location", ""))}
            for k, v in (src.get("tablespaces") or {}).items() if isinstance(v, dict)
        },
        tags=tuple(snap.tags),
    )
