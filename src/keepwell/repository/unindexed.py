"""Packs that no index lists (pending deletion, or orphans): what they hold and whether they
are whole.

Packs are self-describing: each ends with an encrypted header of its blobs, read here from the
pack's tail without the index. Prune and check use this to find blobs and trees that only such
packs hold, and prune reads a pack whole before indexing it again (`damaged_packs`): nothing is
indexed before it is known whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from keepwell.crypto import content_name
from keepwell.errors import IntegrityError, KeepwellError, ObjectNotFoundError
from keepwell.repository.format import PACK_PREFIX, TREE, PackEntry
from keepwell.repository.index import MasterIndex
from keepwell.repository.packreader import read_header_and_sender
from keepwell.repository.store import RepositoryStore
from keepwell.repository.tree import Node, decode_tree


def read_pack_header(repo: RepositoryStore, name: str) -> list[PackEntry] | None:
    """The blobs a pack says it holds (packs are self-describing); None if unreadable. Copies
    recorded as damaged are left out (keepwell.repository.damage), so that no pack is indexed
    again for their sake."""
    try:
        entries, sender = read_header_and_sender(repo.backend, repo.master, name)
    except (KeepwellError, ValueError):
        return None
    pack = bytes.fromhex(name.rsplit("/", 1)[1])
    if sender is not None:  # the blobs of a pack are under the key of its header's sender
        repo.senders[pack] = sender
    return [e for e in entries if not repo.damage.covers(pack, e.id)]


def damaged_packs(repo: RepositoryStore, names: Iterable[str]) -> dict[str, str]:
    """Of packs about to be indexed again (read whole, a few at once), those whose bytes do not
    match their name or cannot be read, and why: nothing is indexed before it is known whole."""

    def why(name: str) -> str | None:
        try:
            data = repo.backend.get(name)
        except ObjectNotFoundError:
            return "it is gone"
        except KeepwellError as exc:
            return f"it cannot be read: {exc}"
        return None if content_name(data) == name.rsplit("/", 1)[1] else \
            "its bytes do not match its name"

    names = sorted(names)
    with ThreadPoolExecutor(4) as pool:
        return {n: w for n, w in zip(names, pool.map(why, names), strict=True) if w is not None}


def pack_type_of(name: str) -> int:
    return TREE if name.startswith(PACK_PREFIX[TREE] + "/") else 0


def unique_entries(entries: Iterable[PackEntry]) -> list[PackEntry]:
    seen: set[bytes] = set()
    out = []
    for e in entries:
        if e.id not in seen:
            seen.add(e.id)
            out.append(e)
    return out


class UnindexedPacks:
    """Stored packs that no index lists (pending deletion or orphans); headers read on demand."""

    def __init__(self, repo: RepositoryStore, names: Iterable[str]) -> None:
        self.repo = repo
        self.names = set(names)
        self._headers: dict[str, list[PackEntry] | None] | None = None
        self._where: dict[bytes, tuple[str, PackEntry]] = {}

    def _load(self) -> dict[str, list[PackEntry] | None]:
        if self._headers is None:
            names = sorted(self.names)
            with ThreadPoolExecutor(8) as pool:
                headers = dict(zip(names, pool.map(lambda n: read_pack_header(self.repo, n), names),
                                   strict=True))
            for name, header in headers.items():
                for e in header or []:
                    self._where.setdefault(e.id, (name, e))
            self._headers = headers
        return self._headers

    def header(self, name: str) -> list[PackEntry] | None:
        return self._load().get(name)

    def find(self, blob_id: bytes) -> tuple[str, PackEntry] | None:
        if not self.names:
            return None
        self._load()
        return self._where.get(blob_id)


def load_tree_anywhere(repo: RepositoryStore, index: MasterIndex, unindexed: UnindexedPacks | None,
                       tree_id: bytes) -> list[Node]:
    """A tree from the index, or else from a pack no index lists (a pending or orphan pack)."""
    if index.has(tree_id):
        return repo.load_tree(tree_id)
    hit = unindexed.find(tree_id) if unindexed is not None else None
    if hit is None:
        raise IntegrityError(f"tree {tree_id.hex()[:16]} that a snapshot references is missing",
                             hint="run 'keepwell check', and forget the snapshots it names")
    name, e = hit
    stored = repo.backend.get(name, e.offset, e.length)
    sender = repo.senders.get(bytes.fromhex(name.rsplit("/", 1)[1]))
    return decode_tree(repo.open_blob(tree_id, TREE, stored, e.raw_length, sender))
