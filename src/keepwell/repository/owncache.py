"""What an append key keeps locally of its own snapshots, so that its backups are incremental.

An append key reads no snapshot or tree in the repository (docs/security.md), not even what it
wrote itself: the keys of the process that wrote them are gone. So, as it writes, an append key
keeps the plaintext of its trees and of its last snapshot (one per host and set of paths) in a
directory of the local cache; its next backup finds its parent there, and re-reads only what
changed.

Words:
    directory   ``<cache base>/append/<repository id>/<key id>/``: ``trees/<tree id>``, the
                plaintext of a tree blob, and ``last-<digest of host and paths>``, the id and
                plaintext of the newest snapshot of those paths. Every file is written
                atomically with mode 0600, in directories of mode 0700.
    match       the cache is used only for a snapshot still in the listing of ``snapshots/``
                (which an append key can list) and a tree whose plaintext has its id (the
                keyed hash): anything else is ignored, and the files are read again.

The trees kept are those of the last snapshots: each commit removes the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading

from keepwell.crypto import keyed_id
from keepwell.repository.snapshot import Snapshot, decode_snapshot
from keepwell.repository.tree import DIR, decode_tree


def own_cache_directory(base: str, repository_id: str, key_id: str) -> str:
    return os.path.join(base, "append", repository_id, key_id)


def _write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}-{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _paths_key(host: str, paths: list[str]) -> str:
    return hashlib.sha256("\0".join([host, *sorted(paths)]).encode()).hexdigest()[:32]


class OwnCache:
    """The local cache of one append key in one repository (see the module doc). Failures to
    write it never fail a backup: the next one then reads the files again."""

    def __init__(self, directory: str, id_key: bytes) -> None:
        self.directory = directory
        self.id_key = id_key
        self._trees_dir = os.path.join(directory, "trees")
        self._used: set[bytes] = set()  # trees this process wrote or read
        self._lock = threading.Lock()
        self._ready = False
        self.broken = False  # a write failed: the cache is not recorded as a parent

    def _prepare(self) -> None:
        if not self._ready:
            for d in (self.directory, self._trees_dir):
                os.makedirs(d, mode=0o700, exist_ok=True)
                os.chmod(d, 0o700)  # whatever the umask: it holds names and sizes of files
            self._ready = True

    # -- trees ----------------------------------------------------------------------------------
    def tree(self, tree_id: bytes) -> bytes | None:
        """A tree's plaintext, if held and it has that id."""
        try:
            with open(os.path.join(self._trees_dir, tree_id.hex()), "rb") as f:
                plain = f.read()
        except OSError:
            return None
        if keyed_id(self.id_key, plain) != tree_id:
            return None
        with self._lock:
            self._used.add(tree_id)
        return plain

    def put_tree(self, tree_id: bytes, plain: bytes) -> None:
        with self._lock:
            self._used.add(tree_id)
        path = os.path.join(self._trees_dir, tree_id.hex())
        try:
            self._prepare()
            if not os.path.exists(path):
                _write(path, plain)
        except OSError:
            self.broken = True

    # -- the last snapshot --------------------------------------------------------------------
    def last(self, host: str, paths: list[str], listed: list[str]) -> Snapshot | None:
        """The newest snapshot of ``paths`` on ``host`` this key recorded, if its id is among
        ``listed`` (the names under ``snapshots/``)."""
        try:
            with open(os.path.join(self.directory, f"last-{_paths_key(host, paths)}"), "rb") as f:
                entry = json.loads(f.read())
            sid, plain = str(entry["id"]), bytes.fromhex(entry["snapshot"])
            if sid not in listed:
                return None
            snap = decode_snapshot(sid, plain)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if snap.host != host or sorted(snap.paths) != sorted(paths):
            return None
        return snap

    def record(self, snapshot_id: str, plain: bytes) -> None:
        """Record a committed snapshot as the last of its host and paths, and drop the trees
        no recorded snapshot holds."""
        if self.broken:
            return
        try:
            snap = decode_snapshot(snapshot_id, plain)
            self._prepare()
            _write(os.path.join(self.directory, f"last-{_paths_key(snap.host, snap.paths)}"),
                   json.dumps({"id": snapshot_id, "snapshot": plain.hex()}).encode())
            _fsync_dir(self._trees_dir)
            _fsync_dir(self.directory)
            self._sweep(f"last-{_paths_key(snap.host, snap.paths)}")
        except (OSError, ValueError, KeyError, TypeError):
            return

    def _sweep(self, current: str) -> None:
        with self._lock:
            keep = set(self._used)
        for name in os.listdir(self.directory):
            if name.startswith("last-") and name != current and ".tmp" not in name:
                try:
                    with open(os.path.join(self.directory, name), "rb") as f:
                        entry = json.loads(f.read())
                    root = decode_snapshot(str(entry["id"]), bytes.fromhex(entry["snapshot"])).tree
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                keep |= self._reachable(bytes.fromhex(root))
        for name in os.listdir(self._trees_dir):
            with contextlib.suppress(ValueError):
                if bytes.fromhex(name) in keep:
                    continue
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._trees_dir, name))

    def _reachable(self, root: bytes) -> set[bytes]:
        seen: set[bytes] = set()
        stack = [root]
        while stack:
            tree_id = stack.pop()
            if tree_id in seen:
                continue
            seen.add(tree_id)
            try:
                with open(os.path.join(self._trees_dir, tree_id.hex()), "rb") as f:
                    nodes = decode_tree(f.read())
            except (OSError, ValueError, KeyError, TypeError):
                continue
            stack.extend(n.subtree for n in nodes if n.type == DIR and n.subtree is not None)
        return seen
