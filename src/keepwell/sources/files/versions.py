"""The versions of one path across snapshots (``keepwell log``, docs/files.md).

A *version* is what a run of consecutive snapshots holds at the path: the same type, content,
size, modification time and mode. Its *content id* names the content alone: a hash of the
file's blob ids (equal ids, equal bytes), a directory's tree id, a symlink's target. A *gap* is
a run of snapshots without the path, after it was first seen (deleted, then maybe recreated).

Only the snapshots whose backed-up paths contain the path count: a snapshot of /home says
nothing about /srv. Each snapshot is looked up along the path alone (one tree per component),
and a directory's answer is remembered by its tree id: snapshots share every directory that
did not change, so a hundred snapshots of a barely changing tree read few trees.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from keepwell.repository.repo import Repository
from keepwell.repository.snapshot import Snapshot
from keepwell.repository.tree import DIR, SYMLINK, Node


def content_id(node: Node) -> str:
    """A short name for a node's content: equal for equal content of the same type."""
    if node.type == DIR:
        return node.subtree.hex()[:16] if node.subtree is not None else "-"
    h = hashlib.blake2b(node.type.encode(), digest_size=8)
    if node.type == SYMLINK:
        h.update(b"\0" + (node.target or "").encode("utf-8", "surrogateescape"))
    for blob in node.content:
        h.update(blob)
    return h.hexdigest()


@dataclass
class Run:
    """Consecutive snapshots that hold one version (``node`` set) or lack the path (None)."""

    node: Node | None
    content: str
    snapshots: list[Snapshot] = field(default_factory=list)

    @property
    def present(self) -> bool:
        return self.node is not None

    def key(self) -> tuple[object, ...]:
        n = self.node
        if n is None:
            return (None,)
        return (n.type, self.content, n.size, n.mtime_ns, n.mode)


def covers(snap: Snapshot, path: str) -> bool:
    """Whether ``snap`` backed up ``path`` (one of its paths is it or a directory above it)."""
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in snap.paths)


class PathHistory:
    def __init__(self, repo: Repository, path: str) -> None:
        self.repo = repo
        self.path = "/" + path.strip("/")
        self.parts = [p for p in self.path.split("/") if p]
        # (tree id, depth) -> the node the rest of the path leads to from there (None: absent)
        self._at: dict[tuple[bytes, int], Node | None] = {}
        self.trees_read = 0

    def lookup(self, snap: Snapshot) -> Node | None:
        """The node at the path in ``snap``, or None."""
        return self._from(bytes.fromhex(snap.tree), 0)

    def _from(self, tree_id: bytes, depth: int) -> Node | None:
        key = (tree_id, depth)
        if key in self._at:
            return self._at[key]
        self.trees_read += 1
        name = self.parts[depth]
        found = next((n for n in self.repo.load_tree(tree_id) if n.name == name), None)
        if found is not None and depth + 1 < len(self.parts):
            found = (self._from(found.subtree, depth + 1)
                     if found.type == DIR and found.subtree is not None else None)
        self._at[key] = found
        return found

    def runs(self, snapshots: Iterable[Snapshot]) -> tuple[list[Run], int]:
        """The runs over ``snapshots`` (oldest first) that cover the path, from the first one
        holding it; and how many snapshots were searched."""
        out: list[Run] = []
        searched = 0
        for snap in snapshots:
            if not covers(snap, self.path):
                continue
            searched += 1
            node = self.lookup(snap) if self.parts else None
            if node is None and not out:
                continue  # not there yet
            run = Run(node, content_id(node) if node is not None else "")
            if out and out[-1].key() == run.key():
                out[-1].snapshots.append(snap)
            else:
                run.snapshots.append(snap)
                out.append(run)
        return out, searched
