"""Snapshots: the record of one backup, written last, pointing at a root tree.

A snapshot holds the time, host, user, paths, tags, the kind of source (``files``, ``stdin``,
``sqlite``, ``postgres``...), the root tree, the parent snapshot, summary figures and a free-form
``source`` dict in which database sources keep what they need (LSNs, binlog positions...).
"""

from __future__ import annotations

import json
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
    d = json.loads(plain)
    return Snapshot(
        id=snapshot_id,
        time=datetime.fromisoformat(d["time"]),
        host=d.get("host", ""),
        username=d.get("username", ""),
        paths=list(d.get("paths", [])),
        tags=list(d.get("tags", [])),
        kind=d.get("kind", "files"),
        tree=d["tree"],
        parent=d.get("parent"),
        summary=dict(d.get("summary", {})),
        source=dict(d.get("source", {})),
        program_version=d.get("program_version", ""),
    )
