"""Continuous protection of file trees: changes captured as they happen, snapshots in O(changes).

Words:
    watcher     `Watcher`: one inotify instance over every directory of the watched roots (or
                one fanotify mark per filesystem, keepwell.sources.files.fanotify), the
                change `Journal`, and the commits; it runs until asked to stop
    commit      a snapshot of the pending changes (keepwell.sources.files.incremental), taken
                when changes have gone quiet for ``quiet_time`` or ``max_delay`` has passed
                since the oldest pending one, whichever comes first
    start scan  on start, the whole tree is compared with the last snapshot (as backup
                compares with its parent): nothing that changed while no watcher ran is missed
    polling     on a remote filesystem (whose other clients' writes raise no event here), when
                the watch limit is reached, or when asked: a scan like the start scan every
                ``poll_interval`` instead of events

Each commit's trees stay in the repository's tree cache (`_TREE_CACHE_NODES` entries), and the
next commit takes from there the trees on the way to its changes, which mostly lie in the
directories the last ones touched: it neither reads nor decrypts nor decodes them again.

A new directory is watched as soon as its creation is seen, then scanned whole at the next
commit (after its watch exists): files written into it before the watch was added raise no
event, and the scan finds them. An overflow of the kernel's queue marks every root for a scan.
The watcher reports through events on the repository (``watch_started``, ``watch_committed``,
``watch_commit_failed``, ``watch_recovered``, ``watch_caught_up``, ``watch_limit``,
``watch_polling``) and its counts (`Watcher.counts`); the CLI renders them.

A commit that fails (a repository that cannot be reached, a full disk, a lock held by a prune)
records nothing and loses nothing: its changes stay in the journal, events are still read and
journaled, and the commit is tried again after a delay that doubles from ``_RETRY_BASE`` up to
``_RETRY_CAP``. Each failure is reported with the lag so far (the age of the oldest change not
yet in a snapshot), so the lag alert of a supervising daemon fires while the repository is away,
and the first commit after it is back takes everything that changed meanwhile. A late commit
that leaves nothing pending is followed by ``watch_caught_up`` (a lag of zero): the alert is
resolved then, not only at the next change.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keepwell.cpus import pool_threads
from keepwell.errors import UsageError
from keepwell.memory import fewer_collections
from keepwell.repository import Repository, Snapshot
from keepwell.repository.tree import Node
from keepwell.sources.files.archiver import Archiver, _dir_meta, _Names, find_parent
from keepwell.sources.files.fanotify import Fanotify, FanotifyUnavailable, mount_points
from keepwell.sources.files.fssnapshot import BTRFS_PREFIX, is_own_btrfs_snapshot
from keepwell.sources.files.incremental import Rebuild, changes_under
from keepwell.sources.files.inotify import (
    IN_CREATE,
    IN_DELETE_SELF,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    Event,
    Inotify,
    WatchLimitError,
    max_user_watches,
    remote_filesystem,
)
from keepwell.sources.files.journal import Journal, JournalError
from keepwell.sources.files.select import Selection
from keepwell.sources.files.workers import worker_count

# the share of fs.inotify.max_user_watches past which the report says to raise it
_NEAR_LIMIT = 0.8
# entries of the decoded trees held between commits (about 0.5 KiB each): the directories of a
# 50,000-file tree, written by one commit and read back by the next
_TREE_CACHE_NODES = 100_000
# seconds between a failed commit and the next attempt: doubling from the base up to the cap
_RETRY_BASE = 1.0
_RETRY_CAP = 30.0


@dataclass
class WatchOptions:
    max_delay: float = 1.0
    quiet_time: float = 0.2
    poll_interval: float | None = None  # seconds: scan instead of watching
    remote_poll_interval: float = 60.0  # the scan interval a remote filesystem falls back to
    one_file_system: bool = False
    # how changes are captured: inotify (a watch per directory), fanotify (a mark per
    # filesystem, needs CAP_SYS_ADMIN), or auto: fanotify where every root is the root of a
    # mounted filesystem (its events are all ours) or where inotify runs out of watches
    notify: str = "auto"
    host: str | None = None
    tags: list[str] = field(default_factory=list)


def watched_roots(paths: list[str]) -> list[str]:
    """The absolute directories to watch, checked: one clear error for a path that is not one."""
    if not paths:
        raise UsageError("nothing to watch: give at least one directory")
    if "" in paths:  # an empty or unset variable: never the current directory
        raise UsageError("an empty path names no directory to watch",
                         hint="give the directories; '.' is the current directory")
    out: list[str] = []
    for p in paths:
        ap = os.path.abspath(os.path.expanduser(p))
        if ap == "/":
            raise UsageError("watching / itself: give its subdirectories instead")
        try:
            st = os.stat(ap)
        except OSError:
            raise UsageError(f"{p}: no such directory") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{p}: not a directory (watch works on directories)")
        if ap not in out:
            out.append(ap)
    for a in out:
        for b in out:
            if a != b and b.startswith(a.rstrip("/") + "/"):
                raise UsageError(f"{b} is inside {a}: give each tree once")
    return sorted(out)


def _own_snapshot(path: str) -> bool:
    try:
        return is_own_btrfs_snapshot(path.rsplit("/", 1)[-1], os.lstat(path))
    except OSError:
        return False


class Watcher:
    def __init__(self, repo: Repository, roots: list[str], journal: Journal,
                 selection: Selection, options: WatchOptions) -> None:
        self.repo = repo
        repo.trees_budget_nodes = max(repo.trees_budget_nodes, _TREE_CACHE_NODES)
        self.roots = roots
        self.journal = journal
        self.selection = selection
        self.options = options
        self.host = options.host or socket.gethostname()
        self.stop_event = threading.Event()
        self.notifier: Inotify | Fanotify | None = None
        self.polling: str | None = None  # why the watcher scans instead of watching
        self.parent: Snapshot | None = None
        self.counts: dict[str, int] = {"snapshots": 0, "commits_unchanged": 0, "overflows": 0,
                                       "watches": 0, "events": 0, "commit_failures": 0}
        self.last_commit: dict[str, Any] = {}
        self._first_change: float | None = None
        # when the last read of events returned: what the next read returns happened after it
        # (and perhaps long before that read: during a commit, nothing is read)
        self._read_at: float | None = None
        self._last_change: float | None = None
        self._last_sync = 0.0
        self._names = _Names()
        # failed commits in a row, when the next attempt is due, and whether a whole-tree scan
        # is still owed (a start or polling scan whose commit failed)
        self._failures = 0
        self._retry_at: float | None = None
        self._rescan = False
        self._failing_since: float | None = None
        self._journal_broken = False  # the journal cannot be written (warned once)

    # -- watches ------------------------------------------------------------------------------
    def _watch_tree(self, top: str) -> None:
        """Watch ``top`` and every directory below it (not excluded, same filesystem if asked)."""
        assert self.notifier is not None
        if not self.notifier.per_directory:
            return
        stack = [top]
        root_dev = None
        while stack:
            d = stack.pop()
            if not self.notifier.add(d):
                continue
            try:
                with os.scandir(d) as it:
                    for e in it:
                        try:
                            if not e.is_dir(follow_symlinks=False):
                                continue
                            if e.name.startswith(BTRFS_PREFIX) and is_own_btrfs_snapshot(
                                    e.name, e.stat(follow_symlinks=False)):
                                continue  # a backup's filesystem snapshot, never backed up
                            child = f"{d}/{e.name}"
                            if self.selection.by_path and self.selection.skips_path(child):
                                continue
                            if self.options.one_file_system:
                                dev = e.stat(follow_symlinks=False).st_dev
                                if root_dev is None:
                                    root_dev = os.lstat(top).st_dev
                                if dev != root_dev:
                                    continue
                            stack.append(child)
                        except OSError:
                            continue
            except OSError:
                continue

    def _start_watching(self) -> None:
        if self.options.poll_interval is not None:
            self.polling = "asked"
            return
        for r in self.roots:
            if (kind := remote_filesystem(r)) is not None:
                self.polling = f"{r} is on a remote filesystem ({kind})"
                self.options.poll_interval = self.options.remote_poll_interval
                return
        mode = self.options.notify
        if mode == "fanotify" or (mode == "auto" and set(self.roots) <= mount_points()):
            try:
                self._fanotify()
                return
            except FanotifyUnavailable as exc:
                if mode == "fanotify":
                    raise UsageError(f"--notify fanotify: {exc.strerror}",
                                     hint="run as root (CAP_SYS_ADMIN), or give --notify "
                                          "inotify") from None
                self.repo.events.emit("warning", message=f"{exc.strerror}: watching each "
                                      "directory with inotify instead")
        self.notifier = Inotify()
        try:
            for r in self.roots:
                self._watch_tree(r)
        except WatchLimitError:
            count = len(self.notifier)
            if mode == "auto" and self._instead_of_inotify(count):
                return
            self._fall_back(f"the inotify watch limit was reached after {count} directories",
                            announce=False)
            self._emit_limit(count, reached=True)
            return
        self.counts["watches"] = len(self.notifier)
        self._emit_limit(len(self.notifier), reached=False)

    def _fanotify(self) -> None:
        """Capture with fanotify: one mark per filesystem (raises FanotifyUnavailable)."""
        self.notifier = Fanotify(self.roots, one_file_system=self.options.one_file_system)
        self.counts["watches"] = len(self.notifier)  # the start line says they are marks

    def _instead_of_inotify(self, count: int) -> bool:
        """inotify ran out of watches after ``count``: whether fanotify took over."""
        if self.notifier is not None:
            self.notifier.close()
            self.notifier = None
        try:
            self._fanotify()
        except FanotifyUnavailable:
            return False
        self.repo.events.emit("warning", message=f"the inotify watch limit was reached after "
                              f"{count} directories: watching with fanotify instead")
        return True

    def _emit_limit(self, count: int, *, reached: bool) -> None:
        limit = max_user_watches()
        near = reached or (limit is not None and count >= _NEAR_LIMIT * limit)
        self.repo.events.emit("watch_limit", watches=count, limit=limit, near=near,
                              suggest=max(2 * count, (limit or 0) * 2) if near else None)

    # -- changes ------------------------------------------------------------------------------
    def _mark(self, path: str, subtree: bool = False) -> None:
        if self.selection.by_path and self.selection.skips_path(path):
            return
        try:
            self.journal.mark(path, subtree)
        except JournalError as exc:
            self._journal_failed(exc)  # the mark is held in memory all the same
        now = time.monotonic()
        self._last_change = now
        if self._first_change is None:
            # the change is as old as the events can be: max_delay counts from there, so a
            # change made during a commit is not kept waiting for that commit as well
            self._first_change = now if self._read_at is None else min(self._read_at, now)

    def _handle(self, ev: Event) -> None:
        assert self.notifier is not None
        self.counts["events"] += 1
        if ev.mask & IN_Q_OVERFLOW:
            self.counts["overflows"] += 1
            self.repo.events.emit("watch_overflow")
            for r in self.roots:
                self._watch_tree(r)  # directories made meanwhile need watches too
                self._mark(r, subtree=True)
            return
        path = ev.path
        if ev.is_dir and ev.name.startswith(BTRFS_PREFIX) and _own_snapshot(path):
            return  # a backup's btrfs snapshot appearing: never part of the tree's snapshots
        if ev.is_dir and ev.mask & (IN_CREATE | IN_MOVED_TO):
            if not (self.selection.by_path and self.selection.skips_path(path)):
                self._watch_tree(path)  # first the watch, then the scan (at the commit)
            self._mark(path, subtree=True)
            return
        if ev.is_dir and ev.mask & IN_MOVED_FROM:
            self.notifier.remove_under(path)
        if not ev.name and ev.mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            # the directory is reported by its parent's watch as well, except a root
            if path in self.roots:
                self._mark(path)
            return
        self._mark(path)

    def _due(self, now: float) -> bool:
        if self._first_change is None or self._last_change is None:
            return False
        if self._retry_at is not None:
            return now >= self._retry_at
        return (now - self._last_change >= self.options.quiet_time
                or now - self._first_change >= self.options.max_delay)

    def _timeout(self, now: float) -> float | None:
        if self._first_change is None or self._last_change is None:
            return None if self.journal.unsynced is False else 0.02
        if self._retry_at is not None:
            return max(0.0, self._retry_at - now)
        return max(0.0, min(self._last_change + self.options.quiet_time,
                            self._first_change + self.options.max_delay) - now)

    # -- commits ------------------------------------------------------------------------------
    def _old_root(self, path: str) -> Node | None:
        if self.parent is None:
            return None
        try:
            node = self.repo.find_node(self.parent, path)
        except UsageError:
            return None
        return node

    def commit(self, *, scan_all: bool = False) -> Snapshot | None:
        """A snapshot of what is pending (of everything, compared with the parent, if
        ``scan_all``); None if nothing it would record changed (the parent holds it all)."""
        self._journal(self.journal.sync)
        oldest = self._first_change
        upto = self.journal.seq
        pending = {m.path: m.subtree for m in self.journal.pending.values()}
        scan_all = scan_all or self._rescan
        if scan_all:
            pending.update({r: True for r in self.roots})
        self._first_change = self._last_change = None
        if not pending:
            return None
        try:
            snap = self._write(pending, upto, oldest)
        except BaseException:
            # nothing was recorded and the journal still holds every change: they stay
            # pending, as old as they were, and a whole-tree scan stays owed
            now = time.monotonic()
            self._first_change = oldest if oldest is not None else now
            self._last_change = now
            self._rescan = scan_all
            raise
        self._rescan = False
        return snap

    def _write(self, pending: dict[str, bool], upto: int, oldest: float | None) -> Snapshot | None:
        started = time.monotonic()
        writer = self.repo.new_snapshot("files", self.roots, host=self.host, tags=self.options.tags,
                                        dir_meta=_dir_meta(self._names), remember_trees=True)
        with writer, fewer_collections():
            writer.parent = self.parent.id if self.parent is not None else None
            archiver = Archiver(self.repo, writer, selection=self.selection,
                                one_file_system=self.options.one_file_system, parent=None,
                                workers=pool_threads(),
                                processes=worker_count("KEEPWELL_FILE_PROCESSES", reserve=1))
            rebuild = Rebuild(self.repo, writer, archiver, self.selection,
                              one_file_system=self.options.one_file_system)
            same = self.parent is not None
            try:
                for r in self.roots:
                    old = self._old_root(r)
                    changes = changes_under(r, pending)
                    if changes is None:
                        new: Node | None = old
                    else:
                        new = rebuild.rebuild(r, old, changes)
                    if new != old:
                        same = False
                    if new is not None:
                        writer.add_node(r, new)
            finally:
                archiver.close()
            counts = {**rebuild.counts, "changes": len(pending), "moving": len(rebuild.moving),
                      "dirs_listed": archiver.counts["dirs"],
                      "files_read": rebuild.counts["files_read"] + archiver.counts["files_new"]
                      + archiver.counts["files_changed"],
                      "errors": len(rebuild.errors) + len(archiver.errors)}
            for path, msg in rebuild.errors + archiver.errors:
                self.repo.events.emit("error", path=path, message=msg)
            if same and not rebuild.moving:
                writer.abort()
                snap = None
                self.counts["commits_unchanged"] += 1
                assert self.parent is not None
                self._journal(self.journal.committed, self.parent.id, upto)
            else:
                writer.summary.update({**archiver.counts, **counts,
                                       "files_read": counts["files_read"]})
                snap = writer.commit()
                self.parent = snap
                self.counts["snapshots"] += 1
                self._journal(self.journal.committed, snap.id, upto, rebuild.moving)
        if rebuild.moving:  # read again at the next commit, even if nothing else happens
            now = time.monotonic()
            self._first_change = self._first_change or now
            self._last_change = self._last_change or now
        done = time.monotonic()
        # lag: how long the oldest change this commit took had waited for a snapshot
        self.last_commit = {**counts, "snapshot": snap.id if snap is not None else None,
                            "seconds": round(done - started, 3), "at": round(time.time(), 3),
                            "lag_seconds": round(done - oldest, 3) if oldest is not None else 0.0}
        self.repo.events.emit("watch_committed", **{**self.last_commit, "snapshot": snap})
        return snap

    def _journal(self, write: Callable[..., None], *args: Any) -> None:
        """A write or sync of the journal; a failure is a warning, once until it works again:
        commits go on (the marks are in memory), only a crash now means a whole-tree scan."""
        try:
            write(*args)
        except JournalError as exc:
            self._journal_failed(exc)
            return
        if self._journal_broken and not self.journal.unsynced:
            self._journal_broken = False
            self.repo.events.emit("warning", message=f"the watch journal {self.journal.path} "
                                  "is written again")

    def _journal_failed(self, exc: JournalError) -> None:
        if not self._journal_broken:
            self._journal_broken = True
            self.repo.events.emit("warning", message=f"{exc}: changes are still committed, "
                                  "but a watcher restarted now scans the whole tree again "
                                  f"({exc.hint})")

    def attempt(self, *, scan_all: bool = False) -> bool:
        """`commit`, with a failure reported and retried later instead of raised: whether it
        succeeded."""
        try:
            self.commit(scan_all=scan_all)
        except Exception as exc:
            self._failed(exc)
            return False
        if self._failures:
            self.repo.events.emit("watch_recovered", failures=self._failures,
                                  seconds=round(time.monotonic() - (self._failing_since or 0), 3))
        self._failures = 0
        self._retry_at = self._failing_since = None
        if (self._first_change is None and self.last_commit
                and self.last_commit["lag_seconds"] > self.options.max_delay):
            # a late commit (after an outage, or a long one) that left nothing pending: the
            # snapshots are up to date again, which a lag alert needs to hear to be resolved
            self.repo.events.emit("watch_caught_up", lag_seconds=0.0, at=round(time.time(), 3))
        return True

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        self._failures += 1
        self.counts["commit_failures"] += 1
        if self._failing_since is None:
            self._failing_since = now
        delay = min(_RETRY_CAP, _RETRY_BASE * 2.0 ** (self._failures - 1))
        self._retry_at = now + delay
        # the oldest change waiting, or (a failed scan with none) the first failure
        oldest = min(self._first_change or now, self._failing_since)
        self.repo.events.emit("watch_commit_failed", error=exc, failures=self._failures,
                              retry_in=round(delay, 3), pending=len(self.journal.pending),
                              lag_seconds=round(now - oldest, 3), at=round(time.time(), 3))

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        """Watch until `stop_event` is set; then commit what is pending and return."""
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))
        self._start_watching()
        self._read_at = time.monotonic()  # the start scan's events may be this old
        self.parent = None
        if self.journal.last_snapshot is not None:
            try:
                self.parent = self.repo.load_snapshot(self.journal.last_snapshot)
            except Exception:  # forgotten or damaged: fall back to the newest one
                self.parent = None
        if self.parent is None:
            self.parent = find_parent(self.repo, self.roots, self.host)
        self.repo.events.emit("watch_started", roots=self.roots, watches=self.counts["watches"],
                              polling=self.polling, pending=len(self.journal.pending),
                              parent=self.parent, notify=self._notify_name())
        # events seen from here on are marked; the start scan covers everything before
        self.attempt(scan_all=True)
        try:
            if self.notifier is not None:
                self._event_loop()
        except WatchLimitError:  # new directories took the last watches
            count = len(self.notifier) if self.notifier is not None else 0
            if self.options.notify == "auto" and self._instead_of_inotify(count):
                self.attempt(scan_all=True)  # what changed while no mark was there
                self._event_loop()
            else:  # scan from now on
                self._emit_limit(count, reached=True)
                self._fall_back(f"the inotify watch limit was reached after {count} directories")
                self.attempt(scan_all=True)
        finally:
            if self.notifier is not None:
                self.notifier.close()
                self.notifier = None
        if self.polling is not None:
            self._poll_loop()
        self.commit()

    def _notify_name(self) -> str | None:
        return None if self.notifier is None else (
            "inotify" if self.notifier.per_directory else "fanotify")

    def _fall_back(self, why: str, *, announce: bool = True) -> None:
        if self.notifier is not None:
            self.notifier.close()
            self.notifier = None
        self.polling = why
        self.options.poll_interval = self.options.remote_poll_interval
        if announce:  # at start, watch_started says it
            self.repo.events.emit("watch_polling", reason=why, interval=self.options.poll_interval)

    def _poll_loop(self) -> None:
        interval = self.options.poll_interval
        assert interval is not None
        while True:
            wait = interval if self._retry_at is None else max(
                0.0, min(interval, self._retry_at - time.monotonic()))
            if self.stop_event.wait(wait):
                return
            self.attempt(scan_all=True)

    def _event_loop(self) -> None:
        assert self.notifier is not None
        while not self.stop_event.is_set():
            now = time.monotonic()
            if self._due(now):
                self.attempt()
                continue
            timeout = self._timeout(now)
            read = self._read_events(0.25 if timeout is None else min(timeout, 0.25))
            now = time.monotonic()
            if self.journal.unsynced and (not read or now - self._last_sync >= 0.05):
                self._last_sync = now
                self._journal(self.journal.sync)  # in batches: at most every 50 ms
            self.counts["watches"] = len(self.notifier)

    def _read_events(self, timeout: float) -> bool:
        """Read the events the notifier has (waiting up to ``timeout`` seconds for the first)
        and mark what they name, each dated no later than the return of the read before;
        whether there were any."""
        assert self.notifier is not None
        events = self.notifier.read(timeout)
        returned = time.monotonic()
        for ev in events:
            self._handle(ev)
        self._read_at = returned
        return bool(events)

