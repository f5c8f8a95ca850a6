"""Finding files in snapshots by pattern (``keepwell find``).

A pattern is one of keepwell.sources.files.select's, matched with ``below=False``: it must end
at the path it matches, so ``*.txt`` finds files named so and ``/srv/data`` that directory, not
everything below it. An optional window on the modification time (``oldest``, ``newest``)
narrows the matches.

Snapshots share unchanged directories (a tree id names its content), so a `Finder` remembers the
matches of each tree at each place it was met: searching a hundred snapshots of a tree that
barely changes reads each directory's tree once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from keepwell.repository.repo import Repository
from keepwell.repository.snapshot import Snapshot
from keepwell.repository.tree import DIR, Node
from keepwell.sources.files.select import Matcher


@dataclass(frozen=True)
class Match:
    path: str  # absolute, as backed up
    node: Node


class Finder:
    def __init__(self, repo: Repository, patterns: Iterable[str], *, ignore_case: bool = False,
                 oldest_ns: int | None = None, newest_ns: int | None = None) -> None:
        self.repo = repo
        self.matcher = Matcher(patterns, ignore_case=ignore_case, below=False)
        self.oldest_ns = oldest_ns
        self.newest_ns = newest_ns
        self._seen: dict[tuple[bytes, str], list[Match]] = {}

    def in_snapshot(self, snap: Snapshot) -> list[Match]:
        """The matches of one snapshot, each directory before what it holds."""
        return self._in_tree(bytes.fromhex(snap.tree), "")

    def _wanted(self, path: str, node: Node) -> bool:
        if self.oldest_ns is not None and node.mtime_ns < self.oldest_ns:
            return False
        if self.newest_ns is not None and node.mtime_ns > self.newest_ns:
            return False
        return self.matcher.matches(path)

    def _in_tree(self, tree_id: bytes, base: str) -> list[Match]:
        key = (tree_id, base)
        found = self._seen.get(key)
        if found is None:
            found = []
            for node in self.repo.load_tree(tree_id):
                path = f"{base}/{node.name}"
                if self._wanted(path, node):
                    found.append(Match(path, node))
                if node.type == DIR and node.subtree is not None:
                    found += self._in_tree(node.subtree, path)
            self._seen[key] = found
        return found
