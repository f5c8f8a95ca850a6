"""Repacking: copying the used blobs of partly used packs into new packs, as they are stored.

A stored blob is ``siv ‖ AES-GCM(subkey(id, siv), payload, aad = id ‖ type)``: nothing in it
depends on the pack or the offset it sits at (docs/repository-format.md, "Blob encryption"), so
its stored bytes move between packs unchanged, without decompressing or encrypting again. Each
one is still authenticated (decrypted once, which is cheap next to reading it) before it moves:
a damaged blob is never copied silently. A pack with a damaged or unreadable blob is left whole,
for ``check`` to report.

Reads are ranged (`keepwell.repository.packreader`): the blobs of a pack that are copied are
fetched in runs of neighbours, a few packs ahead of the writer. Writing goes through the engine's `BlobSink`: new packs, then index
objects that list them. Until prune rewrites the index, the copied blobs are indexed twice
(old and new pack), which readers tolerate, so a crash in between loses nothing.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from keepwell.errors import IntegrityError, ObjectNotFoundError
from keepwell.repository.format import PackEntry
from keepwell.repository.index import MasterIndex
from keepwell.repository.packer import BlobSink
from keepwell.repository.packreader import ranges, read_range
from keepwell.repository.repo import Repository

RUN_GAP = 1024 * 1024  # read across unused bytes up to this long rather than start a new request
LOOKAHEAD = 2  # packs read ahead of the writer (bounds memory to a few packs)


@dataclass
class RepackJob:
    name: str  # the pack's object name
    entries: list[PackEntry]  # the blobs to copy out of it


@dataclass
class RepackResult:
    repacked: list[str] = field(default_factory=list)  # packs whose copied blobs are now stored anew
    damaged: dict[str, str] = field(default_factory=dict)  # pack -> why it was left whole
    blobs: int = 0
    bytes: int = 0  # stored bytes copied
    packs_written: int = 0
    index_names: list[str] = field(default_factory=list)


class _CopyTarget(Repository):
    """The repository as the copying sink sees it: an index holding only what was copied so far.

    The sink skips blobs its repository's index knows; the real index knows every blob being
    copied (in its old pack), so the sink gets an index of its own and dedups only among copies.
    """

    def __init__(self, repo: Repository) -> None:
        super().__init__(repo.backend, repo.master, repo.config, repo.key_id)
        self._index = MasterIndex()
        self.events = repo.events  # its pack_stored events reach the caller's subscribers


def _span(e: PackEntry) -> tuple[int, int]:
    return e.offset, e.length


def read_verified(repo: Repository, job: RepackJob) -> list[tuple[PackEntry, bytes]]:
    """The stored bytes of a job's blobs, each authenticated; IntegrityError if one is damaged."""
    out = []
    entries = sorted(job.entries, key=lambda e: e.offset)
    sender = repo.sender_of(bytes.fromhex(job.name.rsplit("/", 1)[1]))
    # a pack is read whole at most, so a range needs no bound of its own
    for r in ranges(entries, _span, max_gap=RUN_GAP, max_range=1 << 62):
        for e, stored in r.pieces(read_range(repo.backend, job.name, r), _span):
            # raises IntegrityError if damaged
            payload = repo.master.decrypt_blob(e.id, e.type, stored, sender)
            if sender is not None:
                # an append key's blob is under its pack's sender key: in a pack of prune's it
                # goes under the master key (the same length, so its entry stays as it is)
                out.append((e, bytes(repo.master.encrypt_blob(e.id, e.type, payload))))
            else:
                out.append((e, bytes(stored)))
    return out


def repack(repo: Repository, jobs: list[RepackJob]) -> RepackResult:
    """Copy each job's blobs into new packs and index them; returns what was done."""
    result = RepackResult()
    if not jobs:
        return result
    sink = BlobSink(_CopyTarget(repo), upload_workers=2)
    try:
        with ThreadPoolExecutor(LOOKAHEAD, thread_name_prefix="kw-repack") as pool:
            window: deque[tuple[RepackJob, Future[list[tuple[PackEntry, bytes]]]]] = deque()
            todo = iter(jobs)
            for job in todo:
                window.append((job, pool.submit(read_verified, repo, job)))
                if len(window) >= LOOKAHEAD:
                    break
            while window:
                job, fut = window.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    window.append((nxt, pool.submit(read_verified, repo, nxt)))
                try:
                    blobs = fut.result()
                except (IntegrityError, ObjectNotFoundError) as exc:
                    result.damaged[job.name] = str(exc)
                    continue
                for e, stored in blobs:
                    if sink.add_stored(e.type, e.id, stored, e.raw_length):
                        result.blobs += 1
                        result.bytes += len(stored)
                result.repacked.append(job.name)
        sink.flush()
    finally:
        sink.close()
    result.packs_written = sink.stats.packs
    result.index_names = list(sink.index_names)
    return result
