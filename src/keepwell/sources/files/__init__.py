"""The files source: back up file trees and restore them."""

from keepwell.sources.files.archiver import BackupResult, backup_paths
from keepwell.sources.files.restorer import RestoreResult, restore_snapshot

__all__ = ["BackupResult", "RestoreResult", "backup_paths", "restore_snapshot"]
