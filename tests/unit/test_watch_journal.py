"""The change journal of keepwell watch, the trie of changed paths, and the inotify reader, on
real files and a real inotify instance."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keepwell.sources.files.incremental import Changes, changes_under
from keepwell.sources.files.inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_ISDIR,
    Inotify,
    remote_filesystem,
)
from keepwell.sources.files.journal import Journal


def test_a_path_leaves_the_journal_only_with_a_commit_after_its_mark(tmp_path: Path) -> None:
    path = str(tmp_path / "j" / "journal")
    j = Journal(path)
    assert j.mark("/t/a") and not j.mark("/t/a")  # pending already: nothing written
    j.mark("/t/d", subtree=True)
    assert not j.mark("/t/d/inner")  # inside a subtree scanned whole
    upto = j.seq
    j.mark("/t/b")  # after the commit took its changes
    j.committed("snap1", upto, again=["/t/a"])  # /t/a kept moving while read
    j.sync()
    j.close()
    again = Journal(path)
    assert again.last_snapshot == "snap1"
    assert sorted(again.pending) == ["/t/a", "/t/b"]
    again.close()


def test_a_torn_last_line_is_ignored_and_synced_marks_survive(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    j = Journal(path)
    j.mark("/t/a")
    j.mark("/t/\udcff odd name\nwith a newline")
    j.sync()
    j.close()
    with open(path, "ab") as f:
        f.write(b'["c", 9, "/t/tor')  # a kill in the middle of a write
    again = Journal(path)
    assert sorted(again.pending) == ["/t/a", "/t/\udcff odd name\nwith a newline"]
    again.close()


def test_compaction_keeps_the_pending_marks_only(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import keepwell.sources.files.journal as journal

    path = str(tmp_path / "journal")
    j = Journal(path)
    monkeypatch.setattr(journal, "_COMPACT_AT", 1000)  # a small journal compacts at once
    for i in range(100):
        j.mark(f"/t/f{i}")
    j.committed("s1", j.seq)
    j.mark("/t/late")
    j.sync()
    j.close()
    assert os.path.getsize(path) < 1000
    again = Journal(path)
    assert list(again.pending) == ["/t/late"] and again.last_snapshot == "s1"
    assert again.seq >= 101
    again.close()


def test_changes_are_grouped_by_root_and_a_subtree_swallows_what_is_below() -> None:
    c = changes_under("/r", {"/r/a/b": False, "/r/a": True, "/r/x": False, "/other/y": False})
    assert c is not None
    assert c.children["a"] == Changes(subtree=True)
    assert c.children["x"] == Changes()
    assert changes_under("/r", {"/rr/a": False}) is None
    root = changes_under("/r", {"/r": False})
    assert root == Changes()


def test_inotify_reports_creations_and_new_directories(tmp_path: Path) -> None:
    ino = Inotify()
    try:
        assert ino.add(str(tmp_path)) and len(ino) == 1
        assert not ino.add(str(tmp_path / "missing"))
        (tmp_path / "f").write_text("x")
        (tmp_path / "d").mkdir()
        seen: list[tuple[str, int]] = []
        while not any(name == "d" for name, _ in seen):
            seen += [(e.name, e.mask) for e in ino.read(5)]
        assert any(n == "f" and m & IN_CLOSE_WRITE for n, m in seen)
        assert any(n == "d" and m & IN_CREATE and m & IN_ISDIR for n, m in seen)
        ino.add(str(tmp_path / "d"))
        ino.remove_under(str(tmp_path / "d"))
        assert not ino.watches(str(tmp_path / "d")) and ino.watches(str(tmp_path))
    finally:
        ino.close()
    assert remote_filesystem(str(tmp_path)) is None


def test_a_tree_written_for_the_next_commit_equals_the_tree_read_back(tmp_path: Path) -> None:
    """The watcher's commits keep the trees they write in the repository's tree cache
    (``remember_trees``); what the next commit takes from there must be, node for node and in
    order, what reading the stored tree gives."""
    from keepwell.backends.local import LocalBackend
    from keepwell.repository import Repository
    from keepwell.sources.files.archiver import _Names, node_from_stat
    from keepwell.sources.files.metadata import XattrReader

    data = tmp_path / "data"
    data.mkdir()
    for name in ("b", "a", "\udcff-odd", "c.txt"):
        (data / name).write_bytes(name.encode("utf-8", "surrogateescape"))
    os.symlink("a", data / "link")
    names, xattrs = _Names(), XattrReader()
    nodes = []
    for name in os.listdir(data):
        p = str(data / name)
        node = node_from_stat(name, os.lstat(p), names)
        node.xattrs = xattrs.read(p, node.dev)
        if node.type == "symlink":
            node.target = os.readlink(p)
        nodes.append(node)
    repo = Repository.init(LocalBackend(str(tmp_path / "repo")), "pw")
    with repo.new_snapshot("files", [str(data)], remember_trees=True) as w:
        tree_id = w.save_tree(nodes)
        w.commit()
    held = repo.load_tree(tree_id)  # from the cache
    fresh = Repository.open(LocalBackend(str(tmp_path / "repo")), "pw")
    assert held == fresh.load_tree(tree_id)  # from storage
    fresh.close()
    repo.close()
