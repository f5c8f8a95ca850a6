"""fanotify with directory and name reporting: one mark per filesystem, against the real kernel.

`Fanotify` reports creations, writes, renames and removals under its roots as paths, and
nothing from elsewhere on the same filesystem; a filesystem mounted below a root gets a mark of
its own (none with ``one_file_system``); an overflow of the kernel's queue is reported, not
lost. ``keepwell watch`` takes fanotify by itself where its path is a mount point and where
inotify runs out of watches. A btrfs snapshot that ``backup --fs-snapshot`` makes inside a
watched subvolume is never put in the watcher's snapshots (with either kind of notification).
Needs root, as the mounts do; tests/integration/test_watch.py runs its commit tests with
both kinds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepwell.sources.files.fanotify import Fanotify
from keepwell.sources.files.inotify import IN_ISDIR, IN_Q_OVERFLOW, MAX_WATCHES_FILE, Event
from tests.fault.cli import kw, ok
from tests.fault.watch_support import Watch, snapshot_listing, wait_until_held
from tests.integration.fssnap_support import btrfs, ext4, sh
from tests.waiting import wait_for


def _paths_seen(f: Fanotify, until: str) -> dict[str, int]:
    """Read events until one for the path ``until``; every path seen with its masks or'ed."""
    seen: dict[str, int] = {}

    def more() -> bool:
        for ev in f.read(0.2):
            seen[ev.path] = seen.get(ev.path, 0) | ev.mask
        return until in seen

    wait_for(more, f"an event for {until}")
    return seen


def test_changes_under_the_roots_and_nothing_else(tmp_path: Path) -> None:
    root, other = tmp_path / "root", tmp_path / "other"
    (root / "sub").mkdir(parents=True)
    other.mkdir()
    f = Fanotify([str(root)])
    try:
        assert len(f) == 1
        (other / "elsewhere.txt").write_text("not ours")
        (root / "a.txt").write_text("a")
        (root / "made").mkdir()
        (root / "made" / "b.txt").write_text("b")
        (root / "sub").rename(root / "moved")
        (root / "end").write_text("")
        seen = _paths_seen(f, f"{root}/end")
        assert f"{root}/a.txt" in seen and f"{root}/made/b.txt" in seen
        assert seen[f"{root}/made"] & IN_ISDIR
        assert f"{root}/sub" in seen and f"{root}/moved" in seen
        assert not [p for p in seen if not p.startswith(f"{root}/")], seen
        # a directory removed: its parent reports it by name
        (root / "made" / "b.txt").unlink()
        (root / "made").rmdir()
        assert f"{root}/made" in _paths_seen(f, f"{root}/made")
    finally:
        f.close()


def test_a_root_given_through_a_symbolic_link_is_named_as_given(tmp_path: Path) -> None:
    (tmp_path / "real" / "root").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    given = tmp_path / "link" / "root"
    f = Fanotify([str(given)])
    try:
        (given / "a.txt").write_text("a")
        assert f"{given}/a.txt" in _paths_seen(f, f"{given}/a.txt")
    finally:
        f.close()


@pytest.fixture
def mounted_below(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "root"
    root.mkdir()
    with ext4(root):  # mounted at root/ext4
        yield root


def test_a_filesystem_mounted_below_a_root_is_marked_too(mounted_below: Path) -> None:
    root = mounted_below
    f = Fanotify([str(root)])
    try:
        assert len(f) == 2
        (root / "ext4" / "inside.txt").write_text("x")
        assert f"{root}/ext4/inside.txt" in _paths_seen(f, f"{root}/ext4/inside.txt")
    finally:
        f.close()
    alone = Fanotify([str(root)], one_file_system=True)
    try:
        assert len(alone) == 1
        (root / "ext4" / "ignored.txt").write_text("x")
        (root / "end").write_text("x")
        assert f"{root}/ext4/ignored.txt" not in _paths_seen(alone, f"{root}/end")
    finally:
        alone.close()


def test_an_overflow_of_the_queue_is_reported(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    limit = int(Path("/proc/sys/fs/fanotify/max_queued_events").read_text()) \
        if Path("/proc/sys/fs/fanotify/max_queued_events").exists() else 16384
    f = Fanotify([str(root)])
    try:
        for i in range(limit + 100):  # one event each, none read meanwhile
            os.close(os.open(root / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
        events: list[Event] = []
        wait_for(lambda: events.extend(f.read(0.2)) or any(e.mask & IN_Q_OVERFLOW for e in events),
                 "the overflow event")
    finally:
        f.close()


def _watch_place(tmp_path: Path) -> tuple[Path, Path]:
    repo, cache = tmp_path / "repo", tmp_path / "cache"
    ok(kw(repo, "init"))
    return repo, cache


def test_watch_takes_fanotify_on_a_mount_point(tmp_path: Path) -> None:
    with ext4(tmp_path) as root:
        repo, cache = _watch_place(tmp_path)
        (root / "a.txt").write_text("a")
        w = Watch(repo, cache, root)
        try:
            w.started()
            (root / "d").mkdir()
            (root / "d" / "b.txt").write_text("b")
            wait_until_held(repo, root, "a change on the mounted filesystem")
        finally:
            rc, err = w.stop()
        assert rc == 0, err
        assert "1 filesystem(s) marked with fanotify" in err, err


def test_watch_takes_fanotify_when_inotify_runs_out_of_watches(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for i in range(5):
        (root / f"d{i}").mkdir(parents=True)
    repo, cache = _watch_place(tmp_path)
    limits = Path(MAX_WATCHES_FILE)
    before = limits.read_text()
    limits.write_text("1\n")  # fewer than this tree's directories, whatever else holds some
    try:
        w = Watch(repo, cache, root)
        w.started()
    finally:
        limits.write_text(before)
    try:
        (root / "d3" / "late.txt").write_text("seen through the filesystem's mark")
        wait_until_held(repo, root, "a change after the switch")
    finally:
        rc, err = w.stop()
    assert rc == 0, err
    assert "inotify watch limit was reached" in err and "watching with fanotify instead" in err, err


@pytest.mark.parametrize("notify", ["inotify", "fanotify"])
def test_a_backups_btrfs_snapshot_in_the_tree_is_left_out(tmp_path: Path, notify: str) -> None:
    with btrfs(tmp_path) as vol:
        repo, cache = _watch_place(tmp_path)
        (vol / "data").mkdir()
        (vol / "data" / "a.txt").write_text("a")
        w = Watch(repo, cache, vol, "--notify", notify)
        try:
            w.started()
            snap = vol / f".keepwell-fssnap-{os.getpid()}-0badc0de"
            sh("btrfs", "subvolume", "snapshot", "-r", str(vol), str(snap))
            (vol / "data" / "b.txt").write_text("b")
            wait_for(lambda: "data/b.txt" in (snapshot_listing(repo, vol) or {}),
                     "the change beside the snapshot", timeout=120, interval=0.1)
            held = snapshot_listing(repo, vol) or {}
            assert not [p for p in held if "keepwell-fssnap" in p], sorted(held)
            sh("btrfs", "subvolume", "delete", str(snap))
        finally:
            rc, err = w.stop()
        assert rc == 0, err
