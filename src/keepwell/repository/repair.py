"""Repairing the index and the packs of a damaged repository (``keepwell repair index|packs``).

Both write one index object that supersedes every index object they read, as prune's first
phase does (docs/repository-format.md, "Concurrency and prune"), and so hold the prune lock while
they run. Backups take no lock and go on meanwhile: an index object a backup writes after the
listing is not superseded, and a pack that leaves the index is only recorded as pending deletion,
for a later prune to delete once the backups running now have ended and the grace period passed.

Words:
    rebuild    the new index of ``repair index``: every stored pack as its own header describes
               it (packs are self-describing), less the copies recorded as damaged
               (keepwell.repository.damage); packs that are missing from storage, and packs
               pending deletion that no index lists, are left out.
    verified   a blob of a pack whose stored bytes decrypt and match its id; ``repair packs``
               reads every blob a pack's index entries or its own header name.
    salvage    the verified blobs of a pack that is damaged (a blob fails, its bytes do not match
               its name, or its header is unreadable) are copied into new packs as they are
               stored (keepwell.repository.repack), the damaged ones are recorded, and the old
               pack leaves the index. The next backup that meets the lost data stores it again;
               ``repair --from-repo`` takes it from a replica; ``repair snapshots`` removes
               what stays lost from the snapshots.

Snapshots and replicas are repaired by keepwell.repository.repair_snapshots.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from keepwell.crypto import content_name
from keepwell.errors import (
    FormatError,
    IntegrityError,
    KeepwellError,
    ObjectNotFoundError,
    UsageError,
)
from keepwell.repository.damage import Damage, load_damage, pack_id_of, record_damage, settle
from keepwell.repository.format import (
    KIND_INDEX,
    PACK_PREFIX,
    TRAILER_SIZE,
    PackEntry,
    pack_object_name,
)
from keepwell.repository.index import ENTRY, IndexContent, decode_index, entries_bytes
from keepwell.repository.packer import StoredPack
from keepwell.repository.packreader import get_whole_pack, parse_header_and_sender
from keepwell.repository.pending import load_pending, write_pending
from keepwell.repository.prune import supersede_index
from keepwell.repository.repack import RepackJob, repack
from keepwell.repository.repo import Repository
from keepwell.repository.sessions import PruneLock, list_sessions
from keepwell.repository.unindexed import pack_type_of, read_pack_header, unique_entries

READ_AHEAD = 2  # packs read at once by `repair packs` (bounds memory to a few packs)


@dataclass
class IndexRepair:
    dry_run: bool = False
    packs: int = 0  # in the new index
    blobs: int = 0
    packs_added: list[str] = field(default_factory=list)  # stored, but no index listed them
    packs_dropped: list[str] = field(default_factory=list)  # listed, but missing from storage
    index_damaged: list[str] = field(default_factory=list)  # index objects that could not be read
    index_superseded: int = 0
    removed: list[str] = field(default_factory=list)  # unreadable pending/damage records, settled ones
    index_written: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class PackRepair:
    dry_run: bool = False
    packs_read: int = 0
    blobs_read: int = 0
    packs_damaged: list[str] = field(default_factory=list)  # salvaged and out of the index
    packs_missing: list[str] = field(default_factory=list)  # out of the index
    blobs_damaged: int = 0  # recorded, no longer used by backups
    blobs_salvaged: int = 0
    packs_written: int = 0
    damage_record: str | None = None
    pending_record: str | None = None
    index_written: str | None = None
    warnings: list[str] = field(default_factory=list)


# -- shared steps ---------------------------------------------------------------------------------
def stored_packs(repo: Repository) -> dict[str, int]:
    """Every stored pack: object name -> size."""
    return {i.name: i.size for p in PACK_PREFIX.values() for i in repo.backend.list(p + "/")}


def indexed_packs(repo: Repository) -> dict[str, StoredPack]:
    """The packs the loaded index lists with at least one entry, and their entries."""
    raw: dict[tuple[bytes, int], list[PackEntry]] = {}
    for blob_id, loc in repo.index.entries():
        raw.setdefault((loc.pack, loc.pack_type), []).append(
            PackEntry(loc.type, blob_id, loc.offset, loc.length, loc.raw_length))
    return {pack_object_name(t, p.hex()): StoredPack(p, t, unique_entries(es))
            for (p, t), es in raw.items()}


def listed_packs(repo: Repository) -> set[str]:
    """Every pack an index object lists, whether or not an entry of it is left."""
    index = repo.index
    return {pack_object_name(t, p.hex()) for p, t in zip(index.pack_ids, index.pack_types,
                                                         strict=True)}


def settle_records(repo: Repository, damage: Damage) -> list[str]:
    """Delete the damage records that no stored or indexed pack needs any more."""
    repo.refresh_index()
    deleted = settle(repo, damage, set(stored_packs(repo)) | listed_packs(repo))
    if deleted:
        repo.refresh_index()
    return deleted


def _within(entries: list[PackEntry], size: int) -> list[PackEntry]:
    return [e for e in entries if e.offset + e.length <= size - TRAILER_SIZE]


# -- repair index ---------------------------------------------------------------------------------
def repair_index(repo: Repository, *, dry_run: bool = False) -> IndexRepair:
    """Rebuild the index from the packs' headers; see the module docstring."""
    report = IndexRepair(dry_run=dry_run)
    if dry_run:
        _rebuild(repo, report, None)
        return report
    with PruneLock(repo) as lock:
        _rebuild(repo, report, lock)
    return report


