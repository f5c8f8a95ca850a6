"""Checking a repository: structure (index ↔ packs, trees, snapshots) and, on request, data.

Reading data downloads packs, checks each against its name (the hash of its bytes), and
decrypts and verifies every blob. Damage is reported with what it affects: which snapshots and
which files inside them reference a damaged or missing blob. Packs that a prune recorded as
pending deletion are not in the index by design and are not reported; a snapshot whose blobs only
such packs hold (a backup that raced a prune) is a warning: a restore finds them there, and the
next prune indexes them again. Whatever makes a snapshot fail to restore is an error: a damaged
snapshot object, a damaged or missing blob, or one that only packs outside the index and the
pending records hold (a restore cannot locate it).

A `DataSubset` says which packs to read: all, a fraction chosen at random (``10%``), group n of
m (``2/5``: the same packs every time, and the m groups together are every pack once, so m runs
read everything), or packs chosen at random up to a total size (``1G``).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from keepwell.crypto import content_name
from keepwell.errors import KeepwellError, ObjectNotFoundError, UsageError
from keepwell.repository.damage import check_findings
from keepwell.repository.format import (
    PACK_PREFIX,
    pack_object_name,
)
from keepwell.repository.index import MasterIndex
from keepwell.repository.packreader import get_whole_pack, parse_header_and_sender
from keepwell.repository.pending import load_pending
from keepwell.repository.repo import Repository
from keepwell.repository.snapshot import Snapshot
from keepwell.repository.tree import DIR, Node, unusable_name
from keepwell.repository.unindexed import UnindexedPacks, load_tree_anywhere

SUBSET_FORMS = "n/m (2/5), a percentage (10%) or a size (1G)"


@dataclass(frozen=True)
class DataSubset:
    """Which packs a check reads (see the module's docstring); ``fraction`` 1: all of them."""

    fraction: float = 0.0
    group: tuple[int, int] | None = None  # (n, m): the n-th of m groups
    size: int | None = None

    @classmethod
    def parse(cls, text: str, what: str = "--read-data-subset") -> DataSubset:
        """``n/m``, ``x%`` (0 < x <= 100; a bare number is a percentage too) or a size with a
        unit (``500M``, ``1G``)."""
        from keepwell.units import parse_percent, parse_size

        value = text.strip()
        n, slash, m = value.partition("/")
        if slash:
            if not (n.strip().isdigit() and m.strip().isdigit()) or not 1 <= int(n) <= int(m):
                raise UsageError(f"{what} {text!r}: n/m needs whole numbers with 1 <= n <= m, "
                                 "like 1/5")
            return cls(group=(int(n), int(m)))
        if value.endswith("%") or value.replace(".", "", 1).isdigit():
            try:
                percent = parse_percent(value, what, sign_required=False)
            except UsageError:
                percent = -1.0
            if not 0 < percent <= 100:
                raise UsageError(f"{what} {text!r}: a percentage must be above 0% and at most "
                                 "100%, like 10%")
            return cls(fraction=percent / 100)
        try:
            size = parse_size(value, what)
        except UsageError:
            raise UsageError(f"{what} {text!r}: expected {SUBSET_FORMS}") from None
        if size <= 0:
            raise UsageError(f"{what} {text!r}: a size must be above 0, like 1G")
        return cls(size=size)

    def __bool__(self) -> bool:
        return bool(self.fraction or self.group or self.size)

    def choose(self, sizes: dict[str, int]) -> list[str]:
        """The pack names (``data/ab/ab12...``) to read among ``sizes`` (name -> bytes)."""
        names = sorted(sizes)
        if self.group is not None:
            n, m = self.group
            return [p for p in names if int(p.rsplit("/", 1)[1][:8], 16) % m == n - 1]
        if self.size is not None:
            random.shuffle(names)
            chosen, total = [], 0
            for p in names:
                if total >= self.size:
                    break
                chosen.append(p)
                total += sizes[p]
            return sorted(chosen)
        if self.fraction < 1 and names:
            return sorted(random.sample(names, max(1, int(len(names) * self.fraction))))
        return names if self.fraction else []


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    packs_read: int = 0
    blobs_checked: int = 0
    affected: dict[str, list[str]] = field(default_factory=dict)  # snapshot id -> paths
    pending_packs: int = 0  # unindexed packs a prune will delete once safe

    @property
    def ok(self) -> bool:
        return not self.errors


def check(repo: Repository, *, read_data_fraction: float = 0.0,
          subset: DataSubset | None = None) -> CheckReport:
    """Check the repository; read the packs ``subset`` chooses (or, without it, the fraction
    ``read_data_fraction`` of them at random: 1 reads all)."""
    if subset is None:
        subset = DataSubset(fraction=read_data_fraction)
    report = CheckReport()
    try:
        index = repo.refresh_index()
    except KeepwellError as exc:
        report.errors.append(f"index: {exc}")
        return report
    stored = {}
    for prefix in PACK_PREFIX.values():
        for info in repo.backend.list(prefix + "/"):
            stored[info.name] = info.size
    referenced_packs = {pack_object_name(t, p.hex()) for p, t in zip(index.pack_ids, index.pack_types, strict=True)}
    bad_blobs: set[bytes] = set()
    found: dict[str, set[bytes]] = defaultdict(set)  # damaged copies, for `check_findings`
    for name in sorted(referenced_packs - set(stored)):
        report.errors.append(f"{name} is in the index but missing from storage")
    unindexed = set(stored) - referenced_packs
    pending = {n for r in load_pending(repo, report.warnings) for n in r.packs} & unindexed
    report.pending_packs = len(pending)
    for name in sorted(unindexed - pending):
        report.warnings.append(f"{name} is not in the index (unfinished or interrupted upload)")
    spare = UnindexedPacks(repo, unindexed)
    by_pack: dict[str, list[tuple[bytes, int, int, int, int]]] = defaultdict(list)
    for blob_id, loc in index.entries():
        name = pack_object_name(loc.pack_type, loc.pack.hex())
        by_pack[name].append((blob_id, loc.type, loc.offset, loc.length, loc.raw_length))
        if name not in stored:
            bad_blobs.add(blob_id)
            found[name].add(blob_id)
    for name in sorted(set(by_pack) & set(stored)):
        # a pack ends with its header and an 8-byte trailer after the last blob: one shorter
        # than that was cut (restores of its blobs fail, and say to run check)
        end = max(off + length for _b, _t, off, length, _r in by_pack[name])
        if stored[name] < end + 8:
            report.errors.append(f"{name}: {stored[name]} bytes stored, fewer than its index "
                                 f"says it holds ({end} bytes of blobs, then its header): "
                                 "truncated")
            bad_blobs.update(b for b, _t, off, length, _r in by_pack[name]
                             if off + length > stored[name])

    if subset:
        names = subset.choose({n: stored[n] for n in by_pack if n in stored})

        def read(name: str) -> tuple[list[str], set[bytes], int]:
            errs: list[str] = []
            bad: set[bytes] = set()
            try:
                data, on_the_way = get_whole_pack(repo.backend, name)
            except KeepwellError as exc:
                if isinstance(exc, ObjectNotFoundError):
                    found[name].update(b[0] for b in by_pack[name])
                return [f"{name}: {exc}"], {b[0] for b in by_pack[name]}, 0
            if on_the_way:
                report.warnings.append(f"{name}: {on_the_way}")
            if content_name(data) != name.rsplit("/", 1)[1]:
                errs.append(f"{name}: content does not match its name (corrupt)")
            try:
                in_header_list, sender = parse_header_and_sender(repo.master, name, data)
                in_header = {e.id: e for e in in_header_list}
            except (KeepwellError, ValueError) as exc:
                errs.append(f"{name}: pack header unreadable: {exc}")
                in_header = {}
                sender = repo.sender_of(bytes.fromhex(name.rsplit("/", 1)[1]))
            if sender != repo.sender_of(bytes.fromhex(name.rsplit("/", 1)[1])):
                errs.append(f"{name}: index and pack header disagree on who wrote the pack")
            n = 0
            for blob_id, btype, off, length, raw in by_pack[name]:
                n += 1
                if in_header and (blob_id not in in_header or in_header[blob_id].offset != off):
                    errs.append(f"{name}: index and pack header disagree on blob {blob_id.hex()[:16]}")
                try:
                    repo.open_blob(blob_id, btype, data[off : off + length], raw, sender)
                except KeepwellError as exc:
                    errs.append(f"{name}: {exc}")
                    bad.add(blob_id)
            if bad:
                found[name].update(bad)
            return errs, bad, n

        with ThreadPoolExecutor(4) as pool:
            for errs, bad, n in pool.map(read, names):
                report.errors.extend(errs)
                bad_blobs |= bad
                report.blobs_checked += n
                report.packs_read += 1

    errors, warnings = check_findings(repo, found if subset else {})
    report.errors += errors
    report.warnings += warnings

    _check_snapshots(repo, index, bad_blobs, UnindexedPacks(repo, pending), spare, report)
    return report


def _check_snapshots(repo: Repository, index: MasterIndex, bad_blobs: set[bytes],
                     pending: UnindexedPacks, spare: UnindexedPacks, report: CheckReport) -> None:
    """Every snapshot must restore: each blob its trees reference is one a restore can locate
    (the index, or a pack pending deletion, which readers find through the pending records) and
    not damaged. A blob that only a pack outside both holds (an orphan: its index object was
    lost, or never written) fails a restore as surely as a missing one: an error too."""
    for snap in repo.list_snapshots():
        awaiting = unindexed = 0
        unusable: list[str] = []
        try:
            root = bytes.fromhex(snap.tree)
            if not index.has(root):
                awaiting, unindexed = (1, 0) if pending.find(root) else (0, 1)
            for path, node in _walk(repo, index, spare, snap, unusable):
                blobs = list(node.content)
                if node.type == DIR and node.subtree is not None:
                    blobs.append(node.subtree)
                outside = [b for b, known in zip(blobs, index.has_each(blobs), strict=True)
                           if not known]
                if any(b in bad_blobs for b in blobs) or any(not spare.find(b) for b in outside):
                    report.affected.setdefault(snap.id, []).append("/" + path)
                elif any(not pending.find(b) for b in outside):
                    unindexed += 1
                elif outside:
                    awaiting += 1
            if unusable:
                more = f" (and {len(unusable) - 1} more directories)" if len(unusable) > 1 else ""
                report.errors.append(
                    f"snapshot {snap.short_id} holds {unusable[0]}{more}: a restore refuses it "
                    "(backup never writes such a name; it was damaged or forged: forget it with "
                    f"'keepwell forget {snap.short_id}')")
            if unindexed:
                report.errors.append(
                    f"snapshot {snap.short_id}: {unindexed} item(s) use blobs that no index lists "
                    "(only packs outside the index hold them), so a restore fails; run 'keepwell "
                    "prune' to index those packs again")
            if awaiting:
                report.warnings.append(
                    f"snapshot {snap.short_id}: {awaiting} item(s) use blobs that only packs "
                    "pending deletion hold (a restore reads them there); run 'keepwell prune' to "
                    "index them again")
        except KeepwellError as exc:
            report.errors.append(f"snapshot {snap.short_id}: {exc}")
            report.affected.setdefault(snap.id, []).append("(its trees)")
    for sid, why in sorted(repo.damaged_snapshots.items()):
        report.errors.append(f"{why} (forget it with 'keepwell forget {sid[:8]}')")
    for sid, paths in report.affected.items():
        report.errors.append(f"snapshot {sid[:8]}: {len(paths)} damaged or missing file(s), e.g. {paths[0]}")


def _walk(repo: Repository, index: MasterIndex, spare: UnindexedPacks, snap: Snapshot,
          unusable: list[str]) -> Iterator[tuple[str, Node]]:
    """Like `Repository.walk`, but also reads trees from packs no index lists, and notes in
    ``unusable`` each directory whose names cannot all be entries of one directory (walked on:
    what else the snapshot lacks is reported too)."""
    stack: list[tuple[bytes, str]] = [(bytes.fromhex(snap.tree), "")]
    while stack:
        tree_id, base = stack.pop()
        subdirs = []
        nodes = load_tree_anywhere(repo, index, spare, tree_id)
        if (why := unusable_name(nodes)) is not None:
            unusable.append(f"{why} in /{base}")
        for node in nodes:
            path = f"{base}/{node.name}" if base else node.name
            yield path, node
            if node.type == DIR and node.subtree is not None:
                subdirs.append((node.subtree, path))
        stack.extend(reversed(subdirs))
