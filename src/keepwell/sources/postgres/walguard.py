"""The WAL fetch of a restore: what recovery may read, and what it must not be given.

``restore_command`` is the one door through which archived WAL reaches a restored server, so
the fetch (`fetch_segment`) guards it:

- *Tablespaces.* Every segment is scanned (``pg_waldump``) before the server sees it. A
  ``CREATE TABLESPACE`` record is redirected (`walrecords.rewrite_location`) as the restore's
  `FetchPolicy` (options of its ``restore_command``) says: into ``pg_tblspc/<oid>`` inside the
  data directory (an in-place tablespace; what a restore asks for), to a directory the user
  named (``--tablespace-map OID=DIR`` or ``--tablespace-map-all DIR``, if the path fits in the
  record; otherwise in place, with a note), or kept where the record says (when the user named
  exactly that path, or in a ``restore_command`` written by hand). A location in use by a
  running server is never handed on.
- *Gaps.* A segment missing from the archive while the archive goes on after it is a gap, not
  the end of the WAL: the fetch aborts recovery (`hooks.FETCH_FAILED`, which PostgreSQL treats as
  fatal) instead of letting the server end recovery and promote early, unless the policy allows
  the gap (``--allow-gap``); then the server log says where recovery ends and why.
- *Failures.* Any failure to fetch the segment asked for aborts recovery too (only "not
  archived" ends it). Toward a target (``--target point``) a gap or an unreadable segment
  ends recovery instead, with a note in the server log: PostgreSQL reads WAL ahead of what it
  replays, so it may ask for segments past its target, and it fails by itself ("recovery
  ended before configured recovery target was reached") when the target lies beyond. A damaged segment *ahead* of it only ends the read-ahead: the segment
  asked for is handed on, and the damaged one fails when (and if) recovery reaches it.
- *Identity.* Each segment's system identifier (its page header) must be the cluster's.

Read-ahead (``pg_wal/keepwell-prefetch``): on a miss the fetch reads the asked-for segment and
up to `prefetch` more. A record can run on into the next segment, so a segment is handed out
only once the records that cross its end were scanned: the last segment of a batch stays
*pending* (``NAME.pending``) until the next batch scans it with its successor, unless the
archive ends there; then a link to it (``NAME.tail``) stays so that a successor archived later
(a standby following the archive) is scanned with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass, field

from keepwell.errors import KeepwellError, UsageError
from keepwell.sources.postgres.archive import WalArchive
from keepwell.sources.postgres.catalog import Catalog
from keepwell.sources.postgres.errors import (
    ForeignClusterError,
    PostgresError,
    WalNotFoundError,
)
from keepwell.sources.postgres.liveservers import LivePaths
from keepwell.sources.postgres.spool import fsync_dir
from keepwell.sources.postgres.walnames import (
    parse_segment_name,
    read_segment_header,
    segment_name,
    wal_kind,
)
from keepwell.sources.postgres.walrecords import (
    TablespaceCreate,
    WalLayout,
    rewrite_location,
    scan_creates,
    segment_major,
)


class RecoveryAbort(PostgresError):
    """Recovery must stop with an error rather than end (and promote) where it is."""

    hint = "see the restored server's log; the restore did not reach its target"


class WalGapError(RecoveryAbort):
    hint = ("restore to a point before the gap, or pass --allow-gap to accept that recovery"
            " ends there")


@dataclass
class FetchPolicy:
    """What a restore allows its recovery; written into its ``restore_command`` as options.

    ``tablespaces``: ``inside`` (a restore's: every tablespace the WAL creates is kept in the data
    directory unless mapped) or ``as-recorded`` (a ``restore_command`` written by hand: the
    record's own location, if no running server uses it)."""

    tablespaces: str = "as-recorded"
    tablespace_map: dict[str, str] = field(default_factory=dict)  # oid -> directory
    tablespace_map_all: str | None = None
    timeline: int | None = None
    allow_gap: bool = False
    # "end": recovery must reach the end of the archive; "point": it stops at a target before;
    # "follow": a standby, which waits at the end of the archive for more
    target: str = "end"

    def args(self) -> list[str]:
        out = ["--tablespaces", self.tablespaces]
        for oid, directory in sorted(self.tablespace_map.items()):
            out += ["--tablespace-map", f"{oid}={directory}"]
        if self.tablespace_map_all:
            out += ["--tablespace-map-all", self.tablespace_map_all]
        if self.timeline:
            out += ["--timeline", str(self.timeline)]
        if self.allow_gap:
            out.append("--allow-gap")
        if self.target != "end":
            out += ["--target", self.target]
        return out

    @classmethod
    def parse(cls, *, tablespaces: str | None = None, tablespace_map: list[str] | None = None,
              tablespace_map_all: str | None = None, timeline: str | None = None,
              allow_gap: bool = False, target: str | None = None) -> FetchPolicy:
        if tablespaces not in (None, "inside", "as-recorded"):
            raise UsageError(f"--tablespaces is 'inside' or 'as-recorded', not {tablespaces!r}")
        if target not in (None, "end", "point", "follow"):
            raise UsageError(f"--target is 'end', 'point' or 'follow', not {target!r}")
        mapping = {}
        for item in tablespace_map or []:
            oid, sep, directory = item.partition("=")
            if not sep or not oid.isdigit() or not directory:
                raise UsageError(f"invalid --tablespace-map {item!r} (use OID=DIR)")
            mapping[oid] = directory
        try:
            tli = int(timeline) if timeline else None
        except ValueError:
            raise UsageError(f"invalid --timeline {timeline!r}") from None
        return cls(tablespaces or "as-recorded", mapping, tablespace_map_all, tli, allow_gap,
                   target or "end")

    def wanted_location(self, oid: str) -> str | None:
        """The directory the user named for tablespace `oid`, if any."""
        if oid in self.tablespace_map:
            return self.tablespace_map[oid]
        if self.tablespace_map_all:
            return os.path.join(self.tablespace_map_all, oid)
        return None


def _note(message: str) -> None:
    sys.stderr.write(f"keepwell: {message}\n")
    sys.stderr.flush()


def redirect(create: TablespaceCreate, policy: FetchPolicy, live: LivePaths
             ) -> tuple[str | None, str | None]:
    """(new location or None to keep the record, a note) for one CREATE TABLESPACE record."""
    if not create.location:
        return None, None  # in place already (WAL of a cluster restored by keepwell)
    wanted = policy.wanted_location(create.oid)
    if wanted is None and policy.tablespaces == "inside":
        return "", None
    if wanted is None:
        conflict = live.conflict(create.location)
        if conflict:
            raise RecoveryAbort(
                f"the WAL creates tablespace {create.oid} at {create.location}, and {conflict}:"
                " replaying it would overwrite that server's files",
                hint="restore with 'keepwell postgres restore', which keeps the tablespace in"
                     " the restored data directory (or fetch with --tablespaces inside)")
        return None, None
    if os.path.realpath(wanted) == os.path.realpath(create.location):
        conflict = live.conflict(create.location)
        if conflict:
            raise RecoveryAbort(f"tablespace {create.oid} was to be restored at {conflict}",
                                hint="map it elsewhere (--tablespace-map OID=DIR)")
        return None, None
    if len(wanted.encode()) > len(create.location.encode()):
        return "", (f"tablespace {create.oid}, created by the replayed WAL at {create.location},"
                    f" is kept inside the data directory (pg_tblspc/{create.oid}): {wanted} is"
                    f" longer than the {len(create.location.encode())} bytes the WAL record holds")
    conflict = live.conflict(wanted)
    if conflict:
        raise RecoveryAbort(f"tablespace {create.oid} was to be restored at {conflict}",
                            hint="map it elsewhere (--tablespace-map OID=DIR)")
    if os.path.isdir(wanted) and os.listdir(wanted):
        raise RecoveryAbort(f"tablespace {create.oid} was to be restored at {wanted}, which is"
                            " not empty", hint="map it to an empty or new directory")
    os.makedirs(wanted, 0o700, exist_ok=True)
    return wanted, None


class _Prefetch:
    """The read-ahead directory and its three kinds of files (see the module docstring)."""

    def __init__(self, directory: str) -> None:
        self.dir = directory

    def cleared(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def pending(self, name: str) -> str:
        return os.path.join(self.dir, name + ".pending")

    def tail(self, name: str) -> str:
        return os.path.join(self.dir, name + ".tail")

    def work(self, name: str) -> str:
        return os.path.join(self.dir, name + ".work")

    def clean_before(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.dir):
                base = entry.name.split(".", 1)[0]
                stale = base < name or ".kwtmp" in entry.name or entry.name.endswith(".work")
                if entry.is_file() and stale:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)


def missing(cat: Catalog, name: str, timeline: int) -> KeepwellError:
    """Why `name` cannot be fetched: the end of the archived WAL (`WalNotFoundError`, which ends
    recovery normally), or a gap (`WalGapError`) when the archive goes on after it on the
    timelines recovery follows."""
    end = WalNotFoundError(f"WAL file {name} is not in the repository")
    parsed = parse_segment_name(name, cat.segment_size)
    if parsed is None:
        return end
    lineage = cat.lineage(timeline)
    if cat.segment_for(parsed[1], lineage) != name:
        return end  # recovery probing another timeline for this segment
    later = [n for n in list(cat.wal) + list(cat.partials)
             if (p := parse_segment_name(n, cat.segment_size)) is not None and p[1] > parsed[1]
             and cat.segment_for(p[1], lineage) == n]
    if not later:
        return end
    return WalGapError(
        f"WAL segment {name} is missing from the archive, which goes on to {max(later)}:"
        " recovery would end at the gap and lose everything archived after it")


GAP_GRACE = 60.0  # seconds a gap may take to fill: archiving uploads batches side by side


def _wait_for_gap(archive: WalArchive, name: str, timeline: int,
                  gap: KeepwellError) -> KeepwellError | None:
    """A gap found while archiving runs may be a segment still on its way (two batches are
    uploaded at once, so a later one can land first): look again for a while. None when the
    segment arrived."""
    import time

    deadline = time.monotonic() + GAP_GRACE
    while time.monotonic() < deadline:
        time.sleep(2.0)
        cat = archive.catalog(refresh=True)
        if cat.find(name) is not None:
            return None
        gap = missing(cat, name, timeline)
        if not isinstance(gap, WalGapError):
            return gap
    return gap


def _not_archived(archive: WalArchive, cat: Catalog, name: str, timeline: int,
                  policy: FetchPolicy) -> None:
    """Raise what a missing `name` means under `policy`, unless it arrives after all."""
    why: KeepwellError | None = missing(cat, name, timeline)
    if isinstance(why, WalGapError) and policy.target == "end" and not policy.allow_gap:
        why = _wait_for_gap(archive, name, timeline, why)
    if why is None:
        return
    if isinstance(why, WalGapError) and policy.target == "follow":
        # a standby asks again and again: the server log says why it does not advance
        raise WalNotFoundError(f"{why}; the standby waits for it")
    if isinstance(why, WalGapError) and policy.target == "point":
        # recovery (or PostgreSQL's read-ahead) past a target: if the target lies beyond the
        # gap, PostgreSQL fails with "recovery ended before configured recovery target was
        # reached"
        raise WalNotFoundError(f"{why}; recovery toward its target ends here")
    if isinstance(why, WalGapError) and policy.allow_gap:
        raise WalNotFoundError(f"{why}; recovery ends here, as --allow-gap allows")
    raise why


def fetch_segment(name: str, dest: str, archive: WalArchive, *, prefetch: int,
                  prefetch_dir: str, policy: FetchPolicy) -> str:
    """Hand archived WAL file `name` to recovery at `dest`, guarded as the module says."""
    cat = archive.catalog()
    timeline = policy.timeline or cat.latest_timeline()
    if cat.find(name) is None:
        _not_archived(archive, cat, name, timeline, policy)
        cat = archive.catalog()  # the segment arrived while the gap was watched
    parsed = parse_segment_name(name, cat.segment_size)
    if wal_kind(name) != "segment" or parsed is None:
        archive.fetch(name, dest)
        return "fetched"
    tli, segno = parsed
    pre = _Prefetch(prefetch_dir)
    os.makedirs(pre.dir, 0o700, exist_ok=True)
    pre.clean_before(segment_name(tli, segno - 1, cat.segment_size))
    files = _gather(name, tli, segno, cat, archive, pre, prefetch, policy)
    end = len(files) < prefetch + 2  # the archive (or its readable part) ends in this batch
    _guard(files, tli, segno, cat, pre, policy, handed_tail=os.path.exists(
        pre.tail(segment_name(tli, segno - 1, cat.segment_size))))
    names = [n for n, _ in files]
    for n, path in files[:-1] if not end else files:
        os.replace(path, pre.cleared(n))
    if not end:
        os.replace(files[-1][1], pre.pending(names[-1]))
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pre.tail(names[-1]))
        try:
            os.link(pre.cleared(names[-1]), pre.tail(names[-1]))
        except OSError:  # a filesystem without hard links
            shutil.copyfile(pre.cleared(names[-1]), pre.tail(names[-1]))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pre.tail(segment_name(tli, segno - 1, cat.segment_size)))
    os.replace(pre.cleared(name), dest)
    fsync_dir(os.path.dirname(os.path.abspath(dest)))
    return "fetched"


