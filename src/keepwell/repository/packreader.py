"""Reading packs: their headers, and their blobs in ranged requests.

Everything that reads blobs out of packs (restore, copy, repack, check, repair) goes through
here, so the rules are written once: where a blob is (`locate_packs`, through
`Repository.locate`, which also knows packs pending deletion), how wanted blobs of one pack
become few ranged requests (`ranges`), what a short read means (`read_range`: a truncated pack),
how a stored blob is verified (`open_payload`, beside `Repository.open_blob`), and how a pack
describes itself (`parse_header`, `read_header`). `PackReader` puts them together: blobs by
id, packs on a few threads.

Words:
    want    one blob to read from a pack: anything with its offset and stored length in the pack
            (a caller's own record, so it can carry what the blob is for).
    range   a run of wants of one pack read with one request: the bytes between two of them are
            read over when the gap is at most ``max_gap``, and a range spans at most
            ``max_range`` bytes (unless one blob is larger), which bounds what a reader holds.
    stored  a blob's bytes as they sit in its pack (encrypted, maybe compressed); never handed
            on before it is verified.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Generic, TypeVar

from keepwell.backends.base import Backend
from keepwell.compression import unpack_payload
from keepwell.crypto import content_name, keyed_id
from keepwell.errors import IntegrityError, KeepwellError, ObjectNotFoundError
from keepwell.repository.events import Events
from keepwell.repository.format import (
    KIND_PACK_HEADER,
    TRAILER_SIZE,
    PackEntry,
    decode_pack_header,
    pack_object_name,
    parse_trailer,
)
from keepwell.repository.keyring import Keyring
from keepwell.repository.store import RepositoryStore

MAX_GAP = 256 * 1024  # unwanted bytes read over rather than start another request
MAX_RANGE = 8 * 1024 * 1024  # bytes one request covers at most
HEADER_TAIL = 64 * 1024  # bytes of a pack's end read at first for its header

W = TypeVar("W")
Span = Callable[[W], tuple[int, int]]  # a want's (offset, stored length) in its pack


@dataclass(frozen=True, slots=True)
class Range(Generic[W]):
    start: int
    end: int
    wants: Sequence[W]

    def pieces(self, data: memoryview, span: Span[W]) -> Iterator[tuple[W, memoryview]]:
        """Each want of the range with its stored bytes, cut from the range's ``data``."""
        for w in self.wants:
            offset, length = span(w)
            yield w, data[offset - self.start : offset - self.start + length]


def ranges(wants: Sequence[W], span: Span[W], *, max_gap: int = MAX_GAP,
           max_range: int = MAX_RANGE) -> list[Range[W]]:
    """Wants of one pack, sorted by offset, in runs each read with one request."""
    out: list[Range[W]] = []
    i = 0
    while i < len(wants):
        start, length = span(wants[i])
        end = start + length
        j = i + 1
        while j < len(wants):
            offset, length = span(wants[j])
            if offset - end > max_gap or offset + length - start > max_range:
                break
            end = max(end, offset + length)
            j += 1
        out.append(Range(start, end, wants[i:j]))
        i = j
    return out


def read_range(backend: Backend, name: str, r: Range[W]) -> memoryview:
    """The bytes of one range of pack ``name``; IntegrityError if the pack ends before it."""
    data = memoryview(backend.get(name, r.start, r.end - r.start))
    if len(data) != r.end - r.start:
        raise IntegrityError(f"{name} of {backend.location} is shorter than its index says "
                             "(truncated pack)", hint="run 'keepwell check' to see what is affected")
    return data


def open_range(backend: Backend, name: str, r: Range[W], span: Span[W],
               open_one: Callable[[W, memoryview], bytes],
               first: Callable[[], memoryview] | None = None,
               ) -> Iterator[tuple[W, bytes | KeepwellError]]:
    """Each want of range ``r`` of pack ``name`` with its verified plain bytes (``open_one``
    decrypts and checks one), or the error that stopped it. ``first`` reads the range (a
    prefetched read, say; `read_range` by default). A range that could not be read, or any of
    whose blobs failed its check, is read once more for the blobs it did not serve: bytes
    damaged or cut short on the way (a faulty link, proxy or server), or a wrong "not found",
    must not fail a restore that a second read serves. Blobs are handed on one at a time, as
    they are verified, so memory stays one range and one blob."""
    retry: list[W] = []
    try:
        data = first() if first is not None else read_range(backend, name, r)
    except KeepwellError:
        retry = list(r.wants)
    else:
        for w, stored in r.pieces(data, span):
            try:
                plain = open_one(w, stored)
            except KeepwellError:
                retry.append(w)
                continue
            yield w, plain
        del data
    if not retry:
        return
    again = Range(r.start, r.end, retry)
    try:
        data = read_range(backend, name, again)
    except KeepwellError as exc:
        for w in retry:
            yield w, exc
        return
    for w, stored in again.pieces(data, span):
        try:
            yield w, open_one(w, stored)
        except KeepwellError as exc:
            yield w, exc


