"""A snapshot of a tree from its parent snapshot and the paths that changed: O(changes).

Words:
    changes     a `Changes` trie of the paths that changed under one root, each either a
                single entry (a file created, written, deleted or renamed; a directory whose own
                metadata changed) or a whole subtree to scan again (a new directory, an overflow)
    rebuild     `rebuild`: the root's new node. Only the directories on the way to a change
                are stat'ed and get a new tree; the entries a change names are stat'ed and, for
                files, read; every other directory keeps the parent's tree blob as it is, and no
                directory is listed unless its whole subtree is to be scanned again (which the
                file archiver does, against the parent's tree, reading only what changed)
    settled     a file is taken at a consistent point: read, then stat'ed again; if its size,
                mtime, ctime or inode moved, it is read again after a short pause, a few times
                (a large one is not: the next commit reads it); a file that never settles is
                stored as last read and reported in ``moving``, so that its change stays
                pending for the next snapshot

`Rebuild.counts` says what a rebuild cost (``trees_loaded``, ``trees_written``,
``files_read``, ``subtrees_scanned``...): what a caller can check O(changes) against.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from keepwell.repository import Repository
from keepwell.repository.tree import DIR, FILE, SOCKET, SYMLINK, Node, tree_key
from keepwell.repository.writer import SnapshotWriter
from keepwell.sources.files import metadata
from keepwell.sources.files.archiver import Archiver, _Names, node_from_stat
from keepwell.sources.files.fssnapshot import BTRFS_ROOT_INODE, is_own_btrfs_snapshot
from keepwell.sources.files.select import Selection

_SETTLE_TRIES = 4
_SETTLE_PAUSE = 0.02  # seconds before the first retry; doubled for each next one
# a file this large that moved while it was read is not read again in place (reading it again
# and again would hold back every other change of the commit: a log appended to ten times a
# second moves during most reads of its 64 MiB); it stays pending for the next commit
_SETTLE_IN_PLACE = 1024 * 1024


@dataclass
class Changes:
    """The changed paths under one directory, by entry name."""

    children: dict[str, Changes] = field(default_factory=dict)
    subtree: bool = False

    def add(self, parts: list[str], subtree: bool) -> None:
        c = self
        for part in parts:
            if c.subtree:
                return  # the whole subtree is scanned anyway
            c = c.children.setdefault(part, Changes())
        if subtree:
            c.subtree = True
            c.children.clear()


def changes_under(root: str, paths: dict[str, bool]) -> Changes | None:
    """The `Changes` for ``root`` from ``paths`` (path -> whole subtree?), or None if none of
    the paths is under ``root``."""
    out: Changes | None = None
    prefix = root.rstrip("/") + "/"
    for p, subtree in paths.items():
        if p == root:
            parts: list[str] = []
        elif p.startswith(prefix):
            parts = p[len(prefix):].split("/")
        else:
            continue
        if out is None:
            out = Changes()
        out.add(parts, subtree)
    return out


def _same_file(a: Node, st: os.stat_result) -> bool:
    return (a.type == FILE and a.size == st.st_size and a.mtime_ns == st.st_mtime_ns
            and a.ctime_ns == st.st_ctime_ns and a.inode == st.st_ino)


class Rebuild:
    """One snapshot's rebuild of changed paths on top of the parent's trees."""

    def __init__(self, repo: Repository, writer: SnapshotWriter, archiver: Archiver,
                 selection: Selection, *, one_file_system: bool = False) -> None:
        self.repo = repo
        self.writer = writer
        self.archiver = archiver
        self.selection = selection
        self.one_file_system = one_file_system
        self.names = _Names()
        self.xattrs = metadata.XattrReader()
        self.moving: list[str] = []
        self.errors: list[tuple[str, str]] = []
        self.counts = {"trees_loaded": 0, "trees_written": 0, "files_read": 0,
                       "entries_checked": 0, "subtrees_scanned": 0}

    def rebuild(self, path: str, old: Node | None, changes: Changes) -> Node | None:
        """The new node of ``path`` (a root of the watch): None if it is gone."""
        try:
            st = os.lstat(path)
        except OSError as exc:
            self.errors.append((path, exc.strerror or str(exc)))
            return None
        return self._entry(path, st, old, changes, dev=st.st_dev)

    def _entry(self, path: str, st: os.stat_result, old: Node | None, changes: Changes,
               dev: int) -> Node | None:
        self.counts["entries_checked"] += 1
        name = path.rsplit("/", 1)[-1]
        node = node_from_stat(name, st, self.names)
        if node.type == DIR:
            return self._dir(path, node, old, changes, dev)
        if node.type == FILE:
            if self.selection.skips_size(st):
                return None
            return self._file(path, node, st, old)
        if node.type == SOCKET:
            return None
        try:
            node.xattrs = self.xattrs.read(path, st.st_dev)
            if node.type == SYMLINK:
                node.target = os.readlink(path)
        except OSError as exc:
            self.errors.append((path, exc.strerror or str(exc)))
            return None
        return node

    def _dir(self, path: str, node: Node, old: Node | None, changes: Changes, dev: int) -> Node | None:
        if changes.subtree or old is None or old.type != DIR or old.subtree is None \
                or not self.repo.index.has(old.subtree):
            self.counts["subtrees_scanned"] += 1
            st = os.lstat(path)
            return self.archiver.backup_tree(path, st, old if old is not None and old.type == DIR else None)
        self.counts["trees_loaded"] += 1
        old_nodes = self.repo.load_tree(old.subtree)
        # the entries in tree order, with the encodings of those left as they were where the
        # tree was held with them (a directory of many files rewritten for a few); a changed
        # entry's slot is rewritten or emptied, a new name goes at the end (then sorted)
        nodes: list[Node | None] = list(old_nodes)
        held = self.repo.tree_pieces(old.subtree)
        pieces: list[bytes | None] = list(held) if held is not None else [None] * len(nodes)
        slot = {n.name: i for i, n in enumerate(old_nodes)}
        changed = False
        for name, sub in changes.children.items():
            child = f"{path}/{name}"
            i = slot.get(name)
            new = None
            if not (self.selection.by_path and self.selection.skips_path(child)):
                new = self._child(child, name, None if i is None else nodes[i], sub, dev)
            if i is None:
                if new is not None:
                    slot[name] = len(nodes)
                    nodes.append(new)
                    pieces.append(None)
                    changed = True
            elif new is not nodes[i]:
                nodes[i] = new
                pieces[i] = None
                changed = True
        try:
            node.xattrs = self.xattrs.read(path, node.dev, directory=True)
        except OSError as exc:
            self.errors.append((path, exc.strerror or str(exc)))
        entries = [n for n in nodes if n is not None]
        if not changed or entries == old_nodes:
            node.subtree = old.subtree
            return node
        known = [p for n, p in zip(nodes, pieces, strict=True) if n is not None]
        ordered = len(nodes) == len(old_nodes)
        if not ordered:  # a name was added: sort, and the encodings with them
            order = sorted(range(len(entries)), key=lambda k: tree_key(entries[k]))
            entries = [entries[k] for k in order]
            known = [known[k] for k in order]
        node.subtree = self.writer.save_tree(entries, ordered=True, known=known)
        self.repo.forget_tree(old.subtree)  # superseded: room for the trees still to come
        self.counts["trees_written"] += 1
        return node

    def _child(self, child: str, name: str, old: Node | None, sub: Changes, dev: int) -> Node | None:
        """The new node of an entry a change names (None: gone, or no longer recorded)."""
        try:
            st = os.lstat(child)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            self.errors.append((child, exc.strerror or str(exc)))
            return None
        if (self.one_file_system and st.st_dev != dev) or (
                st.st_ino == BTRFS_ROOT_INODE and is_own_btrfs_snapshot(name, st)):
            return None  # another filesystem; a backup's btrfs snapshot
        return self._entry(child, st, old, sub, dev)

    def _file(self, path: str, node: Node, st: os.stat_result, old: Node | None) -> Node | None:
        pause = _SETTLE_PAUSE
        for attempt in range(_SETTLE_TRIES):
            if old is not None and _same_file(old, st) and old.mode == node.mode \
                    and old.uid == node.uid and old.gid == node.gid and old.nlink == node.nlink \
                    and old.xattrs is not None and all(self.repo.index.has_each(old.content)):
                return old  # the event changed nothing this snapshot records
            try:
                node.content = self.archiver.read_file(path, node)
                self.counts["files_read"] += 1
                after = os.lstat(path)
            except FileNotFoundError:
                return None
            except OSError as exc:
                self.errors.append((path, exc.strerror or str(exc)))
                return old
            if after.st_size == node.size and after.st_mtime_ns == st.st_mtime_ns \
                    and after.st_ctime_ns == st.st_ctime_ns and after.st_ino == st.st_ino:
                return node
            if attempt == _SETTLE_TRIES - 1 or max(node.size, after.st_size) >= _SETTLE_IN_PLACE:
                break
            time.sleep(pause)  # still being written: let the writer get on, then read again
            pause *= 2
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return None
            node = node_from_stat(node.name, st, self.names)
            if node.type != FILE:  # replaced by something else: the next snapshot takes it
                break
        self.moving.append(path)
        return node
