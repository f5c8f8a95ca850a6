"""Replicas: keep a second repository as a mirror of a primary one.

A replica holds the same objects as its primary (so it opens with the same password and can
replace it outright). Objects are immutable and content-named, so mirroring is copying what is
missing and deleting what the primary no longer has, in an order that keeps the replica valid
at every moment: data before the indexes and snapshots that point at it are copied, and
snapshots are deleted before the data they reference. ``sessions/`` (live backup sessions) and
``locks/`` (a running prune's lock) are not mirrored. An object named by the hash of its bytes
(a 64-digit hex name) whose bytes no longer match it is damaged on the primary: it is not
copied (``damaged``), so damage never spreads to the replica, which keeps any good copy it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from keepwell.backends.base import Backend
from keepwell.crypto import content_name

COPY_ORDER = ("config", "keys/", "data/", "tree/", "index/", "snapshots/")
SKIP = ("sessions/", "locks/")  # live sessions and the prune lock belong to the primary


@dataclass
class MirrorResult:
    copied: int = 0
    copied_bytes: int = 0
    deleted: int = 0
    damaged: list[str] = field(default_factory=list)  # on the primary: not copied

    def as_dict(self) -> dict[str, int]:
        return {"copied": self.copied, "copied_bytes": self.copied_bytes,
                "deleted": self.deleted, "damaged": len(self.damaged)}


def _damaged(name: str, data: bytes) -> bool:
    base = name.rsplit("/", 1)[-1]
    named = len(base) == 64 and all(c in "0123456789abcdef" for c in base)
    return named and content_name(data) != base


def _rank(name: str) -> int:
    for i, prefix in enumerate(COPY_ORDER):
        if name == prefix or name.startswith(prefix):
            return i
    return len(COPY_ORDER)


def mirror(primary: Backend, replica: Backend) -> MirrorResult:
    """Make ``replica`` hold exactly the objects of ``primary`` (outside ``SKIP``)."""
    result = MirrorResult()
    have = {o.name for o in replica.list("") if not o.name.startswith(SKIP)}
    want = {o.name: o.size for o in primary.list("") if not o.name.startswith(SKIP)}
    for name in sorted(set(want) - have, key=lambda n: (_rank(n), n)):
        data = primary.get(name)
        if _damaged(name, data):
            result.damaged.append(name)
            continue
        replica.put(name, data, overwrite=True)
        result.copied += 1
        result.copied_bytes += len(data)
    for name in sorted(have - set(want), key=lambda n: (-_rank(n), n)):
        replica.delete(name)
        result.deleted += 1
    return result