def get_whole_pack(backend: Backend, name: str) -> tuple[bytes, str | None]:
    """A whole pack the storage lists, for the commands that judge its damage (check, repair):
    when its bytes do not match its name, or the storage says it is missing, it is read once
    more, since bytes damaged on the way (a faulty link, proxy or server) or a wrong answer
    must not be taken for damage in storage, which would be recorded and would take intact
    data out of use. Returns the bytes (the second read's, when it was needed) and, when a
    first read failed and the second came back whole, what the first met (for a warning).
    ObjectNotFoundError when both reads found it missing."""
    first = "bytes that do not match its name"
    try:
        data = backend.get(name)
        if content_name(data) == name.rsplit("/", 1)[1]:
            return data, None
    except ObjectNotFoundError:
        first = "no such object"
    again = backend.get(name)
    if content_name(again) != name.rsplit("/", 1)[1]:
        return again, None
    return again, (f"a first read returned {first}, a second the pack whole: something between "
                   "the storage and this machine returns wrong answers (nothing was recorded; "
                   "check the network, proxies and the storage server)")


def read_pack(backend: Backend, name: str, wants: Sequence[W], span: Span[W], *,
              max_gap: int = MAX_GAP, max_range: int = MAX_RANGE) -> Iterator[tuple[W, memoryview]]:
    """The stored bytes of each want of pack ``name`` (sorted by offset), a range at a time.
    An error reading a range ends the iteration; callers that go on past it use `ranges` and
    `read_range` themselves."""
    for r in ranges(wants, span, max_gap=max_gap, max_range=max_range):
        yield from r.pieces(read_range(backend, name, r), span)


# -- where blobs are ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Want:
    """A blob to read, where `Repository.locate` found it."""

    blob_id: bytes
    type: int
    offset: int
    length: int
    raw_length: int
    sender: bytes | None = None  # its pack's writer, if an append key (`Repository.sender_of`)


def want_span(w: Want) -> tuple[int, int]:
    return w.offset, w.length


def locate_packs(repo: RepositoryStore, ids: Iterable[bytes]) -> dict[str, list[Want]]:
    """The blobs ``ids`` grouped by the pack object that holds them, each list sorted by offset;
    found through `Repository.locate_many` (the index, then packs pending deletion), so a
    snapshot committed by a backup that raced a prune reads as well as any other.
    IntegrityError names the first blob found nowhere."""
    ids = list(ids)
    plan: dict[str, list[Want]] = {}
    for blob_id, loc in zip(ids, repo.locate_many(ids), strict=True):
        if loc is None:
            raise IntegrityError(
                f"blob {blob_id.hex()[:16]} is used by a snapshot of {repo.backend.location} "
                "but is not in its index", hint="run 'keepwell check' on that repository")
        name = pack_object_name(loc.pack_type, loc.pack.hex())
        plan.setdefault(name, []).append(
            Want(blob_id, loc.type, loc.offset, loc.length, loc.raw_length,
                 repo.sender_of(loc.pack)))
    for wants in plan.values():
        wants.sort(key=lambda w: w.offset)
    return plan


# -- verifying ------------------------------------------------------------------------------------
def open_payload(repo: RepositoryStore, want: Want, stored: bytes | memoryview) -> bytes:
    """Decrypt one stored blob and verify it against its id; return its payload as stored
    (maybe compressed), for a copy that need not compress it again. IntegrityError names the
    blob and the repository."""
    where = repo.backend.location
    try:
        payload = repo.master.decrypt_blob(want.blob_id, want.type, stored, want.sender)
    except IntegrityError as exc:
        raise IntegrityError(f"{exc} in {where}", hint=f"run 'keepwell check --read-data' on "
                             f"{where} to see what is affected") from None
    plain = unpack_payload(payload, want.raw_length)
    if len(plain) != want.raw_length or keyed_id(repo.id_key, plain) != want.blob_id:
        raise IntegrityError(f"blob {want.blob_id.hex()[:16]} of {where} does not match its id")
    return payload


