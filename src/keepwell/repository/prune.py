"""Pruning: giving back the space of blobs no snapshot references, beside running backups.

Words:
    used blob    a blob some snapshot references (found by walking every snapshot's trees once)
    doomed pack  a pack that leaves the index: wholly unused, or repacked (its used blobs copied
                 into new packs first, see keepwell.repository.repack)
    pending      a durable record ``pending/<hash>`` (kind ``kw-pending``) of doomed packs: the
                 time they left the index and every session that existed at that moment
    orphan       a stored pack in no index and no pending record: an upload whose index object
                 is not written yet, what a killed run left, or packs of a prune killed mid-way

Two phases, so that nothing a running or later backup references is lost and no backup waits:

1. mark: repack → write one index object without the doomed packs, superseding the index objects
   it was built from → delete those → list the sessions → write the pending record. A backup
   whose session appears after that listing loads the index after the old objects are gone, so it
   can never see a doomed pack; every earlier one that is still running is in the record.
2. delete, for each record whose sessions have all ended (or gone stale) and whose grace period
   has passed: walk every snapshot again (after those sessions ended); a doomed pack holding a
   blob that a snapshot now uses and no index lists goes back into the index (a backup that had
   loaded the old index committed after the marking); a doomed pack an index lists again, or that
   a younger record also lists, is kept for now; the rest are deleted, then the record.

A crash at any step leaves a valid repository: packs are deleted only after they left the index
and the record that covers them exists; without the record, they are orphans, which the next
prune marks (or adopts, if a snapshot uses them). Prunes keep apart through the prune lock
(keepwell.repository.sessions.PruneLock); backups never look at it and never wait.

Events (on ``repo.events``): ``prune`` with ``step`` = ``repacked``, ``index_written``,
``index_superseded``, ``marked``, ``restored``, ``pack_deleted``, ``packs_deleted``; the repack
also emits ``pack_stored`` for each new pack.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from keepwell.errors import (
    DamagedSnapshotError,
    ObjectNotFoundError,
)
from keepwell.repository.format import (
    PACK_PREFIX,
    PackEntry,
    pack_object_name,
)
from keepwell.repository.index import MasterIndex
from keepwell.repository.packer import PACK_TARGET, StoredPack, index_content
from keepwell.repository.pending import PendingRecord, load_pending, write_pending
from keepwell.repository.repack import RepackJob, repack
from keepwell.repository.repo import Repository
from keepwell.repository.sessions import PruneLock, heartbeat_seconds, list_sessions
from keepwell.repository.tree import DIR
from keepwell.repository.unindexed import (
    UnindexedPacks,
    damaged_packs,
    load_tree_anywhere,
    pack_type_of,
    unique_entries,
)
from keepwell.units import SIZE_EXAMPLES, UnitError, parse_percent, parse_size

DEFAULT_GRACE = 3600.0  # seconds a doomed pack stays after its sessions ended (protects readers)
SMALL_SHARE = 0.5  # with repack_small: packs under this share of their target size are merged


# -- options ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnusedLimit:
    """How much unused data may stay: a percentage of the repository, a size, or no limit."""

    percent: float | None = 5.0
    size: int | None = None

    def allowed(self, used: int) -> float:
        if self.size is not None:
            return float(self.size)
        if self.percent is None or self.percent >= 100:
            return math.inf
        return used * self.percent / (100 - self.percent)  # unused / (used + unused) <= percent


def parse_max_unused(text: str) -> UnusedLimit:
    """``--max-unused``: a percentage (``5%``), a size (``2G``, as `keepwell.units` reads it)
    or ``unlimited``."""
    if text.strip().lower() == "unlimited":
        return UnusedLimit(percent=None)
    if "%" in text:
        return UnusedLimit(percent=parse_percent(text, "--max-unused"))
    try:
        return UnusedLimit(percent=None, size=parse_size(text, "--max-unused"))
    except UnitError:
        raise UnitError(f"--max-unused: expected a percentage (5%), a size ({SIZE_EXAMPLES}) "
                         f"or unlimited, got {text!r}") from None


@dataclass
class PruneOptions:
    max_unused: UnusedLimit = field(default_factory=UnusedLimit)
    max_repack_bytes: int | None = None
    repack_small: bool = False
    grace: float = DEFAULT_GRACE
    wait: bool = False
    dry_run: bool = False


@dataclass
class PruneReport:
    dry_run: bool = False
    packs_deleted: int = 0  # phase 2: deleted from storage in this run
    bytes_freed: int = 0
    packs_restored: int = 0  # phase 2: back into the index, a snapshot uses them now
    packs_repacked: int = 0  # phase 1: their used blobs copied into new packs
    blobs_repacked: int = 0
    bytes_repacked: int = 0
    packs_written: int = 0
    packs_marked: int = 0  # phase 1: left the index in this run, now pending
    bytes_marked: int = 0
    packs_adopted: int = 0  # unindexed packs with used blobs, indexed again
    packs_deferred: int = 0  # wholly unused, but a running backup may have just written them
    packs_kept: int = 0
    packs_pending: int = 0  # awaiting deletion after this run
    bytes_pending: int = 0
    unused_bytes_left: int = 0  # in kept packs
    waiting_for_sessions: int = 0  # live sessions that hold back pending deletions
    live_sessions: int = 0  # live backup sessions when this run began
    live_sessions_at_delete: int = 0  # live backup sessions when it deleted packs
    warnings: list[str] = field(default_factory=list)


# -- what the snapshots use ----------------------------------------------------------------------
def referenced_blobs(repo: Repository, index: MasterIndex, unindexed: UnindexedPacks | None) -> set[bytes]:
    """Every blob (trees and content) any snapshot references; each tree is read once.
    A damaged snapshot object stops it: what that snapshot references cannot be known."""
    used: set[bytes] = set()
    frontier = [bytes.fromhex(s.tree) for s in repo.list_snapshots()]
    if repo.damaged_snapshots:
        sid, why = sorted(repo.damaged_snapshots.items())[0]
        more = len(repo.damaged_snapshots) - 1
        raise DamagedSnapshotError(
            f"{why}{f' (and {more} more)' if more else ''}: prune cannot tell which data it "
            "still needs, and changes nothing", snapshot_id=sid,
            hint=f"forget it with 'keepwell forget {sid[:8]}', or copy it again from a "
                 "repository that holds it; then prune")
    with ThreadPoolExecutor(8) as pool:
        while frontier:
            todo = [t for t in dict.fromkeys(frontier) if t not in used]
            used.update(todo)
            frontier = []
            for start in range(0, len(todo), 256):  # bounds the trees held at once
                batch = todo[start : start + 256]
                for nodes in pool.map(lambda t: load_tree_anywhere(repo, index, unindexed, t), batch):
                    for node in nodes:
                        used.update(node.content)
                        if node.type == DIR and node.subtree is not None and node.subtree not in used:
                            frontier.append(node.subtree)
    return used


def supersede_index(repo: Repository, packs: list[StoredPack], old_files: list[str],
                    verify: Callable[[], None]) -> str:
    """Write one index object of ``packs`` that supersedes the index objects ``old_files``, then
    (once ``verify`` passed: the prune lock is still held) delete those."""
    name = repo.write_index(index_content(packs, supersedes=old_files))
    repo.events.emit("prune", step="index_written")
    verify()
    for old in old_files:
        try:
            repo.backend.delete(f"index/{old}")
        except ObjectNotFoundError:
            pass
    repo.events.emit("prune", step="index_superseded")
    return name


# -- choosing what to repack ---------------------------------------------------------------------
@dataclass
class PackUse:
    name: str
    type: int
    size: int  # stored object size
    entries: list[PackEntry]  # unique blobs the index lists in it
    used: list[PackEntry] = field(default_factory=list)  # used blobs this pack is the chosen copy of

    @property
    def used_bytes(self) -> int:
        return sum(e.length for e in self.used)

    @property
    def unused_bytes(self) -> int:
        return sum(e.length for e in self.entries) - self.used_bytes


def assign_used(packs: list[PackUse], used: set[bytes]) -> None:
    """Give each used blob to one pack; packs holding more used blobs are preferred, so a blob
    stored twice (after a repack that was interrupted, say) makes the other copy unused."""
    counts = {p.name: sum(1 for e in p.entries if e.id in used) for p in packs}
    claimed: set[bytes] = set()
    for p in sorted(packs, key=lambda p: (-counts[p.name], p.name)):
        p.used = [e for e in p.entries if e.id in used and e.id not in claimed]
        claimed.update(e.id for e in p.used)


def choose(packs: list[PackUse], opts: PruneOptions) -> tuple[list[PackUse], list[PackUse], list[PackUse]]:
    """(delete, repack, keep): wholly unused packs go; partly used ones are repacked, most unused
    share first, until the unused data left is within ``max_unused``, within the size budget."""
    delete = [p for p in packs if not p.used]
    live = [p for p in packs if p.used]
    partly = [p for p in live if p.unused_bytes > 0]
    unused = sum(p.unused_bytes for p in partly)
    allowed = opts.max_unused.allowed(sum(p.used_bytes for p in live))
    budget = math.inf if opts.max_repack_bytes is None else opts.max_repack_bytes
    chosen: dict[str, PackUse] = {}
    spent = 0
    for p in sorted(partly, key=lambda p: (-p.unused_bytes / (p.unused_bytes + p.used_bytes),
                                           -p.unused_bytes, p.name)):
        if unused <= allowed:
            break
        if spent + p.used_bytes > budget:
            continue
        chosen[p.name] = p
        unused -= p.unused_bytes
        spent += p.used_bytes
    if opts.repack_small:
        for ptype, target in PACK_TARGET.items():
            small = [p for p in live if p.type == ptype and p.name not in chosen
                     and p.size < SMALL_SHARE * target]
            merging_into = any(p.type == ptype for p in chosen.values())
            if len(small) + merging_into < 2:
                continue
            for p in sorted(small, key=lambda p: (p.size, p.name)):
                if spent + p.used_bytes <= budget:
                    chosen[p.name] = p
                    spent += p.used_bytes
    keep = [p for p in live if p.name not in chosen]
    return delete, list(chosen.values()), keep


# -- the two phases ------------------------------------------------------------------------------
def prune(repo: Repository, options: PruneOptions | None = None, *, dry_run: bool = False) -> PruneReport:
    opts = options or PruneOptions(dry_run=dry_run)
    report = PruneReport(dry_run=opts.dry_run)
    if opts.dry_run:
        _Pass(repo, opts, report, None).run(mark=True)
        return report
    with PruneLock(repo) as lock:
        mine = _Pass(repo, opts, report, lock).run(mark=True)
        while opts.wait and mine is not None:
            records = {r.name: r for r in load_pending(repo)}
            if mine not in records:
                break
            now = time.time()
            live = {s.id for s in list_sessions(repo, strict=True) if s.live(now)}
            if records[mine].ready(live, now, opts.grace):
                _Pass(repo, opts, report, lock).run(mark=False)
            else:
                pause = max(0.0, records[mine].time + opts.grace - now)
                time.sleep(min(max(pause, 0.05), heartbeat_seconds(), 5.0))
    _summarise_pending(repo, report)
    return report


def _summarise_pending(repo: Repository, report: PruneReport) -> None:
    records = load_pending(repo)
    now = time.time()
    live = {s.id for s in list_sessions(repo) if s.live(now)}
    report.packs_pending = len({n for r in records for n in r.packs})
    report.bytes_pending = sum(dict(kv for r in records for kv in r.packs.items()).values())
    report.waiting_for_sessions = len(live & {s for r in records for s in r.sessions})


class _Pass:
    """One pass: restore and phase 2 for the pending records, then (``mark``) phase 1."""

    def __init__(self, repo: Repository, opts: PruneOptions, report: PruneReport,
                 lock: PruneLock | None) -> None:
        self.repo = repo
        self.opts = opts
        self.report = report
        self.lock = lock

    def _verify_lock(self) -> None:
        if self.lock is not None:
            self.lock.verify()

    def run(self, *, mark: bool) -> str | None:
        repo = self.repo
        now = time.time()
        records = load_pending(repo, self.report.warnings)
        sessions = [s for s in list_sessions(repo, strict=True) if s.live(now)]
        live = {s.id for s in sessions}
        for s in sessions:
            if not s.readable and not any(s.name in w for w in self.report.warnings):
                self.report.warnings.append(
                    f"{s.describe(now)}: it is taken for a running backup, whose data is kept "
                    "('keepwell unlock --remove-all' removes it if no backup runs)")
        self.report.live_sessions = max(self.report.live_sessions, len(live))
        ready = [r for r in records if r.ready(live, now, self.opts.grace)]
        matured = {n for r in records if r.ended(live) for n in r.deferred}
        index = repo.refresh_index()  # order: index, then packs (a listed pack is never "missing")
        stored = {i.name: i.size for p in PACK_PREFIX.values() for i in repo.backend.list(p + "/")}
        # listed after the index was loaded: whoever wrote a pack in it is in this list or ended
        writers = {s.id for s in list_sessions(repo, strict=True) if s.live(time.time())}
        by_pack = self._indexed_packs(index)
        unindexed = UnindexedPacks(repo, set(stored) - set(by_pack))
        used = referenced_blobs(repo, index, unindexed)  # after `ready` was decided: see phase 2
        restored, unread = self._restore(records, index, set(by_pack), stored, used, unindexed)
        if ready:
            self._delete(ready, [r for r in records if r not in ready],
                         set(by_pack) | restored | unread, stored)
        if not mark:
            return None
        waiting = records if self.opts.dry_run else [r for r in records if r not in ready]
        return self._mark(index, by_pack, stored, used, unindexed, waiting, restored,
                          matured, writers)

    @staticmethod
    def _indexed_packs(index: MasterIndex) -> dict[str, tuple[bytes, int, list[PackEntry]]]:
        raw: dict[tuple[bytes, int], list[PackEntry]] = {}
        for blob_id, loc in index.entries():
            raw.setdefault((loc.pack, loc.pack_type), []).append(
                PackEntry(loc.type, blob_id, loc.offset, loc.length, loc.raw_length))
        return {pack_object_name(t, p.hex()): (p, t, unique_entries(es)) for (p, t), es in raw.items()}

    # -- phase 2 ---------------------------------------------------------------------------------
    def _restore(self, records: list[PendingRecord], index: MasterIndex, indexed: set[str],
                 stored: dict[str, int], used: set[bytes], unindexed: UnindexedPacks
                 ) -> tuple[set[str], set[str]]:
        """Index again every pending pack that holds a blob a snapshot uses and no index lists
        (a backup that had loaded the old index committed after the marking). Adding to the
        index is always safe, so this runs for every record, ready or not. Returns the packs
        restored and those whose header could not be read (never deleted unread)."""
        candidates = {n for r in records for n in r.packs if n in stored} - indexed
        if not candidates:
            return set(), set()
        ids = list(used)
        missing = {b for b, known in zip(ids, index.has_each(ids), strict=True) if not known}
        restore: list[StoredPack] = []
        unread: set[str] = set()
        for name in sorted(candidates) if missing else []:
            header = unindexed.header(name)
            if header is None:
                unread.add(name)
                self.report.warnings.append(f"{name}: pack header unreadable; not deleted")
            elif any(e.id in missing for e in header):
                restore.append(StoredPack(bytes.fromhex(name.rsplit("/", 1)[1]),
                                          pack_type_of(name), unique_entries(header)))
        damaged = damaged_packs(self.repo, (pack_object_name(p.type, p.id.hex()) for p in restore))
        for name, why in sorted(damaged.items()):
            unread.add(name)
            self.report.warnings.append(f"{name} is pending deletion and a snapshot uses it, but "
                                        f"{why}: not indexed again, not deleted (run 'keepwell check')")
        restore = [p for p in restore if pack_object_name(p.type, p.id.hex()) not in damaged]
        self.report.packs_restored += len(restore)
        if restore and not self.opts.dry_run:
            self.repo.write_index(index_content(restore))
            self.repo.events.emit("prune", step="restored", packs=len(restore))
        return {pack_object_name(p.type, p.id.hex()) for p in restore}, unread

    def _delete(self, ready: list[PendingRecord], waiting: list[PendingRecord], keep: set[str],
                stored: dict[str, int]) -> None:
        """Phase 2 proper: delete the packs of records whose sessions ended and grace passed.
        Kept: packs in ``keep`` (an index lists them again, or they could not be looked into),
        and packs a younger record lists (sessions that began after the older marking may hold
        them). A kept pack that no index lists becomes an orphan, which a later run marks anew."""
        repo, report = self.repo, self.report
        younger = {n for r in waiting for n in r.packs}
        doomed = sorted({n for r in ready for n in r.packs if n in stored} - keep - younger)
        if self.opts.dry_run:
            report.packs_deleted += len(doomed)
            report.bytes_freed += sum(stored[n] for n in doomed)
            return
        self._verify_lock()
        if doomed:
            now = time.time()
            report.live_sessions_at_delete = max(report.live_sessions_at_delete, sum(
                1 for s in list_sessions(repo) if s.live(now)))
        for name in doomed:
            try:
                repo.backend.delete(name)
            except ObjectNotFoundError:
                continue
            report.packs_deleted += 1
            report.bytes_freed += stored[name]
            del stored[name]
            repo.events.emit("prune", step="pack_deleted", pack=name)
        repo.events.emit("prune", step="packs_deleted", packs=len(doomed))
        for r in ready:
            try:
                repo.backend.delete(r.name)
            except ObjectNotFoundError:
                pass

    # -- phase 1 ---------------------------------------------------------------------------------
    def _mark(self, index: MasterIndex, by_pack: dict[str, tuple[bytes, int, list[PackEntry]]],
              stored: dict[str, int], used: set[bytes], unindexed: UnindexedPacks,
              waiting: list[PendingRecord], restored: set[str], matured: set[str],
              writers: set[str]) -> str | None:
        repo, report, opts = self.repo, self.report, self.opts
        old_files = sorted(index.files)
        pending = {n for r in waiting for n in r.packs}
        missing = sorted(n for n in by_pack if n not in stored)
        if missing:
            report.warnings.append(f"{len(missing)} pack(s) listed in the index are missing from "
                                   f"storage, e.g. {missing[0]}; their entries are dropped, so the "
                                   "next backup stores that data again (run 'keepwell check')")
        packs = [PackUse(n, t, stored[n], es) for n, (_p, t, es) in by_pack.items() if n in stored]
        assign_used(packs, used)
        unused, to_repack, keep = choose(packs, opts)
        # A wholly unused pack may be one a running backup has just stored and indexed, before
        # its snapshot exists: while any session lives, such a pack is deferred until the
        # sessions live now have ended (a deferral recorded by an earlier run has matured then).
        delete = [p for p in unused if p.name in matured or not writers]
        deferred = [p for p in unused if p.name not in matured and writers]
        delete_later = {p.name for p in deferred}
        keep += deferred

        adopted: list[StoredPack] = []
        orphans: list[str] = []
        for name in sorted(set(stored) - set(by_pack) - pending - restored):
            header = unindexed.header(name)
            if header is None:
                report.warnings.append(f"{name} is in no index and its header is unreadable; left alone")
            elif any(e.id in used for e in header):
                adopted.append(StoredPack(bytes.fromhex(name.rsplit("/", 1)[1]), pack_type_of(name),
                                          unique_entries(header)))
            else:
                orphans.append(name)
        damaged = damaged_packs(repo, (pack_object_name(p.type, p.id.hex()) for p in adopted))
        for name, why in sorted(damaged.items()):
            report.warnings.append(f"{name} is in no index and a snapshot uses it, but {why}: "
                                   "not indexed, left alone (run 'keepwell check')")
        adopted = [p for p in adopted if pack_object_name(p.type, p.id.hex()) not in damaged]

        repacked: list[str] = []
        if opts.dry_run:
            repacked = [p.name for p in to_repack]
            report.blobs_repacked += sum(len(p.used) for p in to_repack)
            report.bytes_repacked += sum(p.used_bytes for p in to_repack)
        elif to_repack:
            result = repack(repo, [RepackJob(p.name, p.used) for p in to_repack])
            repacked = result.repacked
            report.blobs_repacked += result.blobs
            report.bytes_repacked += result.bytes
            report.packs_written += result.packs_written
            for name, why in result.damaged.items():
                report.warnings.append(f"{name} not repacked, kept whole: {why}")
            repo.events.emit("prune", step="repacked", packs=len(result.repacked))
        report.packs_repacked += len(repacked)
        gone = set(repacked)
        kept = keep + [p for p in to_repack if p.name not in gone]
        doomed = {p.name: p.size for p in delete} | {n: stored[n] for n in repacked}
        doomed |= {n: stored[n] for n in orphans}
        report.packs_kept = len(kept) + len(adopted)
        report.packs_adopted += len(adopted)
        report.packs_deferred = len(deferred)
        report.unused_bytes_left = sum(p.unused_bytes for p in kept if p.name not in delete_later)
        report.packs_marked += len(doomed)
        report.bytes_marked += sum(doomed.values())
        if opts.dry_run:
            return None
        if doomed or adopted or missing:
            new_index = [StoredPack(bytes.fromhex(p.name.rsplit("/", 1)[1]), p.type, p.entries)
                         for p in kept] + adopted
            supersede_index(repo, new_index, old_files, self._verify_lock)
        if not (doomed or deferred):
            return None
        # listed only now: a session that is not in this list loads the index after the
        # superseded objects are gone, so it cannot hold a doomed pack
        sessions = {s.id for s in list_sessions(repo, strict=True)}
        name = write_pending(repo, time.time(), sessions, doomed, (p.name for p in deferred))
        repo.events.emit("prune", step="marked", record=name, packs=len(doomed))
        return name
