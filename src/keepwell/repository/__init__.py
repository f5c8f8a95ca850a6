"""The repository engine: deduplicated, compressed, encrypted, verifiable storage of snapshots.

Public API (see docs/engine-api.md): `Repository`, `open_repository`, `Snapshot`, `Node`.
"""

from keepwell.repository.repo import BlobReader, Repository, open_repository
from keepwell.repository.snapshot import Snapshot
from keepwell.repository.tree import Node

__all__ = ["BlobReader", "Node", "Repository", "Snapshot", "open_repository"]