Handler = Callable[[Want, memoryview], None]


class PackReader:
    """Reads blobs of a repository by id, grouped by pack (`locate_packs`): nearby blobs in one
    ranged request, packs on a few threads. Each stored blob is handed to ``handle`` in a
    worker thread; ``handle`` must verify it (`open_payload`, `Repository.open_blob`) before
    using it. Every range read is counted and told as a ``copy_read`` event."""

    def __init__(self, repo: RepositoryStore, events: Events, *, workers: int = 4) -> None:
        self.repo = repo
        self.events = events
        self.bytes_read = 0
        self.blobs_read = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kw-pack-read")

    def read(self, ids: Iterable[bytes], handle: Handler) -> None:
        futures = [self._pool.submit(self._read_pack, name, wants, handle)
                   for name, wants in locate_packs(self.repo, ids).items()]
        try:
            for fut in futures:
                fut.result()
        except BaseException:
            # let no reader hand a blob to a writer that is being aborted
            for fut in futures:
                fut.cancel()
            wait(futures)
            raise

    def _read_pack(self, name: str, wants: list[Want], handle: Handler) -> None:
        for r in ranges(wants, want_span):
            handed = 0
            try:
                data = read_range(self.repo.backend, name, r)
                for w, stored in r.pieces(data, want_span):
                    handle(w, stored)
                    handed += 1
            except KeepwellError:
                # read once more for the blobs not handed on (see `open_range`): a range cut
                # short or damaged on the way is no damage in storage; a second failure stands
                rest = Range(r.start, r.end, r.wants[handed:])
                data = read_range(self.repo.backend, name, rest)
                for w, stored in rest.pieces(data, want_span):
                    handle(w, stored)
            self.count(len(data), len(r.wants))

    def count(self, nbytes: int, blobs: int) -> None:
        with self._lock:
            self.bytes_read += nbytes
            self.blobs_read += blobs
        self.events.emit("copy_read", n=nbytes, blobs=blobs)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# -- headers --------------------------------------------------------------------------------------
def parse_header(master: Keyring, name: str, data: bytes | memoryview) -> list[PackEntry]:
    """The blobs pack ``name`` lists in its header, from the pack's bytes (whole, or at least
    its header and trailer). ValueError or IntegrityError if it cannot be read; a tail too
    short to hold the header is ValueError too (`read_header` reads more)."""
    return parse_header_and_sender(master, name, data)[0]


def parse_header_and_sender(master: Keyring, name: str, data: bytes | memoryview
                            ) -> tuple[list[PackEntry], bytes | None]:
    """`parse_header`, and the pack's writer if an append key wrote it (None: a full key)."""
    if len(data) < TRAILER_SIZE:
        raise ValueError(f"{name} is too short to be a pack")
    hlen = parse_trailer(bytes(data[-TRAILER_SIZE:]))
    if hlen + TRAILER_SIZE > len(data):
        raise ValueError(f"{name}: its header is longer than the bytes read")
    header = bytes(data[len(data) - TRAILER_SIZE - hlen : len(data) - TRAILER_SIZE])
    plain = master.decrypt_object(KIND_PACK_HEADER, header, name)
    try:
        return decode_pack_header(plain), master.object_sender(header)
    except struct.error:
        raise ValueError(f"{name}: its header is truncated") from None


def read_header(backend: Backend, master: Keyring, name: str) -> list[PackEntry]:
    """The blobs pack ``name`` lists in its header, read from the pack's end (one request, two
    if the header is longer than `HEADER_TAIL`). Errors as `parse_header` and the backend's."""
    return read_header_and_sender(backend, master, name)[0]


def read_header_and_sender(backend: Backend, master: Keyring, name: str
                           ) -> tuple[list[PackEntry], bytes | None]:
    """`read_header`, and the pack's writer if an append key wrote it (None: a full key)."""
    size = backend.stat(name).size
    tail = backend.get(name, max(0, size - HEADER_TAIL))
    if len(tail) < TRAILER_SIZE:
        raise ValueError(f"{name} is too short to be a pack")
    hlen = parse_trailer(tail)
    if hlen + TRAILER_SIZE > len(tail):
        tail = backend.get(name, max(0, size - TRAILER_SIZE - hlen))
    return parse_header_and_sender(master, name, tail)
