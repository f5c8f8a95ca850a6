"""What the repository holds for one MySQL/MariaDB server name: histories, bases, binlog files,
gaps, windows.

Built from snapshot records alone (their ``source`` dicts), never from file contents, so it is
cheap. This is the one place that interprets the ``source`` fields written by `logical`,
`physical` and `archive`.

- A *history* is one server's binary log under one name (see `keepwell.sources.mysql.identity`):
  its snapshots record the same server identity and history number. `ServerArchive` holds the
  histories of a name, each a `Catalog`; bases and binlogs of different histories are never
  combined (binlog names and positions only mean something within one history).
- A *base* is a logical or physical backup with the binlog position it is consistent at.
- A *binlog file* may be stored several times while it grows; the longest copy counts.
- A *gap* is a missing file number between two archived files (a binlog purged before it was
  archived). Replay cannot cross a gap.
- The *reach* of a base is the end of the last archived binlog it can be rolled forward to
  without crossing a gap; the *PITR window* runs from the oldest base with binlogs to the newest
  reach.
- *synced at* is the moment up to which a history's archive holds every event the server wrote:
  for a stream, the newest moment whose binary log end position the stream had received; the
  time of the copy for a push of the current file; the start of the first file not stored for
  a push of closed files only. A time target later than that is beyond the archive.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from keepwell.errors import UsageError
from keepwell.sources.mysql import BASE_KINDS, KIND_BINLOG, KIND_LOGICAL
from keepwell.sources.mysql.binlog import BinlogHead, BinlogPosition, binlog_seq
from keepwell.sources.mysql.identity import describe_server, history_of, merge, same_server

MYSQL_KINDS = (*BASE_KINDS, KIND_BINLOG)


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
    head: BinlogHead
    history: str  # the key of its `Catalog` (files of two histories may share a name)

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
    history: str = "h0"

    @property
    def logical(self) -> bool:
        return self.kind == KIND_LOGICAL


@dataclass
class Catalog:
    """One history: its server's identity, bases and archived binlog files."""

    identity: dict[str, Any] = field(default_factory=dict)
    history: int = 0
    key: str = "h0"
    declared: bool = False  # started with --new-server
    first_snapshot: str | None = None
    bases: list[Base] = field(default_factory=list)
    files: dict[str, BinlogFile] = field(default_factory=dict)
    binlog_snapshots: list[Any] = field(default_factory=list)
    synced_at: float | None = None

    @property
    def servers(self) -> list[dict[str, Any]]:
        return [self.identity] if self.identity else []

    def add(self, snap: Any) -> None:
        """Take one snapshot of this history; snapshots come in time order (`ServerArchive`
        sorts them), so the bases stay in time order."""
        src = snap.source or {}
        self.identity = merge(self.identity, src.get("server") or {})
        if snap.kind in BASE_KINDS:
            pos = None
            if src.get("binlog_file") and src.get("binlog_pos") is not None:
                pos = BinlogPosition.of(src["binlog_file"], int(src["binlog_pos"]))
            self.bases.append(Base(
                snapshot_id=snap.id, short_id=snap.short_id, kind=snap.kind, time=snap.time,
                position=pos, gtid=src.get("gtid"), server=src.get("server") or {},
                start_time=_epoch(src.get("start_time")),
                stop_time=_epoch(src.get("stop_time")),
                databases=list(src.get("databases") or []), history=self.key))
        elif snap.kind == KIND_BINLOG:
            self.binlog_snapshots.append(snap)
            synced = _epoch(src.get("synced_at")) or snap.time.timestamp()
            self.synced_at = synced if self.synced_at is None else max(self.synced_at, synced)
            for f in src.get("files", []):
                bf = BinlogFile(
                    name=f["name"], seq=binlog_seq(f["name"]), size=int(f["size"]),
                    closed=bool(f.get("closed")),
                    final=bool(f.get("final", f.get("closed"))),
                    first_time=_epoch(f.get("first_time")),
                    last_time=_epoch(f.get("last_time")), gtids=dict(f.get("gtids") or {}),
                    snapshot_id=snap.id, synced_at=synced, head=BinlogHead.of_summary(f),
                    history=self.key)
                old = self.files.get(bf.name)
                if old is None or (bf.size, bf.final, bf.synced_at) > (
                        old.size, old.final, old.synced_at):
                    self.files[bf.name] = bf

    def high_water(self) -> BinlogPosition | None:
        """The furthest binlog position this history records (archived file or base)."""
        marks = [f.end for f in self.files.values()]
        marks += [b.position for b in self.bases if b.position is not None]
        return max(marks, default=None)

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
                out.append({"after": a.name, "before": b.name, "missing": missing,
                            "history": self.history})
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
                "history": self.history,
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


