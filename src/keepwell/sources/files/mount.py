"""The repository as a read-only tree of directories (``keepwell mount``), apart from FUSE.

`RepositoryView` is what the mounted filesystem shows, addressed by inode numbers the way the
kernel asks for it; keepwell.sources.files.fuse hands its answers to the FUSE library. The top
of the tree is made of virtual directories built from the snapshot list when the view is made:

    /snapshots/<time>/   every snapshot, by its local time (``2026-11-24T17:05:31+01:00``; a
                         second one of the same second gets ``-1``, ``-2``...), and ``latest``,
                         a symlink to the newest
    /hosts/<host>/<time>/ and ``latest``, per host
    /tags/<tag>/<time>/   and ``latest``, per tag
    /ids/<short id>/      every snapshot by the first 8 hex digits of its id

Below a snapshot's directory are its tree objects as backup stored them: every directory is read
from its tree blob when first looked at, every entry keeps the mode, owner, size, times, link
count, device number, symlink target and extended attributes it was stored with.

Words: an *entry* is one inode of the view (a virtual directory, a symlink to a snapshot, or a
node of a snapshot's tree). A file's *extent* is the byte range of one of its blobs in its
content, from the blobs' sizes added up in order. File contents are read on demand, blob by
blob, each decrypted and verified against its id by the repository (`Repository.load_blob`), so
a damaged blob is an `IntegrityError` and never wrong bytes. A read of any range loads only the
blobs that cover it; a few recently read blobs are kept (`BlobCache`, bounded in bytes) and the
blob after a read is fetched ahead, so sequential reads of a large file stream.
"""

from __future__ import annotations

import bisect
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from keepwell.errors import IntegrityError, UsageError
from keepwell.repository.repo import Repository
from keepwell.repository.snapshot import Snapshot, SnapshotFilter
from keepwell.repository.tree import BLOCKDEV, CHARDEV, DIR, FIFO, FILE, SOCKET, SYMLINK, Node

ROOT_INO = 1
_TYPE_BITS = {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, FIFO: stat.S_IFIFO,
              CHARDEV: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK, SOCKET: stat.S_IFSOCK}


class NotFound(Exception):
    """No entry of that name (or inode): ENOENT."""


@dataclass(frozen=True, slots=True)
class Attributes:
    """What ``stat`` shows of an entry."""

    ino: int
    mode: int  # with the file type bits
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(slots=True)
class Entry:
    ino: int
    node: Node
    parent: int = 0
    # name -> inode of the entries below, once known (virtual directories: from the start;
    # directories of a snapshot: once their tree blob is read)
    children: dict[str, int] | None = None
    virtual: bool = False
    complete: bool = True  # False when an entry of `children` was forgotten since
    lookups: int = 0  # references the kernel holds (`RepositoryView.forget`)
    extents: list[int] | None = field(default=None)  # files: the end offset of each blob
    listing: list[tuple[str, int]] | None = None  # `children` in name order, once asked for


class BlobCache:
    """The plaintext of recently read blobs, least recently used dropped first, at most
    ``budget`` bytes; a blob asked for by two readers at once is loaded once."""

    def __init__(self, load: Callable[[bytes], bytes], budget: int) -> None:
        self._load = load
        self._budget = budget
        self._held: OrderedDict[bytes, bytes] = OrderedDict()
        self._size = 0
        self._loading: dict[bytes, Future[bytes]] = {}
        self._lock = threading.Lock()

    def get(self, blob_id: bytes) -> bytes:
        with self._lock:
            hit = self._held.get(blob_id)
            if hit is not None:
                self._held.move_to_end(blob_id)
                return hit
            pending = self._loading.get(blob_id)
            mine = pending is None
            if pending is None:
                pending = self._loading[blob_id] = Future()
        if not mine:
            return pending.result()
        try:
            data = self._load(blob_id)
        except BaseException as exc:
            with self._lock:
                del self._loading[blob_id]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._loading[blob_id]
            if len(data) <= self._budget:
                self._held[blob_id] = data
                self._size += len(data)
                while self._size > self._budget:
                    self._size -= len(self._held.popitem(last=False)[1])
        pending.set_result(data)
        return data

    def holds(self, blob_id: bytes) -> bool:
        with self._lock:
            return blob_id in self._held or blob_id in self._loading


def snapshot_names(snaps: list[Snapshot]) -> list[tuple[str, Snapshot]]:
    """(directory name, snapshot), oldest first: the local time to the second, with ``-1``,
    ``-2``... for the second and later snapshots of one second."""
    out: list[tuple[str, Snapshot]] = []
    seen: dict[str, int] = {}
    for snap in sorted(snaps, key=lambda s: (s.time, s.id)):
        base = snap.time.astimezone().isoformat(timespec="seconds")
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append((base if n == 0 else f"{base}-{n}", snap))
    return out


