"""``archive_command`` and ``restore_command``: push and fetch one WAL file, fast.

This module is also the lean console script ``keepwell-wal`` (``push``, ``fetch``, ``upload``):
PostgreSQL runs ``archive_command`` once per segment, one after another, so its start-up cost is
paid per segment. Most pushes do not even get here: the shell fast path ``keepwell-wal-push``
acknowledges segments the uploader has already archived (read ahead from pg_wal) and calls this
module only for the others. The asynchronous push imports only the standard library, `spool` and
`errors`; it waits for the uploader while it uploads the segment, and copies the segment into
the spool otherwise. The repository (and its key derivation) is opened only by the synchronous
push without a spool, by a fetch that misses the prefetch directory, and by the background
uploader (`uploader`).

Settings come from options or the environment: ``KEEPWELL_REPOSITORY``, ``KEEPWELL_PASSWORD``
or ``KEEPWELL_PASSWORD_FILE``, ``KEEPWELL_PG_CLUSTER``, ``KEEPWELL_PG_SPOOL``,
``KEEPWELL_PG_SPOOL_MAX``.
"""

from __future__ import annotations

import fcntl
import os
import sys

from keepwell.errors import UsageError
from keepwell.sources.postgres.errors import (
    ForeignClusterError,
    SpoolFullError,
    WalConflictError,
)
from keepwell.sources.postgres.spool import (
    DEFAULT_MAX_BYTES,
    SpoolFull,
    WalSpool,
    file_identity,
)
from keepwell.units import parse_size

TYPE_CHECKING = False  # typing itself costs milliseconds on every archive_command
if TYPE_CHECKING:
    from typing import Any

    from keepwell.repository import Repository

DEFAULT_PREFETCH = 16
SYNC_TIMEOUT = 120.0
IDLE_EXIT = 120.0  # seconds the uploader waits for work before it exits: above the usual
# archive_timeout (60 s), so a quiet server does not pay the uploader's start on every segment
AWAIT_MAX = 20.0  # seconds a push waits at most for the uploader's read-ahead of its segment
AWAIT_START = 5.0  # ... for an uploader started this recently to take the segment up
AWAIT_CLAIM = 0.2  # ... for a running uploader to take it up
_HEADER_BYTES = 40
_HEX = frozenset("0123456789ABCDEF")


class HookSettings:
    """Where the repository is, how to unlock it, which cluster and which spool."""

    def __init__(self, repo: str | None, password_file: str | None, cluster: str,
                 spool: str | None = None, spool_max: int = DEFAULT_MAX_BYTES) -> None:
        self.repo = repo
        self.password_file = password_file
        self.cluster = cluster
        self.spool = spool
        self.spool_max = spool_max

    @classmethod
    def resolve(cls, repo: str | None = None, password_file: str | None = None,
                cluster: str | None = None, spool: str | None = None,
                spool_max: str | int | None = None) -> HookSettings:
        max_env = spool_max if spool_max is not None else os.environ.get("KEEPWELL_PG_SPOOL_MAX")
        return cls(
            repo=repo or os.environ.get("KEEPWELL_REPOSITORY"),
            # the command line's file, then KEEPWELL_PASSWORD (see `password`), then this
            password_file=password_file or (None if "KEEPWELL_PASSWORD" in os.environ
                                            else os.environ.get("KEEPWELL_PASSWORD_FILE")),
            cluster=cluster or os.environ.get("KEEPWELL_PG_CLUSTER") or "main",
            spool=spool or os.environ.get("KEEPWELL_PG_SPOOL"),
            spool_max=DEFAULT_MAX_BYTES if max_env is None else parse_size(
                max_env, "--spool-max" if spool_max is not None else "KEEPWELL_PG_SPOOL_MAX"),
        )

    def password(self) -> str:
        if self.password_file:
            from keepwell.repository.keys import read_password_file  # only when needed: start-up

            return read_password_file(self.password_file)
        env = os.environ.get("KEEPWELL_PASSWORD")
        if env is not None:
            return env
        raise UsageError("no password given",
                         hint="set KEEPWELL_PASSWORD or KEEPWELL_PASSWORD_FILE")

    def open_repository(self) -> Repository:
        if not self.repo:
            raise UsageError("no repository given",
                             hint="pass --repo or set KEEPWELL_REPOSITORY")
        from keepwell.repository import open_repository

        return open_repository(self.repo, self.password())

    def env_args(self) -> list[str]:
        out = ["--cluster", self.cluster]
        if self.repo:
            out += ["--repo", self.repo]
        if self.password_file:
            out += ["--password-file", self.password_file]
        if self.spool:
            out += ["--spool", self.spool, "--spool-max", str(self.spool_max)]
        return out


