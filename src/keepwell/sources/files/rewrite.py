"""Dropping files from recorded snapshots (``keepwell rewrite``): a secret backed up by mistake.

A `TreeFilter` rebuilds a snapshot's trees without the paths an exclude pattern matches (the
patterns of keepwell.sources.files.select, as ``backup --exclude`` reads them: a matching
directory goes with all it holds). Only the directories on the way to a removed path get new
trees; every other subtree keeps its id, and a directory met again at the same place in another
snapshot is filtered once. keepwell.repository.snapshot_edit stores the new snapshot; the data
of the removed files leaves the repository when no snapshot uses it any more and a prune runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from keepwell.repository.repo import Repository
from keepwell.repository.snapshot import Snapshot
from keepwell.repository.tree import DIR, FILE, Node

SaveTree = Callable[[list[Node]], bytes]


@dataclass
class Removed:
    """What a filter took out of one snapshot: the paths matched (a directory stands for what
    it holds), and the files and bytes that went with them."""

    paths: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0

    def add(self, other: Removed) -> None:
        self.paths += other.paths
        self.files += other.files
        self.bytes += other.bytes


class TreeFilter:
    """``excluded(path)`` says which absolute paths go; ``save`` stores a new tree (or, for a
    dry run, only names it)."""

    def __init__(self, repo: Repository, excluded: Callable[[str], bool], save: SaveTree) -> None:
        self.repo = repo
        self.excluded = excluded
        self.save = save
        self._done: dict[tuple[bytes, str], tuple[bytes, Removed]] = {}

    def snapshot(self, snap: Snapshot) -> tuple[str, Removed]:
        """The id (hex) of the snapshot's filtered root tree (its own when nothing goes)."""
        tree, removed = self._tree(bytes.fromhex(snap.tree), "")
        return tree.hex(), removed

    def _tree(self, tree_id: bytes, base: str) -> tuple[bytes, Removed]:
        key = (tree_id, base)
        done = self._done.get(key)
        if done is not None:
            return done
        kept: list[Node] = []
        removed = Removed()
        for node in self.repo.load_tree(tree_id):
            path = f"{base}/{node.name}"
            if self.excluded(path):
                removed.paths.append(path)
                self._count(node, removed)
                continue
            if node.type == DIR and node.subtree is not None:
                sub, below = self._tree(node.subtree, path)
                if sub != node.subtree:
                    node = replace(node, subtree=sub)
                    removed.add(below)
            kept.append(node)
        new_id = self.save(kept) if removed.paths else tree_id
        self._done[key] = (new_id, removed)
        return new_id, removed

    def _count(self, node: Node, removed: Removed) -> None:
        if node.type == FILE:
            removed.files += 1
            removed.bytes += node.size
        elif node.type == DIR and node.subtree is not None:
            for _path, below in self.repo.walk(node.subtree.hex()):
                if below.type == FILE:
                    removed.files += 1
                    removed.bytes += below.size
