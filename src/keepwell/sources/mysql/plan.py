"""Planning a point-in-time restore: where to stop, which base, which binlogs to replay.

A *target* is a time, a binlog position (``FILE:OFFSET``) or a GTID. `stop_position` turns it
into the exact `BinlogPosition` replay must stop before: the start of the first transaction that
must not be applied. Times are inclusive at the binlog's one-second resolution (a transaction
written in second S is applied for any target at or after S); a GTID target includes that
transaction; a position target stops before the event at that offset.

`plan` then picks the newest base consistent at or before the stop position whose binlogs are
archived without a gap up to it, and names the files and offsets to replay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from keepwell.errors import SourceError, UsageError
from keepwell.sources.mysql.binlog import BinlogPosition, BinlogScan, gtid_key, scan_path
from keepwell.sources.mysql.catalog import Base, BinlogFile, Catalog, iso

Fetch = Callable[[BinlogFile], str]  # a local path holding the file's archived bytes


@dataclass(frozen=True)
class Target:
    time: datetime | None = None
    position: BinlogPosition | None = None
    gtid: str | None = None

    @classmethod
    def of(cls, time: datetime | None, position: str | None, gtid: str | None) -> Target | None:
        given = [x for x in (time, position, gtid) if x is not None]
        if len(given) > 1:
            raise UsageError("give only one of --target-time, --target-position, --target-gtid")
        if not given:
            return None
        try:
            if position is not None:
                return cls(position=BinlogPosition.parse(position))
            if gtid is not None:
                gtid_key(gtid)  # validates
                return cls(gtid=gtid)
        except SourceError as exc:
            raise UsageError(str(exc)) from None
        return cls(time=time)

    def describe(self) -> str:
        if self.time is not None:
            return f"time {self.time.isoformat()}"
        if self.position is not None:
            return f"position {self.position}"
        return f"GTID {self.gtid}"


@dataclass
class ReplayPlan:
    base: Base
    stop: BinlogPosition | None
    files: list[BinlogFile] = field(default_factory=list)
    start_offset: int = 4
    stop_offset: int | None = None

    def describe(self) -> dict[str, object]:
        return {
            "base": self.base.short_id,
            "base_kind": self.base.kind,
            "base_position": str(self.base.position) if self.base.position else None,
            "stop": str(self.stop) if self.stop else None,
            "binlogs": [f.name for f in self.files],
        }


def _scan(cat: Catalog, f: BinlogFile, fetch: Fetch) -> BinlogScan:
    return scan_path(fetch(f), f.name, keep_transactions=True)


def stop_position(cat: Catalog, target: Target, fetch: Fetch) -> BinlogPosition:
    files = cat.ordered()
    if not files:
        raise SourceError("no binlogs are archived for this server",
                          hint="run 'keepwell mysql binlog-stream' or 'binlog-push'")
    if target.position is not None:
        pos = target.position
        f = cat.files.get(pos.file)
        if f is None:
            raise SourceError(f"binlog {pos.file} is not archived")
        if pos.offset > f.size:
            raise SourceError(f"{pos} is beyond the archived end of {pos.file} ({f.size} bytes)")
        return pos
    if target.gtid is not None:
        key, seq = gtid_key(target.gtid)
        for f in files:
            rng = f.gtids.get(key)
            if not rng or not (gtid_key(rng[0])[1] <= seq <= gtid_key(rng[1])[1]):
                continue
            s = _scan(cat, f, fetch)
            for i, t in enumerate(s.transactions):
                if t.gtid == target.gtid or (t.gtid and gtid_key(t.gtid) == (key, seq)):
                    if i + 1 < len(s.transactions):
                        return BinlogPosition(f.seq, s.transactions[i + 1].pos, f.name)
                    return BinlogPosition(f.seq, s.end, f.name)
        raise SourceError(f"GTID {target.gtid} is not in the archived binlogs")
    assert target.time is not None
    ts = target.time.timestamp()
    synced = cat.synced_at or 0
    if ts > synced:
        raise SourceError(f"the binlog archive reaches only {iso(synced)}; the target "
                          f"{target.time.isoformat()} is later",
                          hint="keep binlog-stream running, or run binlog-push, then retry")
    candidates = [f for f in files if f.first_time is not None and f.first_time <= ts]
    if not candidates:
        return BinlogPosition(files[0].seq, 4, files[0].name)
    f = candidates[-1]
    s = _scan(cat, f, fetch)
    for t in s.transactions:
        if t.time > ts:
            return BinlogPosition(f.seq, t.pos, f.name)
    return BinlogPosition(f.seq, s.end, f.name)


def plan(cat: Catalog, target: Target, fetch: Fetch, *, base_id: str | None = None,
         kinds: tuple[str, ...] | None = None) -> ReplayPlan:
    stop = stop_position(cat, target, fetch)
    candidates = [b for b in cat.bases if b.position is not None and b.position <= stop
                  and (kinds is None or b.kind in kinds)
                  and (base_id is None or b.snapshot_id.startswith(base_id))]
    candidates.sort(key=lambda b: (b.position, b.time))  # type: ignore[arg-type,return-value]
    for base in reversed(candidates):
        assert base.position is not None
        chain = cat.chain(base.position, stop)
        if chain is None:
            continue
        last = chain[-1]
        stop_offset = None if stop.offset >= last.size else stop.offset
        return ReplayPlan(base=base, stop=stop, files=chain, start_offset=base.position.offset,
                          stop_offset=stop_offset)
    if base_id is not None:
        raise SourceError(f"snapshot {base_id} cannot reach {target.describe()} (it is later, "
                          "or a binlog between them is missing)")
    gaps = cat.gaps()
    hint = (f"binlogs missing: {', '.join(gaps[0]['missing'][:3])}" if gaps
            else "take a base backup before the target")
    raise SourceError(f"no base backup can reach {target.describe()} (stop at {stop})", hint=hint)
