"""``keepwell watch``: the real command in a process of its own, on a real tree.

A change is in a committed snapshot once the watcher has seen it: files created, written,
deleted and renamed; every file of a burst written into freshly made directories; both with
inotify and with fanotify (tests/integration/test_fanotify.py has the rest of fanotify). Each commit
re-reads only what changed, which the snapshot's own counts show (not a timing). Waits are on
the latest snapshot's listing matching the tree, never on a fixed sleep. Kills of the watcher
under a writer: tests/fault/test_watch_kills.py.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault.cli import kw, ok
from tests.fault.watch_support import (
    Watch,
    assert_same_bytes,
    snapshot_listing,
    snapshots,
    tree_listing,
    wait_until_held,
)
from tests.waiting import wait_for


@pytest.fixture
def place(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    repo, cache, root = tmp_path / "repo", tmp_path / "cache", tmp_path / "tree"
    root.mkdir()
    ok(kw(repo, "init"))
    yield repo, cache, root


@pytest.mark.parametrize("notify", ["inotify", "fanotify"])
def test_changes_deletes_and_renames_are_committed(place: tuple[Path, Path, Path],
                                                   tmp_path: Path, notify: str) -> None:
    repo, cache, root = place
    (root / "docs").mkdir()
    (root / "docs" / "a.txt").write_text("alpha\n")
    (root / "old.txt").write_text("old\n")
    w = Watch(repo, cache, root, "--notify", notify)
    try:
        w.started()
        wait_until_held(repo, root, "the start scan")
        (root / "docs" / "a.txt").write_text("alpha, edited\n")
        (root / "new.bin").write_bytes(os.urandom(300_000))
        os.symlink("docs/a.txt", root / "link")
        wait_until_held(repo, root, "new and changed files")
        (root / "old.txt").unlink()
        (root / "docs" / "a.txt").rename(root / "docs" / "b.txt")
        (root / "docs").rename(root / "papers")
        (root / "papers" / "inner").mkdir()
        (root / "papers" / "inner" / "c.txt").write_text("c\n")
        wait_until_held(repo, root, "deletes and renames")
        assert_same_bytes(repo, root, tmp_path / "restored")
    finally:
        rc, err = w.stop()
    assert rc == 0, err
    assert ("inotify watches in use" if notify == "inotify"
            else "1 filesystem(s) marked with fanotify") in err, err


@pytest.mark.parametrize("notify", ["inotify", "fanotify"])
def test_every_file_written_into_new_directories_is_captured(place: tuple[Path, Path, Path],
                                                             tmp_path: Path, notify: str) -> None:
    repo, cache, root = place
    w = Watch(repo, cache, root, "--notify", notify)
    try:
        w.started()
        rng = random.Random(5)
        for d in range(20):
            deep = root / f"d{d}" / "x" / "y"
            deep.mkdir(parents=True)  # files follow at once, before any watch can be added
            for i in range(50):  # half in the deepest directory, half in the top one
                where = deep if i % 2 else root / f"d{d}"
                (where / f"f{i}").write_bytes(rng.randbytes(rng.randint(0, 2000)))
        assert sum(1 for k, v in tree_listing(root).items() if v[0] == "file") == 1000
        wait_until_held(repo, root, "1,000 files in new directories")
        assert_same_bytes(repo, root, tmp_path / "restored")
    finally:
        rc, err = w.stop()
    assert rc == 0, err


def test_a_commit_rereads_only_what_changed(place: tuple[Path, Path, Path]) -> None:
    repo, cache, root = place
    for a in range(10):
        for b in range(10):
            d = root / f"a{a}" / f"b{b}"
            d.mkdir(parents=True)
            for i in range(5):
                (d / f"f{i}").write_text(f"{a} {b} {i}\n")
    w = Watch(repo, cache, root)
    try:
        w.started()
        first = snapshots(repo)[-1]["summary"]
        assert first["files_read"] == 500 and first["dirs_listed"] == 111
        (root / "a3" / "b7" / "f2").write_text("changed\n")
        wait_until_held(repo, root, "one changed file")
        last = snapshots(repo)[-1]["summary"]
        # the file, and one new tree for each directory on its way: b7, a3 and the root
        assert last["files_read"] == 1
        assert last["trees_written"] == 3
        assert last["trees_loaded"] == 3
        assert last["dirs_listed"] == 0 and last["subtrees_scanned"] == 0
        # a new directory is scanned whole, and only it
        (root / "a5" / "fresh").mkdir()
        (root / "a5" / "fresh" / "g").write_text("g\n")
        wait_until_held(repo, root, "a new directory")
        last = snapshots(repo)[-1]["summary"]
        assert last["dirs_listed"] == 1 and last["subtrees_scanned"] == 1
        assert last["files_read"] == 1 and last["trees_written"] == 2  # a5, root
    finally:
        rc, err = w.stop()
    assert rc == 0, err


def test_polling_finds_changes_where_events_are_not_used(place: tuple[Path, Path, Path]) -> None:
    repo, cache, root = place
    (root / "x").write_text("x\n")
    w = Watch(repo, cache, root, "--poll", "200ms")
    try:
        w.started()
        (root / "y").mkdir()
        (root / "y" / "z").write_text("z\n")
        wait_until_held(repo, root, "a change found by a scan")
    finally:
        rc, err = w.stop()
    assert rc == 0, err
    assert "scanning instead of watching" in err


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    ok(kw(repo, "init"))
    (tmp_path / "f").write_text("f")
    for args, says in ((["watch", str(tmp_path / "nope")], "no such directory"),
                       (["watch", str(tmp_path / "f")], "not a directory"),
                       (["watch", str(tmp_path), str(tmp_path / "repo")], "is inside"),
                       (["watch", str(tmp_path), "--max-delay", "soon"], "--max-delay"),
                       (["watch", ""], "empty path")):  # never the current directory
        r = kw(repo, *args, timeout=60)
        assert r.returncode == 2, r.stderr
        assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_continuous_files_source_in_the_daemon(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``mode: continuous``: the daemon keeps a watcher running for the source (with the
    source's ``notify``), whose snapshots carry the source's tag, and stops it with itself."""
    from tests.integration.control_support import PASSWORD as CONTROL_PASSWORD
    from tests.integration.control_support import Workspace

    monkeypatch.setenv("KEEPWELL_CACHE_DIR", str(tmp_path / "cache"))  # the journal's home
    ws = Workspace(tmp_path)
    try:
        repo = ws.repository("r")
        data = tmp_path / "data"
        (data / "sub").mkdir(parents=True)
        (data / "sub" / "first").write_text("1\n")
        ws.write_config({
            "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
            "sources": {"live": {"kind": "files", "repository": "r", "paths": [str(data)],
                                 "mode": "continuous", "max_delay": "300ms",
                                 "excludes": ["*.tmp"], "notify": "fanotify"}},
        })
        d = ws.daemon()
        d.wait_for(lambda: d.events("stream_started"), what="the watcher")
        pid = d.events("stream_started")[0]["pid"]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--notify") + 1] == b"fanotify", argv

        def held() -> bool:
            r = kw(repo, "ls", "latest", "--json", env={"KEEPWELL_PASSWORD": CONTROL_PASSWORD})
            return r.returncode == 0 and f"{data}/sub/second" in r.stdout

        (data / "sub" / "second").write_text("2\n")
        (data / "scratch.tmp").write_text("not kept\n")
        d.wait_for(held, timeout=60, what="a change committed by the daemon's watcher")
        r = kw(repo, "snapshots", "--json", env={"KEEPWELL_PASSWORD": CONTROL_PASSWORD})
        snaps = json.loads(ok(r))
        assert all(any("live" in t for t in s["tags"]) for s in snaps), snaps
        listing = ok(kw(repo, "ls", "latest", env={"KEEPWELL_PASSWORD": CONTROL_PASSWORD}))
        assert "scratch.tmp" not in listing
        assert d.stop() == 0
        assert not d.events("stream_exited")
    finally:
        ws.close()


def test_the_repository_and_the_journal_inside_the_tree_are_not_watched(tmp_path: Path) -> None:
    """Watching them would commit every commit again, without end: they are left out, and the
    watcher says so."""
    root = tmp_path / "tree"
    repo, cache = root / "repo", root / ".cache"
    root.mkdir()
    ok(kw(repo, "init"))
    w = Watch(repo, cache, root)
    try:
        w.started()
        (root / "a.txt").write_text("hello")
        wait_for(lambda: (snapshot_listing(repo, root) or {}).get("a.txt"), "a.txt committed",
                 timeout=120, interval=0.1)
    finally:
        _rc, err = w.stop()
    held = snapshot_listing(repo, root) or {}
    assert not [p for p in held if p.split("/")[0] in ("repo", ".cache")], sorted(held)[:5]
    assert f"{repo} (the repository) lies inside the watched paths: not watched" in err, err
