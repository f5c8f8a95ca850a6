"""Point-in-time restore planning: which base backup and which recovery settings reach a target.

Pure logic over a `Catalog`. The rule is pgBackRest's and the documentation's: the newest
*complete* base backup that became consistent before the target, and archived WAL without a gap
from that backup's start up to the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from keepwell.sources.postgres.catalog import BaseBackup, Catalog
from keepwell.sources.postgres.errors import RestorePlanError
from keepwell.sources.postgres.walnames import Lsn


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


def _usable_before(backup: BaseBackup, target: Target) -> bool:
    kind = target.kind()
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


def choose(catalog: Catalog, target: Target, snapshot_id: str | None = None) -> RestorePlan:
    if count_targets(target) > 1:
        raise RestorePlanError(
            "give at most one of --target-time, --target-lsn, --target-xid, --target-name,"
            " --immediate"
        )
    timeline = _timeline_number(catalog, target)
    if snapshot_id is not None:
        chosen = [b for b in catalog.backups if b.snapshot_id.startswith(snapshot_id)
                  or b.short_id == snapshot_id]
        if not chosen:
            raise RestorePlanError(f"no physical backup {snapshot_id} of cluster {catalog.cluster}")
        backup = chosen[-1]
        if not catalog.is_complete(backup):
            missing = catalog.reach(backup, backup.timeline).missing
            raise RestorePlanError(
                f"backup {backup.short_id} is incomplete: WAL {missing[0]}"
                f"{' .. ' + missing[-1] if len(missing) > 1 else ''} is not in the repository"
            )
        if not _usable_before(backup, target):
            raise RestorePlanError(
                f"backup {backup.short_id} ends after {target.describe()}; choose an older one"
            )
    else:
        if not catalog.backups:
            raise RestorePlanError(f"no physical backup of cluster {catalog.cluster}")
        candidates = [b for b in catalog.complete_backups() if _usable_before(b, target)]
        if not candidates:
            raise RestorePlanError(
                f"no complete physical backup of cluster {catalog.cluster} ends before "
                f"{target.describe()}"
            )
        backup = max(candidates, key=lambda b: (b.stop_lsn, b.time))
    reach = catalog.reach(backup, timeline)
    _check_reach(target, reach.end_lsn, reach.end_time, backup)
    return RestorePlan(backup, target, reach.timeline, reach.end_lsn, reach.end_time)


def _timeline_number(catalog: Catalog, target: Target) -> int | None:
    if target.timeline in (None, "latest"):
        return catalog.latest_timeline()
    if target.timeline == "current":
        return None
    try:
        return int(str(target.timeline), 0)
    except ValueError:
        raise RestorePlanError(f"invalid --target-timeline {target.timeline!r}") from None


def _check_reach(target: Target, end_lsn: Lsn, end_time: datetime | None,
                 backup: BaseBackup) -> None:
    if target.kind() == "lsn":
        assert target.lsn is not None
        if target.lsn > end_lsn:
            raise RestorePlanError(
                f"target LSN {target.lsn} is past the archived WAL (it ends at {end_lsn} after"
                f" backup {backup.short_id})"
            )