def _gather(name: str, tli: int, segno: int, cat: Catalog, archive: WalArchive,
            pre: _Prefetch, prefetch: int, policy: FetchPolicy) -> list[tuple[str, str]]:
    """(name, working file) of the asked-for segment and those after it, read ahead; a
    segment ahead that cannot be read (or is not this cluster's) ends the batch quietly. The
    asked-for one failing aborts recovery to the end; toward a target it ends recovery there
    (PostgreSQL reads ahead of its target, and fails by itself if the target lies beyond)."""
    out: list[tuple[str, str]] = []
    for i in range(prefetch + 2):
        n = segment_name(tli, segno + i, cat.segment_size)
        if cat.find(n) is None:
            break
        work = pre.work(n)
        try:
            if os.path.exists(pre.pending(n)):
                os.replace(pre.pending(n), work)
            elif os.path.exists(pre.cleared(n)):
                os.replace(pre.cleared(n), work)
            else:
                archive.fetch(n, work)
            check_segment_identity(n, work, cat)
        except KeepwellError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(work)
            if i == 0 and policy.target == "point":
                raise WalNotFoundError(f"WAL file {n} cannot be restored: {exc}; recovery"
                                       " toward its target ends here") from None
            if i == 0:
                raise RecoveryAbort(f"WAL file {n} cannot be restored: {exc}") from None
            _note(f"WAL file {n} could not be read ahead ({exc}); it is fetched again"
                  " when recovery reaches it")
            break
        except OSError as exc:
            if i == 0:
                raise
            _note(f"WAL file {n} could not be read ahead ({exc}); it is fetched again when"
                  " recovery reaches it")
            break
        out.append((n, work))
    return out


