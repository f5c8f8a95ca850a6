"""Snapshots: the record of one backup, written last, pointing at a root tree.

A snapshot holds the time, host, user, paths, tags, the kind of source (``files``, ``stdin``,
``sqlite``, ``postgres``...), the root tree, the parent snapshot, summary figures and a free-form
``source`` dict in which database sources keep what they need (LSNs, binlog positions...).
A snapshot made by changing another one (``tag``, ``rewrite``: see
keepwell.repository.snapshot_edit) names that one's id in ``original``.

A `SnapshotFilter` selects snapshots as restic's ``--host``/``--tag``/``--path`` do (and by
kind): any of the hosts; any of the tag groups, each group needing all its tags (``--tag a,b``
needs both, ``--tag a --tag b`` either); every one of the paths, compared exactly; any of the
kinds. An empty field selects everything.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class Snapshot:
    id: str
    time: datetime
    host: str
    username: str
    paths: list[str]
    tags: list[str]
    kind: str
    tree: str
    parent: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    program_version: str = ""
    original: str | None = None
    # the role of the key that wrote it (keepwell.repository.keyring): told by how its object is
    # encrypted, not stored in it (an append key can write any JSON it likes)
    written_by: str = "full"

    @property
    def short_id(self) -> str:
        return self.id[:8]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["time"] = self.time.isoformat()
        d["short_id"] = self.short_id
        return d


def encode_snapshot(fields: dict[str, Any]) -> bytes:
    data = dict(fields)
    data["time"] = data["time"].astimezone(UTC).isoformat()
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def decode_snapshot(snapshot_id: str, plain: bytes) -> Snapshot:
    """The snapshot an object holds. A field of the wrong kind is a `ValueError` or
    `TypeError`, as bad JSON is: the object may have been written by any holder of an append
    key, and one that decodes into a time without a time zone, a tree that is no id, or a
    host, tag or path that is not text would fail every command that lists snapshots."""
    d = json.loads(plain)
    if not isinstance(d, dict):
        raise TypeError(f"a snapshot is a JSON object, not {type(d).__name__}")
    time = datetime.fromisoformat(d["time"])
    if time.tzinfo is None:
        raise ValueError(f"time {d['time']!r} has no time zone")
    tree = _text(d, "tree")
    bytes.fromhex(tree)  # an id: its error says where it is not hex
    return Snapshot(
        id=snapshot_id,
        time=time,
        host=_text(d, "host", ""),
        username=_text(d, "username", ""),
        paths=_texts(d, "paths"),
        tags=_texts(d, "tags"),
        kind=_text(d, "kind", "files"),
        tree=tree,
        parent=_text(d, "parent", None),
        summary=_object(d, "summary"),
        source=_object(d, "source"),
        program_version=_text(d, "program_version", ""),
        original=_text(d, "original", None),
    )


_REQUIRED = object()


def _text(d: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    """The string at ``key`` (``default`` where it is missing, or null for an optional one)."""
    if key not in d and default is not _REQUIRED:
        return default
    value = d[key]
    if value is None and default is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{key} is {type(value).__name__}, not text")
    return value


def _texts(d: dict[str, Any], key: str) -> list[str]:
    value = d.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{key} is not a list of text")
    return value


def _object(d: dict[str, Any], key: str) -> dict[str, Any]:
    value = d.get(key, {})
    if not isinstance(value, dict):
        raise TypeError(f"{key} is {type(value).__name__}, not an object")
    return value


@dataclass(frozen=True)
class SnapshotFilter:
    hosts: tuple[str, ...] = ()
    tag_groups: tuple[tuple[str, ...], ...] = ()
    paths: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()

    @classmethod
    def parse(cls, *, hosts: Iterable[str] = (), tags: Iterable[str] = (),
              paths: Iterable[str] = (), kinds: Iterable[str] = ()) -> SnapshotFilter:
        """From option values: each ``tags`` item is a comma-separated group; an absolute path
        is normalised (``/srv/data/`` is ``/srv/data``)."""
        return cls(
            hosts=tuple(hosts),
            tag_groups=tuple(tuple(t for t in group.split(",") if t) for group in tags),
            paths=tuple(posixpath.normpath(p) if p.startswith("/") else p for p in paths),
            kinds=tuple(kinds),
        )

    def __bool__(self) -> bool:
        return bool(self.hosts or self.tag_groups or self.paths or self.kinds)

    def matches(self, snap: Snapshot) -> bool:
        if self.hosts and snap.host not in self.hosts:
            return False
        if self.kinds and snap.kind not in self.kinds:
            return False
        if self.paths and not set(self.paths) <= set(snap.paths):
            return False
        if self.tag_groups:
            tags = set(snap.tags)
            # an empty group (``--tag ""``) selects the snapshots without tags
            return any(set(g) <= tags if g else not tags for g in self.tag_groups)
        return True

    def describe(self) -> str:
        """The filter as the options that make it, for messages."""
        parts = [f"--host {h}" for h in self.hosts]
        parts += [f"--tag {','.join(g)}" for g in self.tag_groups]
        parts += [f"--path {p}" for p in self.paths]
        parts += [f"--kind {k}" for k in self.kinds]
        return " ".join(parts)
