"""Turning blobs into packs and packs into uploads: the write half of the pipeline.

`BlobSink` is shared by all threads of one writing process. ``save`` hashes, checks the index,
compresses and encrypts in the calling thread (native code that releases the GIL), appends the
result to the open pack of its type, and hands a full pack to a bounded pool of upload threads.
Every few packs (and at ``flush``) an index object is written for the packs stored so far, so a
run that is killed later still leaves its uploads findable for the next run; only then do their
blobs enter the in-memory index that other writers of the process dedup against (until then the
sink knows them as its own, ``_held``). Order on storage: packs → index → (caller) snapshot.

Nothing is indexed before it is known whole: a pack whose builder met a failed write is
discarded, never stored; a stored pack is one whose backend accepted all of it (the local spool
names it by the hash of the bytes the kernel took and links it only after checking its length
and syncing it). A failed write fails the sink: every later ``save`` raises it, and ``flush``
indexes the packs that were stored whole, then raises it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from keepwell.backends.spool import Spool
from keepwell.compression import Levels, pack_payload
from keepwell.crypto import content_name, keyed_id
from keepwell.errors import ObjectExistsError
from keepwell.repository.format import (
    DATA,
    KIND_PACK_HEADER,
    TREE,
    PackEntry,
    encode_pack_header,
    pack_object_name,
    pack_trailer,
)
from keepwell.repository.index import IndexContent, encode_entries
from keepwell.repository.store import RepositoryStore

if TYPE_CHECKING:
    from keepwell.backends.base import Backend


PACK_TARGET = {DATA: 16 * 1024 * 1024, TREE: 4 * 1024 * 1024}
INDEX_EVERY_PACKS = 4
UPLOAD_WORKERS = 4  # packs uploaded at once by one sink (and where adaptive uploads start)
INDEX_EVERY_SECONDS = 10.0


class PackBuilder:
    """A pack being filled. Its bytes go into a spool file of the backend where it offers one
    (the local backend: a file on the repository's filesystem, linked into place when the pack
    is complete; a remote one: a file in the cache directory, uploaded from there), else into
    memory; either way the pack is named by the hash of its bytes.

    A blob's entry is recorded only once its bytes were written. A write that fails spoils the
    builder (``failed``): it can neither take more blobs nor be stored, only discarded."""

    def __init__(self, blob_type: int, backend: Backend) -> None:
        self.type = blob_type
        self.entries: list[PackEntry] = []
        self.size = 0
        self.failed: BaseException | None = None
        self._backend = backend
        self._spool: Spool | None = None
        self.buf = bytearray()  # when not spooled

    def add(self, blob_id: bytes, stored: bytes | bytearray, raw_length: int) -> None:
        offset = self.size
        self._write(stored)
        self.entries.append(PackEntry(self.type, blob_id, offset, len(stored), raw_length))

    def _write(self, data: bytes | bytearray) -> None:
        if self.failed is not None:
            raise self.failed
        try:
            if self.size == 0:  # opened at the first blob: a builder may stay empty
                open_spool = getattr(self._backend, "open_spool", None)
                if open_spool is not None:
                    self._spool = open_spool()  # None: a wrapper over a backend without
            if self._spool is not None:
                self._spool.write(data)
            else:
                self.buf += data
        except BaseException as exc:
            self.failed = exc
            raise
        self.size += len(data)

    def __len__(self) -> int:
        return self.size

    def store(self, repo: RepositoryStore) -> str:
        """Close the pack with its encrypted header and store it; its name (hex) is returned.
        A pack of that name being there already is fine: same name, same bytes."""
        header = repo.master.encrypt_object(KIND_PACK_HEADER, encode_pack_header(self.entries))
        self._write(header)
        self._write(pack_trailer(len(header)))
        try:
            if self._spool is not None:
                # the hash of what the file holds (its length checked); the backend stores it
                # from the file: the local one links it, a remote one uploads it, each retry
                # reading it again from the start
                pack_hex = self._spool.hexdigest()
                name = pack_object_name(self.type, pack_hex)
                repo.backend.put(name, self._spool)
            else:
                pack_hex = content_name(self.buf)
                name = pack_object_name(self.type, pack_hex)
                repo.backend.put(name, self.buf)
        except ObjectExistsError:
            pass  # same name means same bytes: already stored
        except BaseException as exc:
            self.failed = exc
            raise
        self.buf = bytearray()
        return pack_hex

    def discard(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self.buf = bytearray()


@dataclass
class SinkStats:
    blobs_new: int = 0
    blobs_known: int = 0
    bytes_raw_new: int = 0
    bytes_stored: int = 0
    packs: int = 0
    by_type: dict[int, int] = field(default_factory=dict)

    _TOTALS = ("blobs_new", "blobs_known", "bytes_raw_new", "bytes_stored", "packs")

    def totals(self) -> dict[str, int]:
        """The counts, as a worker process reports them (see `add`)."""
        return {k: getattr(self, k) for k in self._TOTALS}

    def add(self, totals: dict[str, int]) -> None:
        """Count what a worker process stored for the same run."""
        for k in self._TOTALS:
            setattr(self, k, getattr(self, k) + totals.get(k, 0))


@dataclass
class StoredPack:
    id: bytes
    type: int
    entries: list[PackEntry]
    sender: bytes | None = None  # an append key's process wrote it (keepwell.repository.keyring)


class BlobSink:
    def __init__(self, repo: RepositoryStore, *, upload_workers: int = UPLOAD_WORKERS, compression: int | None = None,
                 levels: Levels | None = None) -> None:
        self.repo = repo
        self.level = repo.compression if compression is None else compression
        # data blobs: a fixed level, or the adaptive choice of the writer's kind of data
        self.levels = levels or Levels(self.level, self.level)
        self._lock = threading.Lock()
        self._builders = self._new_builders()
        # blobs this sink took and no index object lists yet (in a builder, uploading, or stored
        # and waiting for their index object): known to this sink only
        self._held: set[bytes] = set()
        self._pool = ThreadPoolExecutor(upload_workers, thread_name_prefix="kw-upload")
        self._slots = threading.BoundedSemaphore(upload_workers + 1)
        self._futures: set[Future[None]] = set()
        self._unindexed: list[StoredPack] = []
        self._last_index = time.monotonic()
        self._error: BaseException | None = None
        self.stats = SinkStats()
        self.index_names: list[str] = []

    # -- the hot path -------------------------------------------------------------------------
    def save(self, blob_type: int, data: bytes | bytearray | memoryview, blob_id: bytes | None = None) -> bytes:
        if self._error is not None:
            raise self._error
        if blob_id is None:
            blob_id = keyed_id(self.repo.id_key, data)
        index = self.repo.index
        with self._lock:
            if blob_id in self._held or index.has(blob_id):
                self.stats.blobs_known += 1
                return blob_id
            self._held.add(blob_id)
        try:
            payload = self.levels.payload(data) if blob_type == DATA else pack_payload(data, self.level)
            stored = self.repo.master.encrypt_blob(blob_id, blob_type, payload)
        except BaseException:
            with self._lock:
                self._held.discard(blob_id)
            raise
        self.add_stored(blob_type, blob_id, stored, len(data), reserved=True)
        return blob_id

    def add_stored(self, blob_type: int, blob_id: bytes, stored: bytes | bytearray, raw_length: int, *,
                   reserved: bool = False) -> bool:
        """Add an already encrypted blob (used by prune and copy). False if it was known."""
        full: PackBuilder | None = None
        failed: BaseException | None = None
        with self._lock:
            if not reserved:
                if self._error is not None:
                    raise self._error
                if blob_id in self._held or self.repo.index.has(blob_id):
                    return False
                self._held.add(blob_id)
            builder = self._builders[blob_type]
            try:
                builder.add(blob_id, stored, raw_length)
            except BaseException as exc:
                # the pack has a hole now: it goes, with every blob it took
                self._builders[blob_type] = PackBuilder(blob_type, self.repo.backend)
                self._held.discard(blob_id)
                self._held.difference_update(e.id for e in builder.entries)
                if self._error is None:
                    self._error = exc
                builder.discard()
                failed = exc
            else:
                self.stats.blobs_new += 1
                self.stats.bytes_raw_new += raw_length
                self.stats.bytes_stored += len(stored)
                if len(builder) >= PACK_TARGET[blob_type]:
                    full = builder
                    self._builders[blob_type] = PackBuilder(blob_type, self.repo.backend)
        if failed is not None:
            raise failed
        if full is not None:
            self._submit(full)
        return True

    def _submit(self, builder: PackBuilder) -> None:
        self._slots.acquire()  # bounds the packs held in memory
        fut = self._pool.submit(self._store_pack, builder)
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: Future[None]) -> None:
        self._slots.release()
        with self._lock:
            self._futures.discard(fut)
        exc = fut.exception()
        if exc is not None and self._error is None:
            self._error = exc

    def _new_builders(self) -> dict[int, PackBuilder]:
        return {t: PackBuilder(t, self.repo.backend) for t in (DATA, TREE)}

    def _store_pack(self, builder: PackBuilder) -> None:
        repo = self.repo
        try:
            pack_hex = builder.store(repo)
        except BaseException:
            with self._lock:
                self._held.difference_update(e.id for e in builder.entries)
            raise
        finally:
            builder.discard()
        with self._lock:
            self._unindexed.append(StoredPack(bytes.fromhex(pack_hex), builder.type, builder.entries,
                                              repo.master.sender))
            self.stats.packs += 1
            due = len(self._unindexed) >= INDEX_EVERY_PACKS or (
                time.monotonic() - self._last_index > INDEX_EVERY_SECONDS
            )
            batch = self._take_unindexed() if due else []
        if batch:
            self._write_index(batch)
        repo.events.emit("pack_stored", pack=pack_hex, size=builder.size)

    def _take_unindexed(self) -> list[StoredPack]:
        batch, self._unindexed = self._unindexed, []
        self._last_index = time.monotonic()
        return batch

    def _write_index(self, packs: list[StoredPack]) -> None:
        """Write an index object for stored packs; their blobs then enter the in-memory index.
        On failure the packs wait for the next attempt (`flush`)."""
        try:
            name = self.repo.write_index(index_content(packs))
        except BaseException:
            with self._lock:
                self._unindexed[:0] = packs
            raise
        index = self.repo.index
        for p in packs:
            if p.sender is not None:
                self.repo.senders[p.id] = p.sender
            for e in p.entries:
                index.add(e.id, p.id, p.type, e.offset, e.length, e.raw_length, e.type)
        with self._lock:
            for p in packs:
                self._held.difference_update(e.id for e in p.entries)
        self.index_names.append(name)
        # known to the in-memory index, so refresh_index reloads in full once a prune
        # supersedes it (otherwise this process would keep entries for packs prune doomed)
        index.files.add(name)

    # -- the end of a run ---------------------------------------------------------------------
    def flush(self) -> None:
        """Store every open pack, wait for all uploads, and index everything stored. After a
        failed write, the packs that were stored whole are indexed all the same (a later run
        reuses them) and the failure is raised."""
        with self._lock:
            builders = [b for b in self._builders.values() if b.entries]
            self._builders = self._new_builders()
        for b in builders:
            self._submit(b)
        while True:
            with self._lock:
                pending = list(self._futures)
            if not pending:
                break
            for f in pending:
                try:
                    f.result()
                except BaseException:
                    pass
        with self._lock:
            batch = self._take_unindexed()
        if batch:
            try:
                self._write_index(batch)
            except BaseException as exc:
                if self._error is None:
                    self._error = exc
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:  # packs never submitted (a failed run): their spool files go
            for b in self._builders.values():
                b.discard()


def index_content(packs: list[StoredPack], supersedes: list[str] | None = None) -> IndexContent:
    entries = encode_entries((e.id, n, e.offset, e.length, e.raw_length, e.type)
                             for n, p in enumerate(packs) for e in p.entries)
    return IndexContent([p.id for p in packs], [p.type for p in packs], entries, supersedes or [],
                        {p.id: p.sender for p in packs if p.sender is not None})