def check_segment_identity(name: str, path: str, cat: Catalog) -> None:
    """A segment about to be handed to recovery must be of the cluster's system identifier."""
    with open(path, "rb") as f:
        header = read_segment_header(f.read(64))
    if header is None:
        raise PostgresError(f"WAL file {name} has no valid page header")
    if cat.system_identifier is not None and header.system_identifier != cat.system_identifier:
        raise ForeignClusterError(
            f"WAL file {name} comes from the cluster with system identifier"
            f" {header.system_identifier}, but cluster '{cat.cluster}' is {cat.system_identifier}")


def _guard(files: list[tuple[str, str]], tli: int, segno: int, cat: Catalog, pre: _Prefetch,
           policy: FetchPolicy, *, handed_tail: bool) -> None:
    """Scan the batch (with the segment handed out last, if its end was not scanned) and
    redirect the CREATE TABLESPACE records in it."""
    paths = dict(files)
    prev = segment_name(tli, segno - 1, cat.segment_size)
    if handed_tail:
        paths[prev] = pre.tail(prev)
    first = prev if handed_tail else files[0][0]
    major = segment_major(files[0][1])
    if major is None:
        raise RecoveryAbort(f"WAL file {files[0][0]} is of no PostgreSQL version keepwell knows")
    scan_dir = os.path.join(pre.dir, ".scan")
    shutil.rmtree(scan_dir, ignore_errors=True)
    os.makedirs(scan_dir, 0o700)
    try:
        for n, p in paths.items():
            os.symlink(os.path.abspath(p), os.path.join(scan_dir, n))
        creates = scan_creates(scan_dir, first, files[-1][0], major)
    finally:
        shutil.rmtree(scan_dir, ignore_errors=True)
    if not creates:
        return
    with open(files[0][1], "rb") as f:
        page_size = int.from_bytes(f.read(40)[36:40], "little") or 8192
    layout = WalLayout(tli, cat.segment_size, page_size, paths.get)
    live = LivePaths(ours=os.getcwd())
    for create in creates:
        if handed_tail and create.lsn.segno(cat.segment_size) < segno:
            runs = layout.positions(create.lsn, _record_length(layout, create))
            if all(path == paths[prev] for path, _, _ in runs):
                continue  # scanned with the batch that handed that segment out
            new, _ = redirect(create, policy, live)
            if new is not None:
                raise RecoveryAbort(
                    f"the CREATE TABLESPACE record at {create.lsn} began in WAL file {prev},"
                    " which recovery has read already, so it cannot be redirected",
                    hint="restore again: the fetch then reads both segments before handing out"
                         " the first")
            continue
        new, note = redirect(create, policy, live)
        if note:
            _note(note)
        if new is not None:
            rewrite_location(layout, create, new)
            where = new or f"pg_tblspc/{create.oid} in the data directory"
            _note(f"tablespace {create.oid}, created by the replayed WAL at {create.location},"
                  f" is restored to {where}")


def _record_length(layout: WalLayout, create: TablespaceCreate) -> int:
    head = layout.read(create.lsn, 4)
    return int.from_bytes(bytes(head), "little")