def _digest_file(path: str) -> str:
    import blake3

    h = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return str(h.hexdigest())


def _sysid_of(path: str) -> int | None:
    """The system identifier in a segment's first page header (None for other WAL files)."""
    name = os.path.basename(path).removesuffix(".partial")
    if len(name) != 24 or not set(name) <= _HEX:
        return None
    import struct

    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES:
        return None
    return int(struct.unpack_from("<Q", head, 24)[0])


# --- push ---
def push(path: str, settings: HookSettings, *, asynchronous: bool) -> str:
    """Archive the WAL file at `path`; returns what happened ('stored', 'already', 'spooled')."""
    if not os.path.isfile(path):
        raise UsageError(f"WAL file {path} does not exist")
    name = os.path.basename(path)
    if asynchronous:
        return _push_async(path, name, settings)
    if settings.spool:
        return _push_through_uploader(path, name, settings)
    from keepwell.sources.postgres.archive import WalArchive

    with settings.open_repository() as repo:
        return WalArchive(repo, settings.cluster).push_one(name, path)


def _push_async(path: str, name: str, settings: HookSettings) -> str:
    if not settings.spool:
        raise UsageError("asynchronous push needs a spool directory",
                         hint="pass --spool DIR or set KEEPWELL_PG_SPOOL")
    spool = WalSpool(settings.spool, settings.spool_max).ensure()
    marker = spool.done_marker(name)
    if marker is not None:
        if marker.refused:
            raise WalConflictError(f"WAL file {name} refused: {marker.refused}")
        if marker.file == file_identity(path) or marker.digest == _digest_file(path):
            return "already"
        raise WalConflictError(
            f"WAL file {name} refused: a different file with this name is already archived"
        )
    spooled = spool.ready_path(name)
    if os.path.exists(spooled):
        if _same_bytes(spooled, path):
            _ensure_uploader(spool, settings, os.path.dirname(os.path.abspath(path)))
            return "spooled"
        raise WalConflictError(
            f"WAL file {name} refused: a different file with this name is already spooled"
        )
    sysid = _sysid_of(path)
    if sysid is not None:
        _check_spool_identity(spool, settings, sysid, name)
    pg_wal = os.path.dirname(os.path.abspath(path))
    if _await_read_ahead(spool, settings, pg_wal, name):
        return _push_async(path, name, settings)  # the marker is there now: check it
    try:
        spool.accept(path, name)
    except SpoolFull as full:
        message = (
            f"WAL spool {spool.path} is full ({full.used >> 20} MiB of {full.max_bytes >> 20}"
            f" MiB): segment {name} stays in pg_wal until the uploader catches up"
        )
        spool.raise_alert(message)
        _ensure_uploader(spool, settings, os.path.dirname(os.path.abspath(path)))
        raise SpoolFullError(message) from None
    _ensure_uploader(spool, settings, os.path.dirname(os.path.abspath(path)))
    return "spooled"


def _await_read_ahead(spool: WalSpool, settings: HookSettings, pg_wal: str, name: str) -> bool:
    """Wait for the uploader to archive `name` straight from pg_wal; False: spool it instead.

    A segment PostgreSQL has marked ready is one the uploader reads ahead by itself, so copying
    it into the spool would only write it twice. A push waits while its segment is being
    uploaded (the uploader lists those in ``inflight``) and, for a few seconds, while a freshly
    started uploader gets to it. Otherwise — the uploader is busy with a backlog, holds an alert
    (the repository is unreachable), or is gone — the segment goes to the spool at once.
    """
    import time

    if not os.path.exists(os.path.join(pg_wal, "archive_status", name + ".ready")):
        return False
    fresh = _ensure_uploader(spool, settings, pg_wal)
    marker = os.path.join(spool.done_dir, name)
    began = time.monotonic()
    if not fresh:
        try:
            fresh = time.time() - os.stat(spool.lock_path).st_mtime < AWAIT_START
        except OSError:
            fresh = True
    claim_wait = AWAIT_START if fresh else AWAIT_CLAIM
    delay = 0.002
    while True:
        if os.path.exists(marker):
            return True
        waited = time.monotonic() - began
        if waited > AWAIT_MAX or _uploads_failing(spool):
            return False
        if name in spool.inflight():
            if not uploader_running(spool):
                return False
        elif waited > claim_wait:
            return False
        time.sleep(delay)
        delay = min(0.02, delay * 1.5)


def _uploads_failing(spool: WalSpool) -> bool:
    alert = spool.alert() or ""
    return "upload failed" in alert or "is full" in alert


