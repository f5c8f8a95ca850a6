"""The WAL archive of one cluster inside a repository: push, look up and fetch WAL files.

WAL files are stored as snapshots of kind ``postgres-wal`` whose files are
``wal/<timeline>/<name>``; one snapshot holds a batch of files so that busy servers make few
snapshots. Each snapshot's ``source`` names the cluster and its system identifier and lists, per
file, its BLAKE3 hash, size and modification time (and the text of history files), so a
`Catalog` can be built from the snapshot records alone.

Every segment pushed is checked against the cluster's system identifier (read from the segment's
own header); a file already archived under the same name is accepted again only if it is
byte-identical. A push returns (and so a segment is acknowledged) only once every chunk of the
snapshot holding it is in a pack a stored index lists (`walindex.PackLedger.ensure_listed`),
the one just written or the one found already archived.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import blake3

from keepwell.errors import IntegrityError
from keepwell.sources.postgres import KIND_WAL
from keepwell.sources.postgres.catalog import Catalog
from keepwell.sources.postgres.errors import ForeignClusterError, WalConflictError, WalNotFoundError
from keepwell.sources.postgres.spool import fsync_dir
from keepwell.sources.postgres.walindex import PackLedger
from keepwell.sources.postgres.walnames import read_segment_header, timeline_of, wal_kind

MAX_BATCH_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class WalItem:
    """One WAL file to archive: its name in pg_wal and where its bytes are now."""

    name: str
    path: str


@dataclass
class PushResult:
    stored: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # name -> reason
    digests: dict[str, str] = field(default_factory=dict)
    snapshot_id: str | None = None


def digest_of(data: bytes | mmap.mmap) -> str:
    return blake3.blake3(data).hexdigest()


class _Mapped:
    """Completed segments of one push, mapped from the page cache instead of copied into new
    buffers (the copy and the faults of a fresh 16 MiB buffer cost as much as hashing it).

    A segment's bytes are read more than once (hashed first, then compressed), so each file
    stays open and is checked unchanged before the snapshot is committed: a segment that
    PostgreSQL recycled and began to overwrite meanwhile (it may, once a push spooled the same
    segment and acknowledged it) fails the push instead of being stored torn."""

    def __init__(self) -> None:
        self.open: list[tuple[mmap.mmap, Any, os.stat_result, str]] = []

    def read(self, item: WalItem) -> tuple[bytes | mmap.mmap, os.stat_result]:
        """The bytes of a WAL file and its status (partial segments and history files: read)."""
        f = open(item.path, "rb")  # noqa: SIM115 -- a mapped file stays open until `close`
        mapped = None
        try:
            st = os.fstat(f.fileno())
            if wal_kind(item.name) != "segment" or st.st_size == 0:
                return f.read(), st
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            try:
                mapped = mmap.mmap(f.fileno(), st.st_size, flags=flags, prot=mmap.PROT_READ)
            except OSError:  # a filesystem that cannot map files
                return f.read(), st
            self.open.append((mapped, f, st, item.name))
            return mapped, st
        finally:
            if mapped is None:
                f.close()

    def check_unchanged(self) -> None:
        for _m, f, st, name in self.open:
            now = os.fstat(f.fileno())
            if (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                raise IntegrityError(f"WAL file {name} changed while it was archived")

    def close(self) -> None:
        for m, f, _st, _name in self.open:
            with contextlib.suppress(BufferError):  # a view still held: closed by the GC
                m.close()
            f.close()
        self.open.clear()


def wal_path(name: str) -> str:
    return f"wal/{name[:8]}/{name}"


class WalArchive:
    """Push and fetch WAL of cluster `cluster` in the open repository `repo`."""

    def __init__(self, repo: Any, cluster: str, host: str | None = None,
                 ledger: PackLedger | None = None) -> None:
        self.repo = repo
        self.cluster = cluster
        self.host = host or socket.gethostname()
        self._catalog: Catalog | None = None
        self._ledger = ledger

    @property
    def ledger(self) -> PackLedger:
        """Made at the first push unless shared: before this archive writes anything."""
        if self._ledger is None:
            self._ledger = PackLedger(self.repo)
        return self._ledger

    def catalog(self, refresh: bool = False) -> Catalog:
        if self._catalog is None or refresh:
            self._catalog = Catalog.build(self.repo.list_snapshots(), self.cluster)
        return self._catalog

    def check_identity(self, system_identifier: int, what: str) -> None:
        known = self.catalog().system_identifier
        if known is not None and known != system_identifier:
            raise ForeignClusterError(
                f"{what} comes from the cluster with system identifier {system_identifier}, but"
                f" cluster '{self.cluster}' in this repository is {known}"
            )

    def push(self, items: list[WalItem]) -> PushResult:
        """Archive `items` in one snapshot; conflicts and foreign files go to `refused`."""
        cat = self.catalog()
        ledger = self.ledger
        result = PushResult()
        accepted: list[tuple[WalItem, bytes | mmap.mmap, str, os.stat_result]] = []
        batch_sysid: int | None = cat.system_identifier
        segment_size: int | None = None
        maps = _Mapped()
        try:
            for item in items:
                data, st = maps.read(item)
                digest = digest_of(data)
                result.digests[item.name] = digest
                kind = wal_kind(item.name)
                if kind in ("segment", "partial"):
                    header = read_segment_header(data[:64])  # the long page header
                    if header is None:
                        result.refused[item.name] = "not a WAL segment (no valid page header)"
                        continue
                    if batch_sysid is not None and header.system_identifier != batch_sysid:
                        result.refused[item.name] = (
                            f"from the cluster with system identifier {header.system_identifier},"
                            f" but cluster '{self.cluster}' in this repository is {batch_sysid}"
                        )
                        continue
                    batch_sysid = header.system_identifier
                    segment_size = header.segment_size
                existing = cat.wal.get(item.name) if kind != "partial" else None
                if existing is not None:
                    if existing.digest == digest:
                        ledger.ensure_listed(self.repo.find_snapshot(existing.snapshot_id))
                        result.already.append(item.name)
                    else:
                        result.refused[item.name] = (
                            "a different file with this name is already archived"
                        )
                    continue
                accepted.append((item, data, digest, st))
            if accepted:
                result.snapshot_id = self._store(accepted, batch_sysid, segment_size,
                                                 maps.check_unchanged)
                result.stored = [a[0].name for a in accepted]
                self._catalog = None
        finally:
            accepted.clear()  # the last references to the maps
            maps.close()
        return result

    def _store(self, accepted: list[tuple[WalItem, bytes | mmap.mmap, str, os.stat_result]],
               sysid: int | None, segment_size: int | None,
               check_unchanged: Callable[[], None]) -> str:
        files: dict[str, dict[str, Any]] = {}
        source: dict[str, Any] = {"cluster": self.cluster}
        if sysid is not None:
            source["system_identifier"] = str(sysid)
        if segment_size:
            source["segment_size"] = segment_size
        names = sorted(a[0].name for a in accepted)
        # the level chosen piece by piece: full-page images after a checkpoint compress 10 %
        # better at the strong level, row changes and loaded text as well or better at the fast
        # one, and a busy server switches between them faster than samples can follow
        with self.repo.new_snapshot(KIND_WAL, ["wal"], host=self.host, source=source,
                                    probe_levels=True) as w:
            for item, data, digest, st in accepted:
                path = wal_path(item.name)
                mtime = datetime.fromtimestamp(st.st_mtime, UTC)
                # a completed segment is never rewritten: large fixed pieces compress best; a
                # partial one grows, and content-defined chunks let each upload share the rest
                w.add_bytes(path, data, mode=0o600, mtime=st.st_mtime,
                            fixed=wal_kind(item.name) == "segment")
                info: dict[str, Any] = {
                    "path": path, "hash": digest, "size": len(data), "mtime": mtime.isoformat(),
                }
                if wal_kind(item.name) == "history":
                    info["text"] = bytes(data).decode("utf-8", "replace")
                files[item.name] = info
            w.source["files"] = files
            w.source["first"] = names[0]
            w.source["last"] = names[-1]
            w.source["timelines"] = sorted({timeline_of(n) for n in names})
            check_unchanged()
            snap = w.commit()
            self.ledger.note_written(w.sink.index_names)
        self.ledger.ensure_listed(snap)
        return str(snap.id)

    def push_one(self, name: str, path: str) -> str:
        """Archive one file; returns 'stored' or 'already'; raises on a foreign or conflict."""
        result = self.push([WalItem(name, path)])
        if name in result.refused:
            reason = result.refused[name]
            if reason.startswith("from the cluster"):
                raise ForeignClusterError(f"WAL file {name} is {reason}")
            if reason.startswith("a different file"):
                raise WalConflictError(f"WAL file {name} refused: {reason}")
            raise WalConflictError(f"WAL file {name} refused: {reason}")
        return "already" if name in result.already else "stored"

    def fetch(self, name: str, dest: str) -> None:
        """Write archived file `name` to `dest` atomically; `WalNotFoundError` if not archived."""
        wf = self.catalog().find(name)
        if wf is None:
            raise WalNotFoundError(f"WAL file {name} is not in the repository")
        snap = self.repo.find_snapshot(wf.snapshot_id)
        tmp = f"{dest}.kwtmp{os.getpid()}"
        hasher = blake3.blake3()
        with open(tmp, "wb") as out:
            for block in self.repo.iter_file(snap, wf.path):
                hasher.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if wf.digest and hasher.hexdigest() != wf.digest:
            os.unlink(tmp)
            raise IntegrityError(f"WAL file {name} read back with a different hash")
        os.replace(tmp, dest)
        fsync_dir(os.path.dirname(os.path.abspath(dest)))

    def forget_snapshots(self, snapshot_ids: list[str]) -> None:
        if snapshot_ids:
            self.repo.forget(snapshot_ids)
            self._catalog = None
