"""What the repository's own building blocks need of an open repository.

The damage records, the packer, the pack reader, the sessions, the unindexed packs and the
snapshot writer work on an open repository, and `Repository` (keepwell.repository.repo) uses
them. They see it through this protocol, so none of them imports the module that imports them.
`Repository` satisfies it (mypy checks every call that passes one).
"""

from __future__ import annotations

from typing import Protocol

from keepwell.backends.base import Backend
from keepwell.chunker import Chunker, ChunkerParams
from keepwell.compression import Levels
from keepwell.repository.damaged import Damage
from keepwell.repository.events import Events
from keepwell.repository.index import BlobLocation, IndexContent, MasterIndex
from keepwell.repository.keyring import Keyring
from keepwell.repository.tree import Node


class RepositoryStore(Protocol):
    backend: Backend
    master: Keyring  # the keys of the key in use (full or append)
    id_key: bytes
    compression: int
    chunker: Chunker
    chunker_params: ChunkerParams
    events: Events
    damage: Damage
    senders: dict[bytes, bytes]  # pack id -> the append-key writer that sealed it

    @property
    def index(self) -> MasterIndex: ...

    def levels(self, kind: str, *, probe: bool = False, pages: bool = False) -> Levels: ...

    def put_object(self, prefix: str, kind: bytes, plain: bytes) -> str: ...

    def write_index(self, content: IndexContent) -> str: ...

    def refresh_index(self) -> MasterIndex: ...

    def locate_many(self, blob_ids: list[bytes]) -> list[BlobLocation | None]: ...

    def load_tree(self, tree_id: bytes) -> list[Node]: ...

    def remember_tree(self, tree_id: bytes, nodes: list[Node], pieces: list[bytes] | None = None) -> None: ...

    def sender_of(self, pack: bytes) -> bytes | None: ...

    def open_blob(self, blob_id: bytes, blob_type: int, stored: bytes | memoryview,
                  raw_length: int, sender: bytes | None = None) -> bytes: ...