def _push_through_uploader(path: str, name: str, settings: HookSettings,
                           timeout: float = SYNC_TIMEOUT) -> str:
    """Synchronous push without opening the repository: spool, then wait for the uploader.

    Returns only once the segment is in the repository (its done marker exists), so the
    guarantee is the synchronous one, while the key derivation and the snapshot listing are paid
    once by the long-lived uploader instead of once per segment.
    """
    import time

    if _push_async(path, name, settings) == "already":
        return "already"
    assert settings.spool is not None
    spool = WalSpool(settings.spool, settings.spool_max)
    rejected = os.path.join(spool.rejected_dir, name + ".reason")
    deadline = time.monotonic() + timeout
    delay = 0.002
    while time.monotonic() < deadline:
        marker = spool.done_marker(name)
        if marker is not None:
            if marker.refused:
                raise WalConflictError(f"WAL file {name} refused: {marker.refused}")
            return "stored"
        if os.path.exists(rejected):
            with open(rejected, encoding="utf-8") as f:
                raise WalConflictError(f"WAL file {name} refused: {f.read().strip()}")
        time.sleep(delay)
        delay = min(0.05, delay * 1.5)
        if delay >= 0.05:
            _ensure_uploader(spool, settings, os.path.dirname(os.path.abspath(path)))
    raise SpoolFullError(
        f"WAL file {name} is spooled but not in the repository after {timeout:.0f} s",
        hint=f"see the uploader's log {spool.log_path}",
    )


def _same_bytes(a: str, b: str) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ba, bb = fa.read(1 << 20), fb.read(1 << 20)
            if ba != bb:
                return False
            if not ba:
                return True


def _check_spool_identity(spool: WalSpool, settings: HookSettings, sysid: int, name: str) -> None:
    ident = spool.identity()
    if ident is None or ident[0] != settings.cluster:
        # First push through this spool: confirm the cluster against the repository once.
        from keepwell.sources.postgres.archive import WalArchive

        with settings.open_repository() as repo:
            WalArchive(repo, settings.cluster).check_identity(sysid, f"WAL file {name}")
        spool.set_identity(settings.cluster, sysid)
        return
    known = ident[1]
    if known != sysid:
        raise ForeignClusterError(
            f"WAL file {name} comes from the cluster with system identifier {sysid}, but"
            f" cluster '{settings.cluster}' is {known}"
        )


def take_uploader_lock(spool: WalSpool) -> int | None:
    """The spool's uploader lock (an open fd holding it, with our pid in it), or None if another
    process holds it. Taken before the uploader's heavy imports, so that pushes arriving while
    it starts see it running and do not start a second one."""
    fd = os.open(spool.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def uploader_running(spool: WalSpool) -> bool:
    try:
        fd = os.open(spool.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _ensure_uploader(spool: WalSpool, settings: HookSettings, pg_wal: str) -> bool:
    """Start the spool's uploader unless it runs; True when this call started it."""
    if uploader_running(spool):
        return False
    import subprocess

    argv = [sys.executable, "-m", "keepwell.sources.postgres.walcommand", "upload",
            "--pg-wal", pg_wal, *settings.env_args()]
    with open(spool.log_path, "ab") as log:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         start_new_session=True, close_fds=True)
    return True


# --- fetch ---
def fetch(name: str, dest: str, settings: HookSettings, *, prefetch: int = DEFAULT_PREFETCH,
          prefetch_dir: str | None = None, policy: dict[str, Any] | None = None) -> str:
    """Write archived WAL file `name` to `dest` for recovery; `WalNotFoundError` when it is not
    archived (the end of the WAL). A segment read ahead earlier is handed on at once; anything
    else goes through the guarded fetch (`walguard`: tablespaces, gaps, identity), following
    `policy` (the keyword arguments of `walguard.FetchPolicy.parse`)."""
    pdir = prefetch_dir or os.path.join(os.path.dirname(os.path.abspath(dest)),
                                        "keepwell-prefetch")
    ready = os.path.join(pdir, name)
    if os.path.exists(ready):
        os.replace(ready, dest)
        return "prefetched"
    from keepwell.sources.postgres.archive import WalArchive
    from keepwell.sources.postgres.walguard import FetchPolicy, fetch_segment

    rules = FetchPolicy.parse(**(policy or {}))
    with settings.open_repository() as repo:
        return fetch_segment(name, dest, WalArchive(repo, settings.cluster), prefetch=prefetch,
                             prefetch_dir=pdir, policy=rules)


FETCH_FAILED = 126  # above 125: PostgreSQL stops recovery with an error instead of ending it