def _read_index_objects(repo: Repository,
                        report: IndexRepair) -> tuple[list[str], dict[str, StoredPack]]:
    """Every index object's name, and the packs the readable ones list, with every entry; an
    object that cannot be read is reported and superseded all the same."""
    names = [i.name.split("/", 1)[1] for i in repo.backend.list("index/")]
    listed: dict[str, dict[bytes, PackEntry]] = {}

    def read(name: str) -> IndexContent | KeepwellError | None:
        try:
            return decode_index(repo.get_object("index", name, KIND_INDEX))
        except ObjectNotFoundError:
            return None
        except KeepwellError as exc:
            return exc
        except ValueError as exc:
            return FormatError(str(exc))

    with ThreadPoolExecutor(4) as pool:
        for name, got in zip(names, pool.map(read, names), strict=True):
            if isinstance(got, KeepwellError):
                report.index_damaged.append(f"index/{name}")
                report.warnings.append(f"index/{name} is unreadable ({got}); it is superseded")
            elif got is not None:
                for pack_id, pack_type in zip(got.packs, got.pack_types, strict=True):
                    listed.setdefault(pack_object_name(pack_type, pack_id.hex()), {})
                raw = memoryview(entries_bytes(got.entries)).cast("B")
                for blob_id, n, offset, length, raw_len, btype in ENTRY.iter_unpack(raw):
                    if n < len(got.packs):
                        pack = pack_object_name(got.pack_types[n], got.packs[n].hex())
                        listed[pack].setdefault(
                            blob_id, PackEntry(btype, blob_id, offset, length, raw_len))
    return names, {n: StoredPack(pack_id_of(n), pack_type_of(n), list(es.values()))
                   for n, es in listed.items()}


