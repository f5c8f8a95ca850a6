"""Changing recorded snapshots (``tag``, ``rewrite``) without ever rewriting an object.

A snapshot object is immutable, so a change is a new snapshot object: the original's time, host,
user, paths, kind, parent, summary and source, with the new tags or the new root tree, and
``original``: the id of the snapshot it replaces (or that snapshot's own ``original``, so the id
of the backup that made it survives a chain of changes).

Words:
    edit      one replacement: the new snapshot object stored, then (for ``tag``, and for
              ``rewrite --forget``) the old one forgotten
    original  the id of the snapshot the backup itself wrote, kept across edits

The order is what makes an edit crash-safe: the new object is stored (the backend's ``put``
returns once it is durable) before the old one is deleted, so a crash in between leaves both
snapshots, never neither. An `SnapshotEditor` holds a session while it works (see
keepwell.repository.sessions), so a prune running meanwhile keeps the trees and blobs the new
snapshot references, and stores new trees (a rewrite's) through a `BlobSink`, flushed (packs and
index object stored) before the snapshot object that needs them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from keepwell.repository.format import KIND_SNAPSHOT, TREE
from keepwell.repository.packer import BlobSink
from keepwell.repository.repo import Repository
from keepwell.repository.sessions import Session
from keepwell.repository.snapshot import Snapshot, decode_snapshot, encode_snapshot
from keepwell.repository.tree import Node, encode_tree


def changed_tags(tags: Iterable[str], *, add: Iterable[str] = (), remove: Iterable[str] = (),
                 set_: Iterable[str] | None = None) -> list[str]:
    """The tags after ``--set`` (replacing all), then ``--add`` and ``--remove``; sorted."""
    out = set(tags) if set_ is None else set(set_)
    out |= set(add)
    out -= set(remove)
    return sorted(out)


class SnapshotEditor:
    """Replaces snapshots by edited copies, under one session (a context manager)."""

    def __init__(self, repo: Repository, purpose: str) -> None:
        self.repo = repo
        self.session = Session(repo, purpose)
        self._sink: BlobSink | None = None
        try:
            repo.refresh_index()  # after the session exists: see keepwell.repository.sessions
        except BaseException:
            self.session.end()
            raise

    def __enter__(self) -> SnapshotEditor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def save_tree(self, nodes: list[Node]) -> bytes:
        """Store one tree blob (if the repository lacks it); its id."""
        if self._sink is None:
            self._sink = BlobSink(self.repo)
        return self._sink.save(TREE, encode_tree(nodes))

    def replace(self, old: Snapshot, *, tags: list[str] | None = None, tree: str | None = None,
                summary: dict[str, Any] | None = None) -> Snapshot:
        """Store the edited copy of ``old`` (after every tree it needs) and return it. ``old``
        itself stays: forgetting it is the caller's next step."""
        if self._sink is not None:
            self._sink.flush()
        fields = {
            "time": old.time, "host": old.host, "username": old.username, "paths": old.paths,
            "tags": sorted(set(old.tags if tags is None else tags)), "kind": old.kind,
            "tree": old.tree if tree is None else tree, "parent": old.parent,
            "summary": {**old.summary, **(summary or {})}, "source": old.source,
            "program_version": old.program_version, "original": old.original or old.id,
        }
        plain = encode_snapshot(fields)
        sid = self.repo.put_object("snapshots", KIND_SNAPSHOT, plain)
        snap = decode_snapshot(sid, plain)
        self.repo.events.emit("snapshot_saved", snapshot=snap)
        return snap

    def close(self) -> None:
        try:
            if self._sink is not None:
                try:
                    self._sink.flush()  # what was stored whole is indexed, for later runs
                except Exception:
                    pass  # raised already where it happened (or no snapshot needs it)
                self._sink.close()
        finally:
            self.session.end()
