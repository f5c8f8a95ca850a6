"""Planning a point-in-time restore: where to stop, which base, which binlogs to replay.

A *target* is a time, a binlog position (``FILE:OFFSET``) or a GTID. `stop_position` turns it
into the exact `BinlogPosition` replay must stop before: the start of the first transaction that
must not be applied. Times are inclusive at the binlog's one-second resolution (a transaction
written in second S is applied for any target at or after S); a GTID target includes that
transaction; a position target stops before the event at that offset.

`plan` then picks the newest base consistent at or before the stop position whose binlogs are
archived without a gap up to it, and names the files and offsets to replay. It plans within one
history of the server name (`catalog.ServerArchive`): binlog names and positions of two histories
are unrelated, so a plan never takes a base from one and binlogs from another. When the target
can be reached in more than one history, it refuses and asks for ``--snapshot``. Before it
takes a MariaDB base, it checks that the GTID the base recorded is the GTID state of the
archived binlog at the base's position (`gtid_state_at`): a base whose GTID does not match was
taken on another server, and is passed over with a note.

A time target names a second of the binlog's clock: when it has a fraction of a second, the
plan says (`ReplayPlan.notes`) that the whole second is replayed, and which transaction is the
last one applied, so the user can stop exactly with ``--target-gtid``/``--target-position``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from keepwell.errors import SourceError, UsageError
from keepwell.sources.mysql.binlog import (
    BinlogPosition,
    BinlogScan,
    Transaction,
    gtid_key,
    parse_gtid,
    scan_path,
)
from keepwell.sources.mysql.catalog import Base, BinlogFile, Catalog, ServerArchive, iso
from keepwell.sources.mysql.identity import describe_server

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


@dataclass(frozen=True)
class Stop:
    """Where replay stops, and the last transaction it applies (when a scan found it)."""

    position: BinlogPosition
    last: Transaction | None = None
    last_at: BinlogPosition | None = None
    same_second: int = 0  # transactions of the target's second that are applied


@dataclass
class ReplayPlan:
    base: Base
    stop: BinlogPosition | None
    files: list[BinlogFile] = field(default_factory=list)
    start_offset: int = 4
    stop_offset: int | None = None
    history: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, object]:
        return {
            "base": self.base.short_id,
            "base_kind": self.base.kind,
            "base_position": str(self.base.position) if self.base.position else None,
            "stop": str(self.stop) if self.stop else None,
            "binlogs": [f.name for f in self.files],
            "history": self.history,
            "notes": self.notes,
        }


class Scans:
    """Scans of archived binlog files (with their transactions), each file read once."""

    def __init__(self, fetch: Fetch) -> None:
        self.fetch = fetch
        self.done: dict[tuple[str, str], BinlogScan] = {}

    def __call__(self, f: BinlogFile) -> BinlogScan:
        key = (f.history, f.name)
        if key not in self.done:
            self.done[key] = scan_path(self.fetch(f), f.name, keep_transactions=True)
        return self.done[key]


def _exact(a: str | None, b: str) -> bool:
    """The same transaction: MariaDB GTIDs must agree on domain, server and sequence (a
    domain's number taken by another server is another, diverged transaction)."""
    if a is None:
        return False
    if ":" in b:
        return gtid_key(a) == gtid_key(b)
    return ":" not in a and parse_gtid(a) == parse_gtid(b)


def stop_position(cat: Catalog, target: Target, scan: Scans) -> Stop:
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
        return Stop(pos)
    if target.gtid is not None:
        key, seq = gtid_key(target.gtid)
        near: str | None = None
        for f in files:
            rng = f.gtids.get(key)
            if not rng or not (gtid_key(rng[0])[1] <= seq <= gtid_key(rng[1])[1]):
                continue
            s = scan(f)
            for i, t in enumerate(s.transactions):
                if _exact(t.gtid, target.gtid):
                    end = (s.transactions[i + 1].pos if i + 1 < len(s.transactions) else s.end)
                    return Stop(BinlogPosition(f.seq, end, f.name), t,
                                BinlogPosition(f.seq, t.pos, f.name))
                if t.gtid and gtid_key(t.gtid) == (key, seq):
                    near = t.gtid
        if near is not None:
            raise SourceError(f"GTID {target.gtid} is not in the archived binlogs; {near} is "
                              "(same domain and number, written by another server)",
                              hint=f"use --target-gtid {near} if that is the transaction meant")
        raise SourceError(f"GTID {target.gtid} is not in the archived binlogs")
    assert target.time is not None
    ts = target.time.timestamp()
    synced = cat.synced_at or 0
    if ts > synced:
        raise SourceError(f"the binlog archive reaches only {iso(synced)}; the target "
                          f"{target.time.isoformat()} is later",
                          hint="keep binlog-stream running, or run binlog-push "
                               "(--include-current for the file being written), then retry")
    candidates = [f for f in files if f.first_time is not None and f.first_time <= ts]
    if not candidates:
        return Stop(BinlogPosition(files[0].seq, 4, files[0].name))
    f = candidates[-1]
    s = scan(f)
    last: Transaction | None = None
    second = int(ts)
    same = 0
    for t in s.transactions:
        if t.time > ts:
            return Stop(BinlogPosition(f.seq, t.pos, f.name), last,
                        BinlogPosition(f.seq, last.pos, f.name) if last else None, same)
        last = t
        same += t.time == second
    return Stop(BinlogPosition(f.seq, s.end, f.name), last,
                BinlogPosition(f.seq, last.pos, f.name) if last else None, same)


def gtid_state_at(scan: BinlogScan, offset: int) -> dict[int, set[tuple[int, int]]]:
    """The MariaDB GTIDs that may be a domain's last one at ``offset`` of a scanned file: the
    file's GTID list (the state it starts from), or the last transaction of the domain
    before ``offset``."""
    state: dict[int, set[tuple[int, int]]] = {}
    for g in scan.gtid_list:
        d, srv, seq = parse_gtid(g)
        state.setdefault(d, set()).add((srv, seq))
    for t in scan.transactions:
        if t.pos >= offset or t.gtid is None or ":" in t.gtid:
            continue
        d, srv, seq = parse_gtid(t.gtid)
        state[d] = {(srv, seq)}
    return state


def comparable(base: Base) -> bool:
    """A base whose GTID `base_mismatch` can check (MariaDB's; MySQL's sets are not)."""
    return bool(base.gtid) and base.position is not None and ":" not in str(base.gtid)


def base_mismatch(base: Base, scan: BinlogScan) -> str | None:
    """Why a MariaDB base's recorded GTID is not the binlog's state at its position, or None
    (also when there is nothing to compare, see `comparable`)."""
    if not comparable(base):
        return None
    assert base.gtid is not None and base.position is not None
    state = gtid_state_at(scan, base.position.offset)
    for g in base.gtid.split(","):
        try:
            d, srv, seq = parse_gtid(g)
        except SourceError:
            return None
        if (srv, seq) not in state.get(d, set()):
            found = ", ".join(f"{d}-{a}-{b}" for a, b in sorted(state.get(d, set()))) or "none"
            return (f"base {base.short_id} records GTID {g} at {base.position}, but the "
                    f"archived {base.position.file} has {found} there")
    return None


def plan_in(cat: Catalog, target: Target, scan: Scans, *, base_id: str | None = None,
            kinds: tuple[str, ...] | None = None) -> ReplayPlan:
    """Plan within one history (see the module)."""
    stop = stop_position(cat, target, scan)
    candidates = [b for b in cat.bases if b.position is not None and b.position <= stop.position
                  and (kinds is None or b.kind in kinds)
                  and (base_id is None or b.snapshot_id.startswith(base_id))]
    candidates.sort(key=lambda b: (b.position, b.time))  # type: ignore[arg-type,return-value]
    notes: list[str] = []
    for base in reversed(candidates):
        assert base.position is not None
        chain = cat.chain(base.position, stop.position)
        if chain is None:
            continue
        why = base_mismatch(base, scan(chain[0])) if comparable(base) else None
        if why is not None:
            if base_id is not None:
                raise SourceError(f"{why}: the base and the binlogs come from different servers")
            notes.append(f"passed over {why} (taken on another server)")
            continue
        last = chain[-1]
        stop_offset = None if stop.position.offset >= last.size else stop.position.offset
        p = ReplayPlan(base=base, stop=stop.position, files=chain,
                       start_offset=base.position.offset, stop_offset=stop_offset,
                       history=cat.history, notes=notes)
        p.notes += _time_notes(target, stop)
        return p
    if base_id is not None:
        raise SourceError(f"snapshot {base_id} cannot reach {target.describe()} (it is later, "
                          "or a binlog between them is missing)")
    gaps = cat.gaps()
    hint = (f"binlogs missing: {', '.join(gaps[0]['missing'][:3])}" if gaps
            else "take a base backup before the target")
    raise SourceError(f"no base backup can reach {target.describe()} (stop at {stop.position})",
                      hint=hint)


def _time_notes(target: Target, stop: Stop) -> list[str]:
    """What a time target with a fraction of a second means at the binlog's resolution."""
    if target.time is None or not target.time.microsecond:
        return []
    second = target.time.replace(microsecond=0).isoformat()
    text = (f"binlog event times are whole seconds: every transaction written in the second "
            f"{second} is replayed, even one written after {target.time.isoformat()}")
    if stop.same_second:
        text += f" ({stop.same_second} transaction(s) of that second"
        if stop.last is not None and stop.last_at is not None:
            text += f", the last GTID {stop.last.gtid or '-'} at {stop.last_at}"
        text += ")"
    return [text + "; to stop exactly, use --target-gtid or --target-position"]


def plan(archive: ServerArchive, target: Target, fetch: Fetch, *, base_id: str | None = None,
         kinds: tuple[str, ...] | None = None) -> ReplayPlan:
    """Plan in the one history that can reach the target (see the module)."""
    catalogs = archive.catalogs
    if base_id is not None:
        own = archive.catalog_of(base_id)
        catalogs = [own] if own is not None else []
    scan = Scans(fetch)
    found: list[tuple[ReplayPlan, Catalog]] = []
    errors: list[tuple[SourceError, Catalog]] = []
    for cat in reversed(catalogs):  # the newest history first
        try:
            found.append((plan_in(cat, target, scan, base_id=base_id, kinds=kinds), cat))
        except SourceError as exc:
            errors.append((exc, cat))
    if len(found) > 1:
        which = "; ".join(f"history {p.history} ({describe_server(c.identity)}, base "
                          f"{p.base.short_id})" for p, c in found)
        raise UsageError(f"{target.describe()} can be reached in {len(found)} histories of this "
                         f"server name: {which}",
                         hint="choose the base to start from with --snapshot")
    if found:
        return found[0][0]
    # the newest history that has binlogs says best why it cannot be done
    for error, cat in errors:
        if cat.files:
            raise error
    if errors:
        raise errors[0][0]
    raise SourceError("no binlogs are archived for this server",
                      hint="run 'keepwell mysql binlog-stream' or 'binlog-push'")