def _rebuild(repo: Repository, report: IndexRepair, lock: PruneLock | None) -> None:
    damage = repo.damage = load_damage(repo)  # read_pack_header leaves these copies out
    names, listed = _read_index_objects(repo, report)
    stored = stored_packs(repo)  # after the index objects: a listed pack is never "missing"
    pending_names = {i.name for i in repo.backend.list("pending/")}
    records = load_pending(repo, report.warnings)
    unreadable_pending = sorted(pending_names - {r.name for r in records})
    pending = {n for r in records for n in r.packs}
    names_stored = sorted(n for n in stored if n in listed or n not in pending)
    with ThreadPoolExecutor(8) as pool:
        headers = dict(zip(names_stored, pool.map(lambda n: read_pack_header(repo, n), names_stored),
                           strict=True))
    packs: list[StoredPack] = []
    for name in names_stored:
        header = headers[name]
        size = stored[name]
        if header is not None and len(_within(header, size)) == len(header):
            entries = unique_entries(header)
        elif name in listed:
            entries = [e for e in _within(listed[name].entries, size)
                       if not damage.covers(pack_id_of(name), e.id)]
            report.warnings.append(f"{name}: its header cannot be read; the {len(entries)} entries "
                                   "the old index had for it are kept ('keepwell repair packs' "
                                   "verifies its blobs)")
        else:
            report.warnings.append(f"{name} is in no index and its header cannot be read; "
                                   "left alone ('keepwell repair packs' salvages it)")
            continue
        if name not in listed:
            report.packs_added.append(name)
        if entries:
            packs.append(StoredPack(pack_id_of(name), pack_type_of(name), entries))
    report.packs_dropped = sorted(n for n in listed if n not in stored)
    report.packs = len(packs)
    report.blobs = sum(len(p.entries) for p in packs)
    report.index_superseded = len(names)
    changed = bool(report.packs_added or report.packs_dropped or report.index_damaged
                   or _entries_differ(listed, packs))
    if lock is None:
        return
    if changed:
        report.index_written = supersede_index(repo, packs, names, lock.verify)
    else:
        report.index_superseded = 0
    lock.verify()
    for name in unreadable_pending:  # their packs are orphans now: the next prune marks them
        try:
            repo.backend.delete(name)
            report.removed.append(name)
        except ObjectNotFoundError:
            pass
    report.removed += settle_records(repo, damage)


def _entries_differ(listed: dict[str, StoredPack], packs: list[StoredPack]) -> bool:
    old = {(n, e.id, e.offset) for n, p in listed.items() for e in p.entries}
    new = {(pack_object_name(p.type, p.id.hex()), e.id, e.offset) for p in packs for e in p.entries}
    return old != new


# -- repair packs ---------------------------------------------------------------------------------
@dataclass
class _PackState:
    name: str
    verified: list[PackEntry] = field(default_factory=list)
    damaged: set[bytes] = field(default_factory=set)
    why: str = ""
    missing: bool = False
    on_the_way: str | None = None  # a first read failed, a second was whole (`get_whole_pack`)

    @property
    def whole(self) -> bool:
        return not (self.damaged or self.why or self.missing)


def resolve_packs(refs: list[str], known: set[str]) -> list[str]:
    """Pack object names for ``refs``: object names, or pack ids or prefixes of them."""
    out = []
    for ref in refs:
        prefix = ref.strip().lower().rsplit("/", 1)[-1]
        matches = [n for n in known if n.rsplit("/", 1)[1].startswith(prefix)]
        if len(prefix) < 6 or len(matches) != 1:
            raise UsageError(f"{ref!r} names {len(matches)} pack(s) of this repository",
                             hint="give a pack id (at least 6 hex digits) or its object name, "
                                  "as 'keepwell check' reports it")
        out.append(matches[0])
    return sorted(set(out))


def inspect_pack(repo: Repository, name: str, indexed: list[PackEntry]) -> _PackState:
    """Read a pack whole and verify every blob its index entries or its own header name."""
    state = _PackState(name)
    try:
        data, state.on_the_way = get_whole_pack(repo.backend, name)
    except ObjectNotFoundError:
        state.missing = True
        state.damaged = {e.id for e in indexed}
        return state
    if content_name(data) != name.rsplit("/", 1)[1]:
        state.why = "its bytes do not match its name"
    try:
        header, sender = parse_header_and_sender(repo.master, name, data)
        if sender is not None:
            repo.senders[bytes.fromhex(name.rsplit("/", 1)[1])] = sender
    except (KeepwellError, ValueError, IndexError) as exc:
        header = []
        state.why = state.why or f"its header cannot be read ({exc})"
    candidates: dict[bytes, list[PackEntry]] = {}
    for e in indexed + header:
        if e not in candidates.setdefault(e.id, []):
            candidates[e.id].append(e)
    for blob_id, places in candidates.items():
        for e in places:
            stored = data[e.offset:e.offset + e.length]
            try:
                if len(stored) != e.length:
                    raise IntegrityError("truncated")
                repo.open_blob(blob_id, e.type, stored, e.raw_length,
                               repo.sender_of(bytes.fromhex(name.rsplit("/", 1)[1])))
            except KeepwellError:
                continue
            state.verified.append(e)
            break
        else:
            state.damaged.add(blob_id)
    if not state.why and any(e not in state.verified and e.id not in state.damaged for e in indexed):
        state.why = "the index has a blob at a place where the pack does not hold it"
    if not state.why and {e.id for e in indexed} - {e.id for e in header}:
        state.why = "its header does not list every blob the index has in it"
    return state


