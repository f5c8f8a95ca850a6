"""How much snapshots hold, counted in restic's four ways (``keepwell stats --mode``).

Modes:
    restore-size       every entry of every snapshot (files, directories, links...), and the
                       bytes of its files: what restoring them all would write
    files-by-contents  files counted once per distinct content, whatever their name or snapshot
    blobs-per-file     for each file path, the distinct data blobs it references and their size
                       before compression (a blob shared by two paths counts twice)
    raw-data           the distinct blobs (data and trees) the snapshots use, as stored:
                       compressed and encrypted size, size before compression, and the
                       deduplication of file bytes into them; of the whole repository (every
                       blob of the index, and the packs' own size) when no snapshot is chosen

A directory tree already counted is skipped where the mode cannot count it twice (raw-data,
files-by-contents), so many snapshots of mostly unchanged trees are counted quickly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from keepwell.errors import UsageError
from keepwell.repository.format import TREE
from keepwell.repository.repo import Repository
from keepwell.repository.snapshot import Snapshot
from keepwell.repository.tree import DIR, FILE, Node

MODES = ("restore-size", "files-by-contents", "blobs-per-file", "raw-data")


def _nodes(repo: Repository, snaps: Iterable[Snapshot],
           seen: set[bytes] | None) -> Iterator[tuple[str, Node]]:
    """Every node of the snapshots with its path; with ``seen``, each tree once only."""
    for snap in snaps:
        root = bytes.fromhex(snap.tree)
        if seen is not None:
            if root in seen:
                continue
            seen.add(root)
        stack: list[tuple[bytes, str]] = [(root, "")]
        while stack:
            tree_id, base = stack.pop()
            for node in repo.load_tree(tree_id):
                path = f"{base}/{node.name}"
                yield path, node
                if node.type == DIR and node.subtree is not None:
                    if seen is not None:
                        if node.subtree in seen:
                            continue
                        seen.add(node.subtree)
                    stack.append((node.subtree, path))


def _ratios(raw: int, unique_raw: int, stored: int) -> dict[str, float]:
    return {"dedup_ratio": round(raw / unique_raw, 3) if unique_raw else 0,
            "compression_ratio": round(unique_raw / stored, 3) if stored else 0,
            "compression_space_saving": round(100 * (1 - stored / unique_raw), 2)
            if unique_raw else 0}


def raw_data(repo: Repository, snaps: list[Snapshot], *, whole: bool) -> dict[str, Any]:
    """The ``raw-data`` counts (see the module doc); ``whole``: the whole repository."""
    raw = sum(n.size for snap in snaps for _p, n in repo.walk(snap) if n.type == FILE)
    used: set[bytes] = set()  # the blobs the snapshots use: trees (as `_nodes` meets them), data
    if not whole:
        for _p, node in _nodes(repo, snaps, used):
            used.update(node.content)
    blobs = {"data": 0, "tree": 0}
    unique_raw = stored = 0
    index = repo.index
    locations = index.entries() if whole else ((b, index.lookup(b)) for b in used)
    for _bid, loc in locations:
        if loc is None:
            continue
        blobs["tree" if loc.type == TREE else "data"] += 1
        unique_raw += loc.raw_length
        stored += loc.length
    if whole:  # what the packs take, headers and unused data too
        stored = sum(i.size for p in ("data/", "tree/") for i in repo.backend.list(p))
    return {"mode": "raw-data", "snapshots": len(snaps), "total_size": stored,
            "total_uncompressed_size": unique_raw, "total_blob_count": blobs["data"] + blobs["tree"],
            "total_file_size": raw, "unique_raw_size": unique_raw, "stored_size": stored,
            **_ratios(raw, unique_raw, stored), "blobs": blobs,
            "index_bytes_in_memory": index.nbytes()}


def parse_mode(mode: str) -> str:
    """``mode`` if it is one of `MODES`; else a `UsageError`."""
    if mode not in MODES:
        raise UsageError(f"--mode {mode!r}: give one of {', '.join(MODES)}")
    return mode


def snapshot_stats(repo: Repository, snaps: list[Snapshot], mode: str, *,
                   whole: bool = False) -> dict[str, Any]:
    """The counts of ``mode`` over ``snaps``; ``whole``: no snapshot was chosen (raw-data then
    counts the whole repository)."""
    if parse_mode(mode) == "raw-data":
        return raw_data(repo, snaps, whole=whole)
    out: dict[str, Any] = {"mode": mode, "snapshots": len(snaps)}
    count = size = 0
    if mode == "restore-size":
        for snap in snaps:
            for _p, node in repo.walk(snap):
                count += 1
                size += node.size if node.type == FILE else 0
    elif mode == "files-by-contents":
        contents: set[tuple[bytes, ...]] = set()
        for _p, node in _nodes(repo, snaps, set()):
            if node.type == FILE and (key := tuple(node.content)) not in contents:
                contents.add(key)
                count += 1
                size += node.size
    else:  # blobs-per-file
        per_path: dict[str, set[bytes]] = {}
        blobs = 0
        index = repo.index
        for path, node in _nodes(repo, snaps, None):
            if node.type != FILE or not node.content:
                continue
            seen = per_path.setdefault(path, set())
            for b in node.content:
                if b not in seen:
                    seen.add(b)
                    loc = index.lookup(b)
                    size += loc.raw_length if loc is not None else 0
                    blobs += 1
        count = len(per_path)
        out["total_blob_count"] = blobs
    out["total_file_count"] = count
    out["total_size"] = size
    return out
