"""The background uploader of asynchronous archiving.

One uploader per spool (an exclusive lock on ``uploader.lock``) holds the repository open and,
in a loop, archives in batches: first the segments in the spool's ``ready/``, then segments that
PostgreSQL has finished but not yet handed to ``archive_command`` (``pg_wal/archive_status/
*.ready``), read straight from pg_wal. Two workers upload a batch each at once; a batch that
holds the oldest pending segment is kept small, since PostgreSQL waits for it. The names being
uploaded are published in the spool's ``inflight`` file (pushes wait for those instead of
spooling them). Each archived file gets a done marker once its snapshot is committed, so the
``archive_command`` for a segment uploaded ahead returns at once (in the shell fast path,
``keepwell-wal-push``); the snapshot is committed only once a stored index lists every chunk
it uses (`WalArchive.push`), also after a failed write left a pack unlisted, so a segment is
never acknowledged while another process could not read it. A file that must not be
archived (another cluster's, or different from the archived file of that name) is set aside with
an alert, never dropped silently. The uploader exits after ``idle_exit`` seconds with nothing to
do (``archive_command`` starts it again) unless it runs as a daemon.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from keepwell.errors import KeepwellError
from keepwell.sources.postgres.archive import WalArchive, WalItem
from keepwell.sources.postgres.hooks import IDLE_EXIT, HookSettings, take_uploader_lock
from keepwell.sources.postgres.spool import WalSpool, file_identity
from keepwell.sources.postgres.walindex import PackLedger
from keepwell.sources.postgres.walnames import wal_kind

BATCH_FILES = 16
HEAD_BATCH_FILES = 4  # the oldest files go in a small batch: PostgreSQL is waiting for them
BATCH_BYTES = 256 * 1024 * 1024
WORKERS = 2  # batches uploaded at once; compression runs in the calling thread
IDLE_PAUSE_MIN = 0.005  # seconds between looks for work, growing while there is none
IDLE_PAUSE_MAX = 0.1


def _log(message: str) -> None:
    sys.stderr.write(time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + message + "\n")
    sys.stderr.flush()


def ahead_names(pg_wal: str | None, spool: WalSpool, skip: set[str],
                known_done: set[str] | None = None) -> list[str]:
    """Finished segments PostgreSQL has not archived yet and nobody has uploaded.

    `known_done` remembers names whose done marker was seen, so that segments PostgreSQL has not
    yet acknowledged are not looked up again on every pass."""
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
        if name in skip or (known_done is not None and name in known_done):
            continue
        if wal_kind(name) not in ("segment", "history", "partial", "backup"):
            continue
        if not os.path.exists(os.path.join(spool.done_dir, name)):
            out.append(name)
        elif known_done is not None:
            known_done.add(name)
    if known_done is not None and len(known_done) > 4 * len(entries) + 1024:
        known_done.clear()  # names long archived and recycled; the markers stay the truth
    return sorted(out)


def next_batch(spool: WalSpool, pg_wal: str | None, skip: set[str] | None = None,
               known_done: set[str] | None = None) -> list[tuple[WalItem, bool]]:
    """Up to a batch of (item, from_pg_wal) to archive, spooled files first; `skip` names
    are being uploaded by another worker. With nothing else in flight the batch holds the
    segment ``archive_command`` is waiting for, so it is kept small to acknowledge it soon."""
    skip = skip or set()
    limit = BATCH_FILES if skip else HEAD_BATCH_FILES
    batch: list[tuple[WalItem, bool]] = []
    size = 0
    spooled = spool.ready_names()
    for name in spooled:
        if name in skip:
            continue
        path = spool.ready_path(name)
        batch.append((WalItem(name, path), False))
        size += _size(path)
        if len(batch) >= limit or size >= BATCH_BYTES:
            return batch
    for name in ahead_names(pg_wal, spool, set(spooled) | skip, known_done):
        assert pg_wal is not None
        path = os.path.join(pg_wal, name)
        if not os.path.exists(path):
            continue
        batch.append((WalItem(name, path), True))
        size += _size(path)
        if len(batch) >= limit or size >= BATCH_BYTES:
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
                 idle_exit: float = IDLE_EXIT, lock_fd: int | None = None) -> int:
    """Serve the spool until idle (or forever as a daemon); `lock_fd` is the uploader lock if
    the caller took it already (`hooks.take_uploader_lock`)."""
    if not settings.spool:
        raise KeepwellError("the uploader needs a spool directory (--spool)")
    spool = WalSpool(settings.spool, settings.spool_max).ensure()
    if lock_fd is None:
        lock_fd = take_uploader_lock(spool)
        if lock_fd is None:
            return 0  # another uploader serves this spool
    try:
        with settings.open_repository() as repo:
            return _run_workers(repo, settings.cluster, spool, pg_wal, daemon, idle_exit)
    finally:
        os.close(lock_fd)


def _run_workers(repo: Any, cluster: str, spool: WalSpool, pg_wal: str | None, daemon: bool,
                 idle_exit: float) -> int:
    claimed: set[str] = set()
    known_done: set[str] = set()
    lock = threading.Lock()
    ledger = PackLedger(repo)  # shared, and made before either worker writes anything
    threads = [
        threading.Thread(target=_worker, name=f"kw-wal-upload-{i}",
                         args=(WalArchive(repo, cluster, ledger=ledger), spool, pg_wal, daemon,
                               idle_exit, claimed, lock, known_done))
        for i in range(WORKERS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


def _worker(archive: WalArchive, spool: WalSpool, pg_wal: str | None, daemon: bool,
            idle_exit: float, claimed: set[str], lock: threading.Lock,
            known_done: set[str]) -> None:
    idle_since = time.monotonic()
    failures = 0
    last_clean = 0.0
    pause = IDLE_PAUSE_MIN
    while True:
        now = time.monotonic()
        with lock:
            if now - last_clean > 30:
                spool.clean_temp()
                last_clean = now
            batch = next_batch(spool, pg_wal, claimed, known_done)
            names = {item.name for item, _ in batch}
            if names:
                claimed.update(names)
                spool.set_inflight(claimed)
        if not batch:
            if not daemon and now - idle_since > idle_exit:
                return
            time.sleep(pause)  # short after work, longer the longer nothing comes
            pause = min(IDLE_PAUSE_MAX, pause * 1.5)
            continue
        pause = IDLE_PAUSE_MIN
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
                spool.set_inflight(claimed)
        idle_since = time.monotonic()