def _inspect_all(repo: Repository, todo: list[tuple[str, list[PackEntry]]]) -> Iterator[_PackState]:
    with ThreadPoolExecutor(READ_AHEAD) as pool:
        yield from pool.map(lambda job: inspect_pack(repo, *job), todo)


def repair_packs(repo: Repository, names: list[str] | None = None, *,
                 dry_run: bool = False) -> PackRepair:
    """Verify the named packs (default: every indexed one), salvage the damaged ones and take
    them out of the index; see the module docstring."""
    report = PackRepair(dry_run=dry_run)
    if dry_run:
        _repair_packs(repo, names, report, None)
        return report
    with PruneLock(repo) as lock:
        _repair_packs(repo, names, report, lock)
    return report


def _repair_packs(repo: Repository, names: list[str] | None, report: PackRepair,
                  lock: PruneLock | None) -> None:
    repo.refresh_index()
    old_files = sorted(repo.index.files)
    by_pack = indexed_packs(repo)
    listed = listed_packs(repo)  # with those whose every entry was recorded damaged
    stored = stored_packs(repo)
    recorded = {n for r in repo.damage.records.values() for n in r} & set(stored)
    pending = {n for r in load_pending(repo) for n in r.packs}
    candidates = set(by_pack) | listed | (recorded - pending)
    chosen = resolve_packs(names, candidates | set(stored)) if names else sorted(candidates)
    todo = [(n, by_pack[n].entries if n in by_pack else []) for n in chosen]
    broken: list[_PackState] = []
    for state in _inspect_all(repo, todo):
        report.packs_read += not state.missing
        report.blobs_read += len(state.verified) + len(state.damaged)
        if state.on_the_way:
            report.warnings.append(f"{state.name}: {state.on_the_way}")
        if state.missing:
            report.packs_missing.append(state.name)
        elif not state.whole:
            report.packs_damaged.append(state.name)
            report.warnings.append(f"{state.name}: {state.why or 'damaged blobs'}; "
                                   f"{len(state.verified)} blob(s) intact, {len(state.damaged)} damaged")
        if not state.whole:
            broken.append(state)
    report.blobs_damaged = sum(len(s.damaged) for s in broken)
    report.blobs_salvaged = sum(len(s.verified) for s in broken if not s.missing)
    if lock is None or not broken:
        return
    result = repack(repo, [RepackJob(s.name, s.verified) for s in broken
                           if s.verified and not s.missing])
    report.packs_written = result.packs_written
    for name, why in result.damaged.items():  # changed since it was read: left as it is
        report.warnings.append(f"{name} could not be salvaged ({why}); left in the index")
    done = [s for s in broken if s.name not in result.damaged]
    report.damage_record, _ = record_damage(
        repo, {s.name: s.damaged for s in done if s.damaged and not s.missing}, repo.damage)
    gone = {s.name for s in done}
    kept = [p for n, p in by_pack.items() if n not in gone]
    report.index_written = supersede_index(repo, kept, old_files, lock.verify)
    doomed = {s.name: stored[s.name] for s in done if s.name in stored}
    if doomed:
        sessions = {s.id for s in list_sessions(repo, strict=True)}
        report.pending_record = write_pending(repo, time.time(), sessions, doomed)
    settle_records(repo, repo.damage)
