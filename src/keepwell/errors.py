"""The one exception tree of keepwell.

Every error a user can meet is a `KeepwellError`. Each class carries the process exit code and a
hint that tells the user what to do; the CLI's single top-level handler turns any of them into one
line (what, where, what to do) and that exit code. Anything else escaping is a bug and is shown
as such.

Exit codes (documented in docs/operations.md):
    0 ok, 1 failure, 2 usage, 3 partial/incomplete, 10 no repository, 12 wrong password,
    13 the key's role does not allow the command (an append key).
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_NO_REPOSITORY = 10
EXIT_WRONG_PASSWORD = 12
EXIT_KEY_ROLE = 13


class KeepwellError(Exception):
    """Root of every error keepwell reports to a user."""

    exit_code = EXIT_FAILURE
    hint = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def line(self, *, retrying: bool = False) -> str:
        """The message and its hint; ``retrying``: said by a process that retries by itself (the
        watcher), whose user has no command to run again."""
        msg, hint = str(self), self.hint
        if retrying:
            hint = _AGAIN.sub("", hint)
        return f"{msg} ({hint})" if hint else msg


_AGAIN = re.compile(r"(?:^|,? then |; )run the command again$")


class UsageError(KeepwellError):
    exit_code = EXIT_USAGE
    hint = "see --help"


class ConfigurationError(KeepwellError):
    exit_code = EXIT_USAGE
    hint = "fix the configuration and try again"


class RepositoryNotFoundError(KeepwellError):
    exit_code = EXIT_NO_REPOSITORY
    hint = "check --repo / KEEPWELL_REPOSITORY, or create one with 'keepwell init'"


class RepositoryExistsError(KeepwellError):
    hint = "choose another location, or use the existing repository"


class WrongPasswordError(KeepwellError):
    exit_code = EXIT_WRONG_PASSWORD
    hint = "check KEEPWELL_PASSWORD / --password-file"


class AppendOnlyError(KeepwellError):
    """The key in use is an append key: it adds backups, and can read or delete nothing."""

    exit_code = EXIT_KEY_ROLE
    hint = "open the repository with a full key, on a trusted machine"


class SnapshotNotFoundError(KeepwellError):
    hint = "list snapshots with 'keepwell snapshots'"


class IntegrityError(KeepwellError):
    """Stored data does not match what it claims to be (corruption or tampering)."""

    hint = "run 'keepwell check --read-data' to see what is affected"


class FormatError(IntegrityError):
    """An object could be read but not parsed as the format says."""


class DamagedSnapshotError(IntegrityError):
    """A snapshot object that cannot be read back (corrupt, truncated, foreign). Its id is the
    object's name, so it can still be named, and forgotten."""

    def __init__(self, message: str, *, snapshot_id: str = "", hint: str | None = None) -> None:
        short = snapshot_id[:8] or "ID"
        super().__init__(message, hint=hint if hint is not None else (
            f"forget it with 'keepwell forget {short}', or copy it again from a repository "
            "that holds it"))
        self.snapshot_id = snapshot_id


class PartialError(KeepwellError):
    """The work finished, but some items could not be processed."""

    exit_code = EXIT_PARTIAL


class MissingExtraError(KeepwellError):
    """An optional dependency (an install extra) that a command needs is not installed."""


class SourceError(KeepwellError):
    """A source (file tree, database, stream) could not be read or restored."""


class RestoreTargetError(KeepwellError):
    hint = "choose an empty target directory or pass --overwrite"


class BackendError(KeepwellError):
    """Base of everything a storage backend reports."""

    transient = False


class ObjectNotFoundError(BackendError):
    hint = "the object is missing from the repository; run 'keepwell check'"


class ObjectExistsError(BackendError):
    """A create-only put found the object already there."""


class TransientBackendError(BackendError):
    """Worth retrying: timeouts, resets, throttling, 5xx. Its hint is for the end of a command
    (the retries are over by then): it promises no retry."""

    transient = True
    hint = "check the network and the storage, then run the command again"


class StallError(TransientBackendError):
    """No progress on a request for the stall time (``KEEPWELL_STALL_TIMEOUT``): a frozen server
    or a dead network path. Retried a bounded number of times, on a new connection."""


class PermanentBackendError(BackendError):
    """Not worth retrying: permissions, bad credentials, bad requests."""

    hint = "check the repository location and its credentials"


class CircuitOpenError(TransientBackendError):
    """Not tried: the storage failed repeatedly just before (see its message for the cause).
    ``stalled``: the last failure was a stall."""

    stalled = False
