"""What the repository holds for one MySQL/MariaDB server: bases, binlog files, gaps, windows.

Built from snapshot records alone (their ``source`` dicts), never from file contents, so it is
cheap. This is the one place that interprets the ``source`` fields written by `logical`,
`physical` and `archive`.

- A *base* is a logical or physical backup with the binlog position it is consistent at.
- A *binlog file* may be stored several times while it grows; the longest copy counts.
- A *gap* is a missing file number between two archived files (a binlog purged before it was
  archived). Replay cannot cross a gap.
- The *reach* of a base is the end of the last archived binlog it can be rolled forward to
  without crossing a gap; the *PITR window* runs from the oldest base with binlogs to the newest
  reach.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from keepwell.sources.mysql import BASE_KINDS, KIND_BINLOG, KIND_LOGICAL
from keepwell.sources.mysql.binlog import BinlogPosition, binlog_seq


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value)).timestamp()


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class BinlogFile:
    name: str
    seq: int
    size: int
    closed: bool
    final: bool  # nothing will ever be appended: closed, or read from disk after the server
    # moved on to a later file (a crash leaves no rotate event)
    first_time: float | None
    last_time: float | None
    gtids: dict[str, list[str]]
    snapshot_id: str
    synced_at: float

    @property
    def end(self) -> BinlogPosition:
        return BinlogPosition(self.seq, self.size, self.name)


@dataclass(frozen=True)
class Base:
    snapshot_id: str
    short_id: str
    kind: str
    time: datetime
    position: BinlogPosition | None
    gtid: str | None
    server: dict[str, Any]
    start_time: float | None
    stop_time: float | None
    databases: list[str]

    @property
    def logical(self) -> bool:
        return self.kind == KIND_LOGICAL


@dataclass
class Catalog:
    bases: list[Base] = field(default_factory=list)
    files: dict[str, BinlogFile] = field(default_factory=dict)
    servers: list[dict[str, Any]] = field(default_factory=list)
    binlog_snapshots: list[Any] = field(default_factory=list)
    synced_at: float | None = None

    @classmethod
    def build(cls, snapshots: Iterable[Any]) -> Catalog:
        cat = cls()
        for snap in snapshots:
            src = snap.source or {}
            if snap.kind in BASE_KINDS:
                pos = None
                if src.get("binlog_file") and src.get("binlog_pos") is not None:
                    pos = BinlogPosition.of(src["binlog_file"], int(src["binlog_pos"]))
                cat.bases.append(Base(
                    snapshot_id=snap.id, short_id=snap.short_id, kind=snap.kind, time=snap.time,
                    position=pos, gtid=src.get("gtid"), server=src.get("server") or {},
                    start_time=_epoch(src.get("start_time")),
                    stop_time=_epoch(src.get("stop_time")),
                    databases=list(src.get("databases") or [])))
            elif snap.kind == KIND_BINLOG:
                cat.binlog_snapshots.append(snap)
                server = src.get("server") or {}
                if server and server not in cat.servers:
                    cat.servers.append(server)
                synced = _epoch(src.get("synced_at")) or snap.time.timestamp()
                cat.synced_at = synced if cat.synced_at is None else max(cat.synced_at, synced)
                for f in src.get("files", []):
                    bf = BinlogFile(
                        name=f["name"], seq=binlog_seq(f["name"]), size=int(f["size"]),
                        closed=bool(f.get("closed")),
                        final=bool(f.get("final", f.get("closed"))),
                        first_time=_epoch(f.get("first_time")),
                        last_time=_epoch(f.get("last_time")), gtids=dict(f.get("gtids") or {}),
                        snapshot_id=snap.id, synced_at=synced)
                    old = cat.files.get(bf.name)
                    if old is None or (bf.size, bf.final, bf.synced_at) > (
                            old.size, old.final, old.synced_at):
                        cat.files[bf.name] = bf
        cat.bases.sort(key=lambda b: (b.time, b.snapshot_id))
        return cat

    # -- binlog continuity ------------------------------------------------------------------
    def ordered(self) -> list[BinlogFile]:
        return sorted(self.files.values(), key=lambda f: f.seq)

    def gaps(self) -> list[dict[str, Any]]:
        """What is missing between archived files: the tail of a file archived only in part,
        and whole files."""
        out = []
        files = self.ordered()
        for a, b in zip(files, files[1:], strict=False):
            missing = [] if a.final else [f"{a.name} after offset {a.size}"]
            base = a.name.rsplit(".", 1)[0]
            width = len(a.name.rsplit(".", 1)[1])
            missing += [f"{base}.{n:0{width}d}" for n in range(a.seq + 1, b.seq)]
            if missing:
                out.append({"after": a.name, "before": b.name, "missing": missing})
        return out

    def last(self) -> BinlogFile | None:
        files = self.ordered()
        return files[-1] if files else None

    def reach(self, base: Base) -> BinlogPosition | None:
        """The furthest position this base can be rolled forward to, or None if its first
        binlog is not archived."""
        if base.position is None:
            return None
        first = next((f for f in self.files.values() if f.seq == base.position.seq), None)
        if first is None:
            return None
        cur = first
        while True:
            nxt = next((f for f in self.files.values() if f.seq == cur.seq + 1), None)
            if nxt is None or not cur.final:
                return cur.end
            cur = nxt

    def chain(self, start: BinlogPosition, stop: BinlogPosition) -> list[BinlogFile] | None:
        """The archived files from start's to stop's, or None if one is missing."""
        out = []
        for seq in range(start.seq, stop.seq + 1):
            f = next((x for x in self.files.values() if x.seq == seq), None)
            if f is None or (seq < stop.seq and not f.final):
                return None
            out.append(f)
        return out

    def file_time(self, pos: BinlogPosition) -> float | None:
        f = next((x for x in self.files.values() if x.seq == pos.seq), None)
        if f is None:
            return None
        return f.last_time if pos.offset >= f.size else None

    def window(self) -> dict[str, Any]:
        """The PITR window: from the oldest base that has its binlogs to the newest reach."""
        starts, ends = [], []
        for b in self.bases:
            r = self.reach(b)
            if r is None:
                continue
            starts.append(b.stop_time or b.time.timestamp())
            last = next((f for f in self.files.values() if f.seq == r.seq), None)
            if last is not None:
                ends.append(max(last.last_time or 0, last.synced_at))
        if not starts:
            return {"from": None, "to": None}
        return {"from": iso(min(starts)), "to": iso(max(ends)) if ends else None}

    def report(self) -> dict[str, Any]:
        bases = []
        for b in self.bases:
            r = self.reach(b)
            bases.append({
                "snapshot": b.short_id, "kind": b.kind, "time": b.time.isoformat(),
                "position": str(b.position) if b.position else None, "gtid": b.gtid,
                "binlogs_from_base": r is not None, "reach": str(r) if r else None,
            })
        last = self.last()
        return {
            "bases": bases,
            "binlogs": {
                "files": len(self.files),
                "first": self.ordered()[0].name if self.files else None,
                "last": last.name if last else None,
                "last_event": iso(last.last_time) if last else None,
                "synced_at": iso(self.synced_at),
                "servers": self.servers,
            },
            "gaps": self.gaps(),
            "window": self.window(),
        }

    # -- retention ----------------------------------------------------------------------------
    def binlog_snapshots_to_forget(self, kept_bases: list[Base]) -> list[str]:
        """Binlog snapshots that no kept base needs and that hold no current copy of a file.

        A file is needed from the oldest kept base's binlog on; a snapshot is also kept while
        it holds the longest copy of any file.
        """
        positions = [b.position for b in kept_bases if b.position is not None]
        oldest = min((p.seq for p in positions), default=None)
        needed = {f.snapshot_id for f in self.files.values() if oldest is None or f.seq >= oldest}
        return [snap.id for snap in self.binlog_snapshots if snap.id not in needed]
