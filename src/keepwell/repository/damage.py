"""Damage records: blobs found damaged, kept out of the index so nothing deduplicates against them.

A backup stores a chunk only if the index does not know its id. Once a stored copy is damaged
(a flipped byte, a truncated or lost pack), every later backup of the same data would reuse the
damaged copy and so never heal. ``check --read-data`` and ``repair`` therefore record what they
found, and loading the index leaves those entries out: the next backup that meets the data
stores it again, in a new pack, and every snapshot that references it is restorable again.

Words:
    damaged pair   a blob id and the pack that holds a bad copy of it: its stored bytes failed
                   authentication or did not match the id, or the pack is missing from storage.
                   Only that copy is left out; another pack's copy of the same blob is good.
    record         ``damaged/<hash>`` (encrypted, kind ``kw-damaged``): JSON ``{version: 1,
                   time, packs: {pack object name: [blob id hex, ...]}}``. Written once with a
                   create-only put and never rewritten, so writing one needs no lock and a
                   backup running meanwhile is never disturbed (it keeps the index it loaded).
    settled        a record none of whose packs is stored or listed by an index object any more
                   (they were salvaged, or the index was rebuilt without them, and then deleted);
                   ``repair`` deletes it.

A record that cannot be read is ignored (its damage is found again by the next
``check --read-data``); `Damage.unreadable` names it for ``check`` and ``repair``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping

from keepwell.crypto import content_name
from keepwell.errors import BackendError, IntegrityError, ObjectNotFoundError
from keepwell.repository.damaged import Damage, pack_id_of
from keepwell.repository.format import KIND_DAMAGED, KIND_PENDING
from keepwell.repository.store import RepositoryStore

__all__ = ["KIND_DAMAGED", "PREFIX", "Damage", "check_findings", "load_damage", "pack_id_of",
           "record_damage", "settle"]

PREFIX = "damaged/"


def load_damage(repo: RepositoryStore) -> Damage:
    """The damage records of the repository (one listing, and a read of each record)."""
    records: dict[str, frozenset[str]] = {}
    blobs: dict[bytes, set[bytes]] = {}
    unreadable: list[str] = []
    for info in repo.backend.list(PREFIX):
        try:
            stored = repo.backend.get(info.name)
        except ObjectNotFoundError:
            continue  # settled and deleted since the listing
        try:
            if content_name(stored) != info.name.rsplit("/", 1)[1]:
                raise IntegrityError(f"{info.name} does not match its name")
            doc = json.loads(repo.master.decrypt_object(KIND_DAMAGED, stored, info.name))
            packs = {str(name): [bytes.fromhex(b) for b in ids] for name, ids in doc["packs"].items()}
        except (IntegrityError, ValueError, KeyError, TypeError, AttributeError):
            unreadable.append(info.name)
            continue
        records[info.name] = frozenset(packs)
        for name, ids in packs.items():
            blobs.setdefault(pack_id_of(name), set()).update(ids)
    return Damage(records, {p: frozenset(ids) for p, ids in blobs.items()}, tuple(unreadable))


def record_damage(repo: RepositoryStore, found: Mapping[str, Iterable[bytes]],
                  known: Damage | None = None) -> tuple[str | None, int]:
    """Write one record of the damaged pairs in ``found`` (pack object name -> blob ids) that
    ``known`` does not cover yet. Returns the record's name (None if nothing new) and the
    number of pairs it names."""
    known = known if known is not None else Damage()
    packs: dict[str, list[str]] = {}
    for name, ids in sorted(found.items()):
        pack = pack_id_of(name)
        new = sorted({b for b in ids if not known.covers(pack, b)})
        if new:
            packs[name] = [b.hex() for b in new]
    if not packs:
        return None, 0
    doc = {"version": 1, "time": time.time(), "packs": packs}
    name = PREFIX + repo.put_object(PREFIX.rstrip("/"), KIND_DAMAGED, json.dumps(doc).encode())
    return name, sum(len(ids) for ids in packs.values())


def check_findings(repo: RepositoryStore, found: Mapping[str, Iterable[bytes]]) -> tuple[list[str], list[str]]:
    """What ``check`` adds to its report (errors, warnings): records the damaged pairs it found
    (pack object name -> blob ids), and verifies the small objects nothing else reads whole
    (key files, pending and damage records). A record that cannot be written (read-only
    credentials, storage down) is a warning: the check itself stands."""
    errors: list[str] = []
    warnings: list[str] = []
    damage = repo.damage
    for name in damage.unreadable:
        errors.append(f"{name} is unreadable (damaged); 'keepwell repair index' removes it")
    for prefix, kind in (("keys/", None), ("pending/", KIND_PENDING)):
        for info in repo.backend.list(prefix):
            try:
                stored = repo.backend.get(info.name)
                if content_name(stored) != info.name.rsplit("/", 1)[1]:
                    raise IntegrityError("does not match its name")
                if kind is None:
                    json.loads(stored)
                else:
                    repo.master.decrypt_object(kind, stored, info.name)
            except ObjectNotFoundError:
                continue
            except (IntegrityError, ValueError) as exc:
                fix = ("remove it with 'keepwell key remove' if another key opens the repository"
                       if kind is None else "'keepwell repair index' removes it")
                errors.append(f"{info.name} is damaged ({exc}); {fix}")
    try:
        record, count = record_damage(repo, found, damage)
    except BackendError as exc:
        warnings.append(f"the damaged blobs could not be recorded ({exc}); backups may still "
                        "reuse them")
    else:
        if record is not None:
            warnings.append(f"{count} damaged blob(s) recorded in {record}: backups no longer reuse "
                            "them and store their data again; 'keepwell repair packs' salvages "
                            "the rest of their packs (docs/operations.md)")
    return errors, warnings


def settle(repo: RepositoryStore, damage: Damage, present: set[str]) -> list[str]:
    """Delete the records none of whose packs is in ``present`` (the packs stored or listed by
    an index object, found after ``damage`` was loaded), and unreadable ones; returns what was
    deleted."""
    done = [r for r, packs in damage.records.items() if not packs & present]
    done += list(damage.unreadable)
    deleted = []
    for name in sorted(done):
        try:
            repo.backend.delete(name)
            deleted.append(name)
        except ObjectNotFoundError:
            pass
        except BackendError:
            pass  # tried again by the next repair
    return deleted