@dataclass
class ServerArchive:
    """Everything under one server name: its histories, oldest first (see `Catalog`)."""

    catalogs: list[Catalog] = field(default_factory=list)

    @classmethod
    def build(cls, snapshots: Iterable[Any]) -> ServerArchive:
        """Sort the MySQL snapshots of one name into histories, in time order: a snapshot
        joins the newest history of its number whose server it is, else starts one."""
        out = cls()
        for snap in sorted(snapshots, key=lambda s: (s.time, s.id)):
            if snap.kind not in MYSQL_KINDS:
                continue
            src = snap.source or {}
            server = src.get("server") or {}
            number = history_of(server)
            cat = next((c for c in reversed(out.catalogs) if c.history == number
                        and same_server(c.identity, server)), None)
            if cat is None:
                key = f"h{number}" + (f"-{len(out.catalogs)}" if any(
                    c.history == number for c in out.catalogs) else "")
                cat = Catalog(history=number, key=key, declared=bool(src.get("new_server")),
                              first_snapshot=snap.id)
                out.catalogs.append(cat)
            cat.add(snap)
        return out

    @property
    def current(self) -> Catalog | None:
        """The history new snapshots continue: the highest history number (``--new-server``
        supersedes what came before, even if an old stream still writes to it), and among
        histories of one number, the one with the newest snapshot."""
        def rank(cat: Catalog) -> tuple[int, datetime]:
            times = [s.time for s in cat.binlog_snapshots] + [b.time for b in cat.bases]
            return cat.history, max(times)

        return max(self.catalogs, key=rank, default=None)

    @property
    def bases(self) -> list[Base]:
        return sorted((b for c in self.catalogs for b in c.bases),
                      key=lambda b: (b.time, b.snapshot_id))

    def catalog_of(self, snapshot_id: str) -> Catalog | None:
        """The history holding the snapshot (``snapshot_id`` may be a prefix)."""
        for cat in self.catalogs:
            if any(b.snapshot_id.startswith(snapshot_id) for b in cat.bases) or any(
                    s.id.startswith(snapshot_id) for s in cat.binlog_snapshots):
                return cat
        return None

    def history(self, number: int, identity: dict[str, Any]) -> Catalog:
        """The catalog new snapshots of this server and history number join (empty if none)."""
        return next((c for c in reversed(self.catalogs) if c.history == number
                     and same_server(c.identity, identity)), Catalog(history=number))

    def undeclared(self) -> list[Catalog]:
        """Histories after the first that were not started with ``--new-server``: another
        server's snapshots under this name (written before identities were checked)."""
        return [c for c in self.catalogs[1:] if not c.declared]

    def problems(self) -> list[str]:
        out = []
        first = self.catalogs[0] if self.catalogs else None
        for cat in self.undeclared():
            assert first is not None
            out.append(f"snapshots of two servers under this name: {describe_server(cat.identity)}"
                       f" (from snapshot {str(cat.first_snapshot)[:8]}) after "
                       f"{describe_server(first.identity)}; a restore must choose one with "
                       "--snapshot")
        return out

    def gaps(self) -> list[dict[str, Any]]:
        return [g for c in self.catalogs for g in c.gaps()]

    def window(self) -> dict[str, Any]:
        """From the oldest start to the newest end over the histories (a change of server
        may leave a hole between them)."""
        spans = [w for w in (c.window() for c in self.catalogs) if w["from"]]
        if not spans:
            return {"from": None, "to": None}
        ends = [w["to"] for w in spans if w["to"]]
        return {"from": min(w["from"] for w in spans), "to": max(ends) if ends else None}

    def report(self) -> dict[str, Any]:
        current = self.current or Catalog()
        out = current.report()
        out["bases"] = [b for c in self.catalogs for b in c.report()["bases"]]
        out["bases"].sort(key=lambda b: b["time"])
        out["gaps"] = self.gaps()
        out["window"] = self.window()
        out["binlogs"]["servers"] = [c.identity for c in self.catalogs if c.identity]
        out["histories"] = [{
            "history": c.history, "server": c.identity, "declared": c.declared,
            "current": c is self.current, "bases": len(c.bases), "binlogs": len(c.files),
            "first": c.ordered()[0].name if c.files else None,
            "last": c.ordered()[-1].name if c.files else None,
        } for c in self.catalogs]
        return out


def load_archive(repo: Any, host: str | None = None) -> ServerArchive:
    """The histories of one server name; without ``host`` the repository must hold only one."""
    snaps = [s for s in repo.list_snapshots() if s.kind in MYSQL_KINDS
             and (host is None or s.host == host)]
    hosts = sorted({s.host for s in snaps})
    if host is None and len(hosts) > 1:
        raise UsageError(f"this repository holds MySQL snapshots of {len(hosts)} servers "
                         f"({', '.join(hosts)})", hint="choose one with --server-name")
    return ServerArchive.build(snaps)


def load_catalog(repo: Any, host: str | None = None) -> Catalog:
    """The current history of one server name (empty if the name holds nothing)."""
    return load_archive(repo, host).current or Catalog()
