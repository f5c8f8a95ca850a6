"""The local WAL spool of asynchronous archiving: durable, bounded, loud when full.

``archive_command`` in asynchronous mode copies the segment into ``ready/`` (temp file, fsync,
rename, fsync of the directory) and returns: once it has returned, the segment survives a crash
of this machine's processes and a power cut. A background uploader moves ``ready/`` segments into
the repository and leaves a *done marker* per segment (its hash and the identity of the file it
was read from) so that a later ``archive_command`` for the same segment returns at once; the
shell fast path ``keepwell-wal-push`` reads only the first line of a marker (the hash, or
``refused``) and compares its modification time with the segment's.

The spool never grows past ``max_bytes``: a segment that does not fit is refused (the push exits
non-zero, so PostgreSQL keeps it in pg_wal and retries) and an *alert* is written to ``ALERT`` and
to stderr (PostgreSQL's log). Nothing is ever dropped to make room.

Standard library only, and few imports (no json, no dataclasses): this module is imported on
every ``archive_command`` call. Markers and the identity file are small text files.
"""

from __future__ import annotations

import contextlib
import os
import time

DEFAULT_MAX_BYTES = 4 * 1024 * 1024 * 1024
_COPY_BLOCK = 1024 * 1024


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def copy_durable(src: str, dst: str) -> int:
    """Copy `src` to `dst` atomically and durably; returns the number of bytes copied."""
    tmp = os.path.join(os.path.dirname(dst), f".tmp-{os.path.basename(dst)}.{os.getpid()}")
    total = 0
    with open(src, "rb") as fin:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while True:
                block = fin.read(_COPY_BLOCK)
                if not block:
                    break
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view):]
                total += len(block)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
    os.replace(tmp, dst)
    fsync_dir(os.path.dirname(dst))
    return total


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def file_identity(path: str) -> list[int]:
    """What tells that a pg_wal file is the very file a marker was made from."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


class SpoolStatus:
    """How full the spool is and whether it holds an alert."""

    def __init__(self, ready: int, ready_bytes: int, max_bytes: int, rejected: int,
                 alert: str | None) -> None:
        self.ready = ready
        self.ready_bytes = ready_bytes
        self.max_bytes = max_bytes
        self.rejected = rejected
        self.alert = alert

    def as_dict(self) -> dict[str, object]:
        return {
            "ready_segments": self.ready, "ready_bytes": self.ready_bytes,
            "max_bytes": self.max_bytes, "rejected": self.rejected, "alert": self.alert,
        }


class DoneMarker:
    """What the spool remembers of an archived (or refused) WAL file."""

    def __init__(self, digest: str, file: list[int] | None, refused: str | None) -> None:
        self.digest = digest
        self.file = file
        self.refused = refused


class WalSpool:
    """The spool directory of one cluster's asynchronous archiving."""

    def __init__(self, path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = os.path.abspath(path)
        self.max_bytes = max_bytes
        self.ready_dir = os.path.join(self.path, "ready")
        self.done_dir = os.path.join(self.path, "done")
        self.rejected_dir = os.path.join(self.path, "rejected")
        self.alert_path = os.path.join(self.path, "ALERT")
        self.identity_path = os.path.join(self.path, "identity")
        self.lock_path = os.path.join(self.path, "uploader.lock")
        self.log_path = os.path.join(self.path, "uploader.log")
        self.inflight_path = os.path.join(self.path, "inflight")

    def ensure(self) -> WalSpool:
        for d in (self.path, self.ready_dir, self.done_dir, self.rejected_dir):
            if not os.path.isdir(d):
                os.makedirs(d, 0o700, exist_ok=True)
        return self

    # --- identity: the cluster this spool archives for, confirmed against the repository ---
    def identity(self) -> tuple[str, int] | None:
        """(cluster name, system identifier) confirmed for this spool, if any."""
        try:
            with open(self.identity_path, encoding="utf-8") as f:
                cluster, sysid = f.read().split("\n")[:2]
            return cluster, int(sysid)
        except (OSError, ValueError):
            return None

    def set_identity(self, cluster: str, system_identifier: int) -> None:
        write_atomic(self.identity_path, f"{cluster}\n{system_identifier}\n".encode())

    # --- ready segments ---
    def ready_names(self) -> list[str]:
        try:
            names = os.listdir(self.ready_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith(".tmp-"))

    def ready_path(self, name: str) -> str:
        return os.path.join(self.ready_dir, name)

    def ready_bytes(self) -> int:
        total = 0
        for entry in os.scandir(self.ready_dir):
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat().st_size
        return total

    def accept(self, src: str, name: str) -> None:
        """Copy segment `src` into the spool durably, or raise `SpoolFull` if it cannot fit."""
        size = os.path.getsize(src)
        used = self.ready_bytes()
        if used + size > self.max_bytes:
            raise SpoolFull(used, self.max_bytes, name)
        copy_durable(src, self.ready_path(name))

    def remove_ready(self, name: str) -> None:
        _unlink(self.ready_path(name))

    def reject(self, name: str, reason: str) -> None:
        """Move a segment that must not be uploaded aside, with the reason beside it."""
        src = self.ready_path(name)
        if os.path.exists(src):
            os.replace(src, os.path.join(self.rejected_dir, name))
        write_atomic(os.path.join(self.rejected_dir, name + ".reason"), reason.encode())
        self.raise_alert(f"segment {name} rejected: {reason}")

    def clean_temp(self, older_than: float = 60.0) -> None:
        """Remove temp files left by pushes that were killed midway (their segment is retried)."""
        now = time.time()
        for d in (self.ready_dir, self.path):
            for entry in os.scandir(d):
                if ".tmp" in entry.name and entry.is_file():
                    try:
                        if now - entry.stat().st_mtime > older_than:
                            _unlink(entry.path)
                    except FileNotFoundError:
                        pass

    # --- what the uploader is uploading now: a hint for pushes deciding whether to wait ---
    def set_inflight(self, names: set[str] | list[str]) -> None:
        """Publish the names being uploaded (atomic rename; a hint, so not fsynced)."""
        tmp = f"{self.inflight_path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(f"{n}\n" for n in sorted(names)))
        os.replace(tmp, self.inflight_path)

    def inflight(self) -> set[str]:
        try:
            with open(self.inflight_path, encoding="utf-8") as f:
                return set(f.read().split())
        except OSError:
            return set()

    # --- done markers ---
    def done_marker(self, name: str) -> DoneMarker | None:
        try:
            with open(os.path.join(self.done_dir, name), encoding="utf-8") as f:
                lines = f.read().split("\n")
        except OSError:
            return None
        if lines[0] == "refused":
            return DoneMarker("", None, lines[1] if len(lines) > 1 else "refused")
        ident = [int(x) for x in lines[1].split()] if len(lines) > 1 and lines[1] else None
        return DoneMarker(lines[0], ident, None)

    def mark_done(self, name: str, digest: str, identity: list[int] | None) -> None:
        body = f"{digest}\n{' '.join(map(str, identity)) if identity else ''}\n".encode()
        path = os.path.join(self.done_dir, name)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def mark_refused(self, name: str, reason: str) -> None:
        """Remember that `name` (read ahead from pg_wal) must not be archived, and why."""
        write_atomic(os.path.join(self.done_dir, name), f"refused\n{reason}\n".encode())

    def sync_done(self) -> None:
        fsync_dir(self.done_dir)

    def prune_done(self, keep_from: str) -> int:
        """Drop done markers of segments that sort before `keep_from` (long gone from pg_wal)."""
        removed = 0
        for entry in os.scandir(self.done_dir):
            if entry.name < keep_from and ".history" not in entry.name:
                _unlink(entry.path)
                removed += 1
        return removed

    # --- alerts ---
    def raise_alert(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = f"{stamp} {message}\n"
        write_atomic(self.alert_path, line.encode())
        with open(os.path.join(self.path, "alerts.log"), "a", encoding="utf-8") as f:
            f.write(line)

    def clear_alert(self) -> None:
        _unlink(self.alert_path)

    def alert(self) -> str | None:
        try:
            with open(self.alert_path, encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError:
            return None

    def status(self) -> SpoolStatus:
        ready = self.ready_names()
        try:
            rejected = len([n for n in os.listdir(self.rejected_dir) if not n.endswith(".reason")])
        except FileNotFoundError:
            rejected = 0
        return SpoolStatus(len(ready), self.ready_bytes() if ready else 0, self.max_bytes,
                           rejected, self.alert())


class SpoolFull(Exception):
    """Raised by `WalSpool.accept`; the caller turns it into the user-facing error."""

    def __init__(self, used: int, max_bytes: int, name: str) -> None:
        super().__init__(name)
        self.used = used
        self.max_bytes = max_bytes
        self.name = name
