"""The PostgreSQL source's errors, all under keepwell's one exception tree."""

from __future__ import annotations

from keepwell.errors import PartialError, SourceError, UsageError


class PostgresError(SourceError):
    """Something about the PostgreSQL server or its tools went wrong."""

    hint = "see the PostgreSQL server log for details"


class ConnectionFailedError(PostgresError):
    hint = "check --db-url or PGHOST/PGPORT/PGUSER/PGDATABASE/PGPASSWORD and that the server runs"


class ToolError(PostgresError):
    """A PostgreSQL client program (pg_dump, pg_basebackup, ...) failed or is missing."""

    hint = "install the PostgreSQL client programs matching the server's major version"


class WalNotFoundError(PostgresError):
    """A WAL file asked for is not in the repository (normal at the end of recovery)."""

    hint = ""


class RestoreIntoError(ToolError):
    """pg_restore failed on what the target server holds or lacks (the programs are there)."""

    hint = ("the target holds what the dump creates (add --clean to replace it, or restore"
            " --into another database with --create), or lacks the database (add --create)")


class ForeignClusterError(PostgresError):
    """A WAL file or backup belongs to another cluster than the one the repository knows."""

    hint = "use another --cluster name for a different PostgreSQL cluster"


class WalConflictError(PostgresError):
    """A different WAL file with the same name is already archived."""

    hint = "two servers archive to one cluster name (split brain?); check the servers' timelines"


class SpoolFullError(PostgresError):
    """The local WAL spool reached its size bound; the segment stays in pg_wal."""

    hint = "the uploader is not keeping up or cannot reach the repository: check its log"


class WalWaitTimeoutError(PartialError):
    """A base backup was stored but the WAL it needs has not reached the repository in time."""

    hint = "check archive_command; the backup becomes usable once its WAL is archived"


class RecoveryError(PostgresError):
    hint = "see the restored server's log in the target directory"


class RestorePlanError(UsageError):
    """No backup and WAL in the repository can reach the requested target."""

    exit_code = 1
    hint = "see 'keepwell postgres info' for the backups and restore windows"