class RepositoryView:
    """The inodes of the mounted tree (see the module docstring). Thread-safe: the FUSE loop
    may call it from several threads at once."""

    # decoded blobs kept for reads (a blob is up to 8 MiB; several readers at once)
    CACHE_BYTES = 64 * 1024 * 1024

    def __init__(self, repo: Repository, where: SnapshotFilter | None = None, *,
                 uid: int | None = None, gid: int | None = None) -> None:
        self.repo = repo
        self._uid = os.getuid() if uid is None else uid
        self._gid = os.getgid() if gid is None else gid
        self._entries: dict[int, Entry] = {}
        self._next_ino = ROOT_INO
        self._lock = threading.Lock()
        self.cache = BlobCache(repo.load_blob, self.CACHE_BYTES)
        self._ahead = ThreadPoolExecutor(2, thread_name_prefix="keepwell-mount-ahead")
        flt = where or SnapshotFilter()
        snaps = [s for s in repo.list_snapshots() if flt.matches(s)]
        self.snapshots = snaps
        self._build(snaps)

    def close(self) -> None:
        self._ahead.shutdown(wait=True, cancel_futures=True)

    # -- the virtual top -------------------------------------------------------------------------
    def _new(self, node: Node, *, virtual: bool, children: dict[str, int] | None = None,
             parent: int = 0) -> Entry:
        entry = Entry(self._next_ino, node, parent, children, virtual)
        self._entries[entry.ino] = entry
        self._next_ino += 1
        return entry

    def _virtual_dir(self, name: str, mtime_ns: int) -> Entry:
        return self._new(Node(name=name, type=DIR, mode=0o555, uid=self._uid, gid=self._gid,
                              mtime_ns=mtime_ns, ctime_ns=mtime_ns, nlink=2),
                         virtual=True, children={})

    def _build(self, snaps: list[Snapshot]) -> None:
        newest = max((_ns(s) for s in snaps), default=0)
        root = self._virtual_dir("", newest)
        assert root.ino == ROOT_INO and root.children is not None
        groups: dict[str, dict[str, list[Snapshot]]] = {"snapshots": {"": snaps}, "hosts": {},
                                                        "tags": {}}
        for s in snaps:
            groups["hosts"].setdefault(s.host, []).append(s)
            for t in s.tags:
                groups["tags"].setdefault(t, []).append(s)
        for top, by_key in groups.items():
            top_dir = self._virtual_dir(top, newest)
            root.children[top] = top_dir.ino
            for key, members in sorted(by_key.items()):
                if not key and top != "snapshots":
                    continue  # an empty host or tag cannot be a directory name
                if key:
                    if "/" in key or key in (".", ".."):
                        continue
                    holder = self._virtual_dir(key, max(_ns(s) for s in members))
                    assert top_dir.children is not None
                    top_dir.children[key] = holder.ino
                else:
                    holder = top_dir
                self._add_snapshots(holder, members)
        ids = self._virtual_dir("ids", newest)
        root.children["ids"] = ids.ino
        assert ids.children is not None
        for s in snaps:
            ids.children[s.short_id] = self._snapshot_dir(s.short_id, s).ino

    def _add_snapshots(self, holder: Entry, snaps: list[Snapshot]) -> None:
        assert holder.children is not None
        named = snapshot_names(snaps)
        for name, snap in named:
            holder.children[name] = self._snapshot_dir(name, snap).ino
        if named:
            name, snap = named[-1]
            link = self._new(Node(name="latest", type=SYMLINK, mode=0o777, uid=self._uid,
                                  gid=self._gid, mtime_ns=_ns(snap), ctime_ns=_ns(snap),
                                  size=len(os.fsencode(name)), target=name), virtual=True)
            holder.children["latest"] = link.ino

    def _snapshot_dir(self, name: str, snap: Snapshot) -> Entry:
        """A snapshot's root directory: its tree's entries below it."""
        return self._new(Node(name=name, type=DIR, mode=0o555, uid=self._uid, gid=self._gid,
                              mtime_ns=_ns(snap), ctime_ns=_ns(snap), nlink=2,
                              subtree=bytes.fromhex(snap.tree)), virtual=True)

    # -- looking things up -------------------------------------------------------------------------
    def entry(self, ino: int) -> Entry:
        found = self._entries.get(ino)
        if found is None:
            raise NotFound(ino)
        return found

    def attributes(self, ino: int) -> Attributes:
        e = self.entry(ino)
        n = e.node
        size = n.size if n.type == FILE else len(os.fsencode(n.target or "")) \
            if n.type == SYMLINK else 0
        return Attributes(ino=ino, mode=_TYPE_BITS[n.type] | stat.S_IMODE(n.mode), nlink=n.nlink,
                          uid=n.uid, gid=n.gid, rdev=n.rdev, size=size, atime_ns=n.mtime_ns,
                          mtime_ns=n.mtime_ns, ctime_ns=n.ctime_ns or n.mtime_ns)

    def children(self, ino: int) -> dict[str, int]:
        """name -> inode of a directory's entries (its tree blob read on the first call)."""
        e = self.entry(ino)
        if e.children is not None and e.complete:
            return e.children
        if e.node.type != DIR:
            raise NotADirectoryError(ino)
        nodes = self.repo.load_tree(e.node.subtree) if e.node.subtree is not None else []
        with self._lock:
            known = e.children if e.children is not None else {}
            e.children = {n.name: known.get(n.name) or self._new(n, virtual=False, parent=ino).ino
                          for n in nodes}
            e.complete = True
            e.listing = None
            return e.children

    def listed(self, ino: int) -> bool:
        """Whether `children` of ``ino`` answers without reading the repository."""
        e = self._entries.get(ino)
        return e is None or (e.children is not None and e.complete)

    def listing(self, ino: int) -> list[tuple[str, int]]:
        """(name, inode) of a directory's entries in name order: a listing is asked for in
        pieces, each from an index into this list, so it is sorted once, not once a piece."""
        children = self.children(ino)
        e = self.entry(ino)
        found = e.listing
        if found is None:
            with self._lock:
                found = e.listing = sorted(children.items())
        return found

    def lookup(self, parent: int, name: str) -> Attributes:
        """The entry ``name`` of a directory; counts one reference of the kernel to it."""
        ino = self.children(parent).get(name)
        if ino is None:
            raise NotFound(name)
        self.remember(ino)
        return self.attributes(ino)

    def remember(self, ino: int) -> None:
        """One more reference of the kernel (a lookup, or an entry of a listing with its
        attributes)."""
        with self._lock:
            e = self._entries.get(ino)
            if e is not None:
                e.lookups += 1

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped ``count`` references: an entry of a snapshot's tree that none
        holds any more is dropped (its directory names it again when looked up again)."""
        with self._lock:
            e = self._entries.get(ino)
            if e is None or e.virtual:
                return
            e.lookups -= count
            if e.lookups <= 0:
                del self._entries[ino]
                e.children = None
                parent = self._entries.get(e.parent)
                if parent is not None and parent.children is not None \
                        and parent.children.get(e.node.name) == ino:
                    del parent.children[e.node.name]
                    parent.complete = False
                    parent.listing = None

    def readlink(self, ino: int) -> str:
        n = self.entry(ino).node
        if n.type != SYMLINK or n.target is None:
            raise NotFound(ino)
        return n.target

    def xattrs(self, ino: int) -> tuple[tuple[bytes, bytes], ...]:
        return self.entry(ino).node.xattrs or ()

    def live_entries(self) -> int:
        return len(self._entries)

    # -- reading files -----------------------------------------------------------------------------
    def _extents(self, e: Entry) -> list[int]:
        if e.extents is None:
            ends, total = [], 0
            for blob_id, loc in zip(e.node.content, self.repo.locate_many(e.node.content),
                                    strict=True):
                if loc is None:
                    raise IntegrityError(f"blob {blob_id.hex()[:16]} of {e.node.name} is not in "
                                         "the index",
                                         hint="run 'keepwell check' to see what is affected")
                total += loc.raw_length
                ends.append(total)
            if total != e.node.size:
                raise IntegrityError(f"{e.node.name}: its blobs hold {total} bytes, its tree "
                                     f"entry says {e.node.size}",
                                     hint="run 'keepwell check' to see what is affected")
            e.extents = ends
        return e.extents

    def read(self, ino: int, offset: int, size: int) -> bytes:
        """``size`` bytes of a file from ``offset`` (fewer at its end), each blob verified."""
        e = self.entry(ino)
        if e.node.type != FILE:
            raise IsADirectoryError(ino)
        ends = self._extents(e)
        end = min(offset + size, e.node.size)
        if offset >= end:
            return b""
        content = e.node.content
        i = bisect.bisect_right(ends, offset)
        parts = []
        pos = offset
        while pos < end:
            start = ends[i - 1] if i else 0
            try:
                data = self.cache.get(content[i])
            except IntegrityError as exc:
                raise IntegrityError(f"{e.node.name}: {exc}", hint=exc.hint) from None
            parts.append(data[pos - start:min(end, ends[i]) - start])
            pos = ends[i]
            i += 1
        if i < len(content) and not self.cache.holds(content[i]):
            self._ahead.submit(self._fetch_ahead, content[i])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _fetch_ahead(self, blob_id: bytes) -> None:
        try:
            self.cache.get(blob_id)
        except Exception:
            pass  # the read that needs it meets the error itself


def check_mountpoint(path: str) -> str:
    """The absolute mountpoint, refused (`UsageError`) unless it is an existing directory."""
    if not os.path.isdir(path):
        raise UsageError(f"{path}: the mountpoint is not an existing directory",
                         hint="create it first (mkdir)")
    if os.path.ismount(path):
        raise UsageError(f"{path} is already a mountpoint",
                         hint="unmount it first (fusermount3 -u), or choose another directory")
    return os.path.abspath(path)


def _ns(snap: Snapshot) -> int:
    return int(snap.time.timestamp() * 1_000_000_000)
