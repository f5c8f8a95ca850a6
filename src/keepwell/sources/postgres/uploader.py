"""The background uploader of asynchronous archiving.

One uploader per spool (an exclusive lock on ``uploader.lock``) holds the repository open and,
in a loop, archives in batches: first the segments in the spool's ``ready/``, then segments that
PostgreSQL has finished but not yet handed to ``archive_command`` (``pg_wal/archive_status/
*.ready``), read straight from pg_wal. Each archived file gets a done marker, so the
``archive_command`` for a segment uploaded ahead returns at once. A file that must not be
archived (another cluster's, or different from the archived file of that name) is set aside with
an alert, never dropped silently. The uploader exits after ``idle_exit`` seconds with nothing to
do (``archive_command`` starts it again) unless it runs as a daemon.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import time
from typing import Any

from keepwell.errors import KeepwellError
from keepwell.sources.postgres.archive import WalArchive, WalItem
from keepwell.sources.postgres.hooks import HookSettings
from keepwell.sources.postgres.spool import WalSpool, file_identity
from keepwell.sources.postgres.walnames import wal_kind

BATCH_FILES = 16
BATCH_BYTES = 256 * 1024 * 1024
WORKERS = 2  # batches uploaded at once; compression runs in the calling thread


def _log(message: str) -> None:
    sys.stderr.write(time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + message + "\n")
    sys.stderr.flush()


def ahead_names(pg_wal: str | None, spool: WalSpool, skip: set[str]) -> list[str]:
    """Finished segments PostgreSQL has not archived yet and nobody has uploaded."""
    if not pg_wal:
        return []
    status = os.path.join(pg_wal, "archive_status")
    try:
        entries = os.listdir(status)
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        if not entry.endswith(".ready"):
            continue
        name = entry[: -len(".ready")]
        if name in skip or wal_kind(name) not in ("segment", "history", "partial", "backup"):
            continue
        if spool.done_marker(name) is None:
            out.append(name)
    return sorted(out)


def next_batch(spool: WalSpool, pg_wal: str | None,
               skip: set[str] | None = None) -> list[tuple[WalItem, bool]]:
    """Up to a batch of (item, from_pg_wal) to archive, spooled files first; `skip` names
    are being uploaded by another worker."""
    skip = skip or set()
    batch: list[tuple[WalItem, bool]] = []
    size = 0
    spooled = spool.ready_names()
    for name in spooled:
        if name in skip:
            continue
        path = spool.ready_path(name)
        batch.append((WalItem(name, path), False))
        size += _size(path)
        if len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
            return batch
    for name in ahead_names(pg_wal, spool, set(spooled) | skip):
        assert pg_wal is not None
        path = os.path.join(pg_wal, name)
        if not os.path.exists(path):
            continue
        batch.append((WalItem(name, path), True))
        size += _size(path)
        if len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
            break
    return batch


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def upload_batch(archive: WalArchive, spool: WalSpool,
                 batch: list[tuple[WalItem, bool]]) -> int:
    """Archive one batch and record the outcome in the spool; returns files handled."""
    identities = {}
    items = []
    for item, from_pg_wal in batch:
        try:
            identities[item.name] = file_identity(item.path) if from_pg_wal else None
        except FileNotFoundError:
            continue
        items.append(item)
    if not items:
        return 0
    result = archive.push(items)
    for name in result.stored + result.already:
        spool.mark_done(name, result.digests[name], identities.get(name))
    spool.sync_done()
    for name, reason in result.refused.items():
        from_pg_wal = identities.get(name) is not None
        if from_pg_wal:
            spool.mark_refused(name, reason)
            spool.raise_alert(f"segment {name} not archived: {reason}")
        else:
            spool.reject(name, reason)
        _log(f"refused {name}: {reason}")
    for name in result.stored + result.already:
        if identities.get(name) is None:
            spool.remove_ready(name)
    if result.stored:
        _log(f"archived {len(result.stored)} file(s) {result.stored[0]}..{result.stored[-1]}"
             f" in snapshot {str(result.snapshot_id)[:8]}")
    return len(items)


def run_uploader(settings: HookSettings, *, pg_wal: str | None, daemon: bool = False,
                 idle_exit: float = 30.0) -> int:
    if not settings.spool:
        raise KeepwellError("the uploader needs a spool directory (--spool)")
    spool = WalSpool(settings.spool, settings.spool_max).ensure()
    lock_fd = os.open(spool.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        return 0  # another uploader serves this spool
    os.write(lock_fd, f"{os.getpid()}\n".encode())
    try:
        with settings.open_repository() as repo:
            return _run_workers(repo, settings.cluster, spool, pg_wal, daemon, idle_exit)
    finally:
        os.close(lock_fd)


def _run_workers(repo: Any, cluster: str, spool: WalSpool, pg_wal: str | None, daemon: bool,
                 idle_exit: float) -> int:
    claimed: set[str] = set()
    lock = threading.Lock()
    threads = [
        threading.Thread(target=_worker, name=f"kw-wal-upload-{i}",
                         args=(WalArchive(repo, cluster), spool, pg_wal, daemon, idle_exit,
                               claimed, lock))
        for i in range(WORKERS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


def _worker(archive: WalArchive, spool: WalSpool, pg_wal: str | None, daemon: bool,
            idle_exit: float, claimed: set[str], lock: threading.Lock) -> None:
    idle_since = time.monotonic()
    failures = 0
    last_clean = 0.0
    while True:
        now = time.monotonic()
        with lock:
            if now - last_clean > 30:
                spool.clean_temp()
                last_clean = now
            batch = next_batch(spool, pg_wal, claimed)
            names = {item.name for item, _ in batch}
            claimed.update(names)
        if not batch:
            if not daemon and now - idle_since > idle_exit:
                return
            time.sleep(0.02)
            continue
        try:
            upload_batch(archive, spool, batch)
            failures = 0
            alert = spool.alert() or ""
            if ("is full" in alert or "upload failed" in alert) and (
                spool.status().ready_bytes < spool.max_bytes // 2
            ):
                spool.clear_alert()
        except Exception as exc:  # a worker must outlive any one failed batch
            failures += 1
            text = exc.line() if isinstance(exc, KeepwellError) else f"{type(exc).__name__}: {exc}"
            spool.raise_alert(f"upload failed: {text}")
            _log(f"upload failed ({failures}): {text}")
            time.sleep(min(10.0, 0.5 * 2 ** min(failures, 5)))
        finally:
            with lock:
                claimed.difference_update(names)
        idle_since = time.monotonic()
