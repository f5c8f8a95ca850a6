"""SIGKILL of ``keepwell watch`` under a writer that never pauses loses no change.

The watcher is killed five times, each at a moment chosen by what it has done so far (its journal
growing, its commits appearing), not by a clock: while it records the first changes, right after
a commit, with marks pending after a commit, and so on; each time it is started again at once,
while the writer goes on. Then the writer stops, one more watcher commits everything, and the
latest snapshot must list the tree as it is and restore it byte for byte, and `check --read-data`
must pass.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

from tests.fault.cli import kw, ok
from tests.fault.watch_support import (
    Watch,
    assert_same_bytes,
    snapshots,
    wait_until_held,
    writer_loop,
)
from tests.waiting import wait_for


def _journal_size(cache: Path) -> int:
    """The size of the watcher's journal (0 before it exists): <cache>/watch/<repo>/<key>/journal."""
    return sum(p.stat().st_size for p in cache.glob("watch/*/*/journal"))


def test_kill_9_at_moments_chosen_by_the_watchers_progress_loses_nothing(tmp_path: Path) -> None:
    repo, cache, root = tmp_path / "repo", tmp_path / "cache", tmp_path / "tree"
    root.mkdir()
    ok(kw(repo, "init"))
    stop = threading.Event()
    count = [0]
    writer = threading.Thread(target=writer_loop, args=(root, stop, 3, count), daemon=True)
    writer.start()

    # each moment: (what it is, a condition on the running watcher and its journal's size at start)
    Moment = Callable[[Watch, int], bool]
    moments: list[tuple[str, Moment]] = [
        ("the journal grew: changes being recorded, the start scan under way or just done",
         lambda w, j0: _journal_size(cache) > j0),
        ("its first commit (the start scan) was written",
         lambda w, j0: len(w.commits()) >= 1),
        ("marks pending after a commit",
         lambda w, j0: len(w.commits()) >= 1 and _journal_size(cache) > j0 + 2048),
        ("two commits were written",
         lambda w, j0: len(w.commits()) >= 2),
        ("the journal grew by 8 KiB",
         lambda w, j0: _journal_size(cache) > j0 + 8192),
    ]
    try:
        for what, moment in moments:
            j0 = _journal_size(cache)
            w = Watch(repo, cache, root)
            wait_for(lambda w=w, j0=j0, moment=moment: moment(w, j0)  # type: ignore[misc]
                     or w.proc.poll() is not None, what, timeout=120, interval=0.005)
            assert w.proc.poll() is None, w.proc.communicate()  # alive until killed
            rc, _err = w.stop(signal.SIGKILL)
            assert rc == -signal.SIGKILL, what
    finally:
        stop.set()
        writer.join()
    assert count[0] > 0
    w = Watch(repo, cache, root)
    try:
        w.started()
        wait_until_held(repo, root, "every change after five kills")
        assert_same_bytes(repo, root, tmp_path / "restored")
    finally:
        rc, err = w.stop()
    assert rc == 0, err
    ok(kw(repo, "check", "--read-data"))
    assert len(snapshots(repo)) >= 3
