"""The files source: back up file trees and restore them.

The names below are loaded on first use, so that `keepwell.sources.files.prefetch` can be
imported (and its process started) before the repository code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keepwell.sources.files.archiver import BackupResult, backup_paths
    from keepwell.sources.files.restorer import RestoreResult, restore_snapshot

__all__ = ["BackupResult", "RestoreResult", "backup_paths", "restore_snapshot"]


def __getattr__(name: str) -> Any:
    if name in ("BackupResult", "backup_paths"):
        from keepwell.sources.files import archiver

        return getattr(archiver, name)
    if name in ("RestoreResult", "restore_snapshot"):
        from keepwell.sources.files import restorer

        return getattr(restorer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
