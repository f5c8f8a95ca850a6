"""Turning blobs into packs and packs into uploads: the write half of the pipeline.

`BlobSink` is shared by all threads of one writing process. ``save`` hashes, checks the index,
compresses and encrypts in the calling thread (native code that releases the GIL), appends the
result to the open pack of its type, and hands a full pack to a bounded pool of upload threads.
After a pack is stored its blobs enter the in-memory index; every few packs (and at ``flush``) an
index object is written for the packs stored so far, so a run that is killed later still leaves
its uploads findable for the next run. Order on storage: packs → index → (caller) snapshot.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from keepwell.repository.repo import Repository

PACK_TARGET = {DATA: 16 * 1024 * 1024, TREE: 4 * 1024 * 1024}
INDEX_EVERY_PACKS = 4
INDEX_EVERY_SECONDS = 10.0


class PackBuilder:
    def __init__(self, blob_type: int) -> None:
        self.type = blob_type
        self.buf = bytearray()
        self.entries: list[PackEntry] = []

    def add(self, blob_id: bytes, stored: bytes, raw_length: int) -> None:
        self.entries.append(PackEntry(self.type, blob_id, len(self.buf), len(stored), raw_length))
        self.buf += stored

    def __len__(self) -> int:
        return len(self.buf)


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


class BlobSink:
    def __init__(self, repo: Repository, *, upload_workers: int = 4, compression: int | None = None,
                 levels: Levels | None = None) -> None:
        self.repo = repo
        self.level = repo.compression if compression is None else compression
        # data blobs: a fixed level, or the adaptive choice of the writer's kind of data
        self.levels = levels or Levels(self.level, self.level)
        self._lock = threading.Lock()
        self._builders = {DATA: PackBuilder(DATA), TREE: PackBuilder(TREE)}
        self._inflight: set[bytes] = set()
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
            if blob_id in self._inflight or index.has(blob_id):
                self.stats.blobs_known += 1
                return blob_id
            self._inflight.add(blob_id)
        payload = self.levels.payload(data) if blob_type == DATA else pack_payload(data, self.level)
        stored = self.repo.master.encrypt_blob(blob_id, blob_type, payload)
        self.add_stored(blob_type, blob_id, stored, len(data), reserved=True)
        return blob_id

    def add_stored(self, blob_type: int, blob_id: bytes, stored: bytes, raw_length: int, *,
                   reserved: bool = False) -> bool:
        """Add an already encrypted blob (used by prune and copy). False if it was known."""
        full: PackBuilder | None = None
        with self._lock:
            if not reserved:
                if blob_id in self._inflight or self.repo.index.has(blob_id):
                    return False
                self._inflight.add(blob_id)
            builder = self._builders[blob_type]
            builder.add(blob_id, stored, raw_length)
            self.stats.blobs_new += 1
            self.stats.bytes_raw_new += raw_length
            self.stats.bytes_stored += len(stored)
            if len(builder) >= PACK_TARGET[blob_type]:
                full = builder
                self._builders[blob_type] = PackBuilder(blob_type)
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

    def _store_pack(self, builder: PackBuilder) -> None:
        repo = self.repo
        header = repo.master.encrypt_object(KIND_PACK_HEADER, encode_pack_header(builder.entries))
        builder.buf += header
        builder.buf += pack_trailer(len(header))
        pack_hex = content_name(builder.buf)
        try:
            repo.backend.put(pack_object_name(builder.type, pack_hex), builder.buf)
        except ObjectExistsError:
            pass  # same name means same bytes: already stored
        pack_id = bytes.fromhex(pack_hex)
        for e in builder.entries:
            repo.index.add(e.id, pack_id, builder.type, e.offset, e.length, e.raw_length, e.type)
        with self._lock:
            for e in builder.entries:
                self._inflight.discard(e.id)
            self._unindexed.append(StoredPack(pack_id, builder.type, builder.entries))
            self.stats.packs += 1
            due = len(self._unindexed) >= INDEX_EVERY_PACKS or (
                time.monotonic() - self._last_index > INDEX_EVERY_SECONDS
            )
            batch = self._take_unindexed() if due else []
        if batch:
            self._write_index(batch)
        repo.events.emit("pack_stored", pack=pack_hex, size=len(builder.buf))

    def _take_unindexed(self) -> list[StoredPack]:
        batch, self._unindexed = self._unindexed, []
        self._last_index = time.monotonic()
        return batch

    def _write_index(self, packs: list[StoredPack]) -> None:
        name = self.repo.write_index(index_content(packs))
        self.index_names.append(name)
        # known to the in-memory index, so refresh_index reloads in full once a prune
        # supersedes it (otherwise this process would keep entries for packs prune doomed)
        self.repo.index.files.add(name)

    # -- the end of a run ---------------------------------------------------------------------
    def flush(self) -> None:
        """Store every open pack, wait for all uploads, and index everything stored."""
        with self._lock:
            builders = [b for b in self._builders.values() if b.entries]
            self._builders = {DATA: PackBuilder(DATA), TREE: PackBuilder(TREE)}
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
        if self._error is not None:
            raise self._error
        with self._lock:
            batch = self._take_unindexed()
        if batch:
            self._write_index(batch)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def index_content(packs: list[StoredPack], supersedes: list[str] | None = None) -> IndexContent:
    entries = encode_entries((e.id, n, e.offset, e.length, e.raw_length, e.type)
                             for n, p in enumerate(packs) for e in p.entries)
    return IndexContent([p.id for p in packs], [p.type for p in packs], entries, supersedes or [])
