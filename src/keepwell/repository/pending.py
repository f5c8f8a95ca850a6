"""Pending records: the packs a prune has doomed, kept until no reader can still need them.

A prune does not delete a pack the moment no index lists it: it writes a record
``pending/<hash>`` (encrypted, kind ``kw-pending``: JSON ``{version: 1, time, sessions, packs,
deferred}``) naming the doomed packs and the sessions that were live, and a later prune deletes
them once those sessions ended and the grace time passed. Until then `Repository.locate` still
finds blobs in them, so a restore or a copy that started before the prune goes on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from keepwell.crypto import content_name
from keepwell.errors import IntegrityError, ObjectNotFoundError
from keepwell.repository.format import KIND_PENDING
from keepwell.repository.store import RepositoryStore


@dataclass(frozen=True)
class PendingRecord:
    name: str  # object name, pending/<hash>
    time: float
    sessions: frozenset[str]
    packs: dict[str, int]  # doomed: pack object name -> size
    deferred: frozenset[str] = frozenset()  # still indexed, unused, maybe a running backup's

    def ended(self, live: set[str]) -> bool:
        return not (self.sessions & live)

    def ready(self, live: set[str], now: float, grace: float) -> bool:
        return self.ended(live) and now - self.time >= grace


def load_pending(repo: RepositoryStore, warnings: list[str] | None = None) -> list[PendingRecord]:
    out = []
    for info in repo.backend.list("pending/"):
        try:
            stored = repo.backend.get(info.name)
        except ObjectNotFoundError:
            continue  # finished by a prune since the listing
        try:
            if content_name(stored) != info.name.rsplit("/", 1)[1]:
                raise IntegrityError(f"{info.name} does not match its name")
            d = json.loads(repo.master.decrypt_object(KIND_PENDING, stored, info.name))
            out.append(PendingRecord(info.name, float(d["time"]), frozenset(d["sessions"]),
                                     {str(k): int(v) for k, v in d["packs"].items()},
                                     frozenset(d.get("deferred", []))))
        except (IntegrityError, ValueError, KeyError, TypeError) as exc:
            # its packs count as orphans: the next marking covers them again
            if warnings is not None:
                warnings.append(f"{info.name} is unreadable ({exc}); its packs are treated as orphans")
    return out


def write_pending(repo: RepositoryStore, when: float, sessions: Iterable[str], packs: dict[str, int],
                  deferred: Iterable[str] = ()) -> str:
    doc = {"version": 1, "time": when, "sessions": sorted(sessions), "packs": packs,
           "deferred": sorted(deferred)}
    return "pending/" + repo.put_object("pending", KIND_PENDING, json.dumps(doc).encode())
