"""The trees a watcher's commits write, in process, on a real tree and a local repository.

What must hold: a commit rewrites a directory from the parent's tree and the changed entries
alone, reusing the encodings of the entries left as they were, and the result is the very tree
a full scan of the same directory writes (the same bytes, so the same id): entries changed,
added between existing names, deleted. The trees a commit comes back
to are held from the commit before (none is read from storage again), even when the cache
holds little more than one version of the tree; the ones it supersedes make room. And a change
made while no events were read (during a commit) counts for max_delay from then, not from when
its event was read. A small file written to while it is read is read again at once; a large one
is stored as read and stays pending for the next commit.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from keepwell.backends.local import LocalBackend
from keepwell.repository import Repository
from keepwell.repository.tree import FILE, Node, encode_pieces, encode_tree, join_pieces
from keepwell.sources.files.archiver import Archiver
from keepwell.sources.files.incremental import Changes, Rebuild
from keepwell.sources.files.journal import Journal
from keepwell.sources.files.select import Selection
from keepwell.sources.files.watch import Watcher, WatchOptions
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("count", [0, 1, 15, 16, 17, 65_535, 65_536, 70_000])
def test_a_tree_joined_from_pieces_is_the_tree_encoded_whole(count: int) -> None:
    nodes = [Node(name=f"n{i:06}", type=FILE, size=i, content=[bytes(32)],
                  xattrs=((b"user.k", b"v"),) if i % 3 else ()) for i in range(count)]
    assert join_pieces(encode_pieces(nodes)) == encode_tree(nodes, ordered=True)
    known: list[bytes | None] = [p if i % 2 else None for i, p in enumerate(encode_pieces(nodes))]
    assert join_pieces(encode_pieces(nodes, known)) == encode_tree(nodes, ordered=True)


def _watcher(tmp_path: Path, root: Path, repo: Repository | None = None) -> tuple[Repository, Watcher]:
    """A watcher of ``root`` with a journal of its own, on ``repo`` or a new repository."""
    if repo is None:
        Repository.init(LocalBackend(str(tmp_path / "repo")), "pw")
        repo = Repository.open(LocalBackend(str(tmp_path / "repo")), "pw")
    journals = tmp_path / "journals"
    journals.mkdir(exist_ok=True)
    journal = Journal(str(journals / f"journal-{len(os.listdir(journals))}"))
    return repo, Watcher(repo, [str(root)], journal, Selection(), WatchOptions())


def _write(path: Path, rng: random.Random) -> None:
    path.write_bytes(rng.randbytes(rng.randint(0, 3000)))


def test_commits_write_the_trees_a_full_scan_writes(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    rng = random.Random(7)
    for d in range(12):
        (root / f"d{d:02}").mkdir(parents=True)
        for f in range(0, 40 if d else 3, 2):  # even names: odd ones land between them
            _write(root / f"d{d:02}" / f"f{f:03}", rng)
    repo, w = _watcher(tmp_path, root)
    w.commit(scan_all=True)
    for round_ in range(6):
        for _ in range(30):
            name = root / f"d{rng.randrange(12):02}" / f"f{rng.randrange(45):03}"
            if rng.random() < 0.2 and name.exists():
                name.unlink()
            else:
                _write(name, rng)
            w._mark(str(name))
        if round_ == 3:  # a new directory between existing ones
            (root / "d05a").mkdir()
            _write(root / "d05a" / "x", rng)
            w._mark(str(root / "d05a"), subtree=True)
        snap = w.commit()
        assert snap is not None
        # the same state scanned whole, with no parent, into the same repository
        _, full = _watcher(tmp_path, root, repo)
        scanned = full.commit(scan_all=True)
        assert scanned is not None
        assert full.last_commit["files_read"] > 0  # it did read everything again
        ours = repo.find_node(snap, str(root)).subtree
        theirs = repo.find_node(scanned, str(root)).subtree
        assert ours is not None and theirs is not None
        dirs = repo.load_tree(ours)
        assert dirs == repo.load_tree(theirs)  # every directory's tree has the same id: same bytes
        for node in dirs:
            assert node.subtree is not None
            names = [n.name for n in repo.load_tree(node.subtree)]
            assert names == sorted(names), node.name


def test_a_commit_reads_no_tree_the_commit_before_wrote(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    rng = random.Random(3)
    dirs, per_dir = 30, 50
    for d in range(dirs):
        (root / f"d{d:02}").mkdir(parents=True)
        for f in range(per_dir):
            _write(root / f"d{d:02}" / f"f{f:03}", rng)
    repo, w = _watcher(tmp_path, root)
    w.commit(scan_all=True)
    # room for one version of every directory and a third of another
    repo.trees_budget_nodes = int(dirs * per_dir * 1.3)
    for _ in range(5):
        for d in range(dirs):  # every directory changes at every commit
            path = root / f"d{d:02}" / f"f{rng.randrange(per_dir):03}"
            _write(path, rng)
            w._mark(str(path))
        read = repo.trees_read
        snap = w.commit()
        assert snap is not None and w.last_commit["trees_written"] >= dirs
        assert repo.trees_read == read, "trees read from storage again"
    assert os.listdir(root)


def test_a_change_made_while_no_event_was_read_counts_from_then(tmp_path: Path) -> None:
    """A commit reads no events: a change made during one is dated no later than the read
    before it, so max_delay does not start only once the commit is over (nor its lag)."""
    root = tmp_path / "tree"
    root.mkdir()
    repo, w = _watcher(tmp_path, root)
    w._start_watching()
    try:
        w.commit(scan_all=True)
        w._read_events(0)  # nothing yet
        assert w._first_change is None
        before = time.monotonic()
        (root / "during-a-commit").write_text("x")  # no events are read meanwhile
        w.commit()  # nothing pending: the read comes after it

        def read() -> bool:
            w._read_events(0.1)
            return w._first_change is not None

        wait_for(read, "the event")
        assert w._first_change is not None and w._first_change <= before
        called = time.monotonic()
        assert w.commit() is not None
        # the lag it reports counts from then too (rounded to the millisecond)
        assert w.last_commit["lag_seconds"] >= round(called - before, 3) - 0.001
    finally:
        assert w.notifier is not None
        w.notifier.close()


@pytest.mark.parametrize(("size", "reads", "moving"), [(10_000, 2, False), (2 << 20, 1, True)])
def test_a_file_that_moves_while_read(tmp_path: Path, size: int, reads: int, moving: bool) -> None:
    """A small file written to during its read is read again at once; a large one is not (the
    commit would wait on it): it is stored as read, and stays pending as ``moving``."""
    root = tmp_path / "tree"
    root.mkdir()
    path = root / "file"
    path.write_bytes(os.urandom(size))
    repo, _ = _watcher(tmp_path, root)
    writer = repo.new_snapshot("files", [str(root)])
    with writer:
        archiver = Archiver(repo, writer, selection=Selection(), one_file_system=False,
                            parent=None, workers=1)
        read = archiver.read_file
        seen: list[int] = []

        def read_while_written(p: str, node: Node) -> list[bytes]:
            ids = read(p, node)
            seen.append(node.size)
            if len(seen) == 1:  # a writer appends while the first read goes on
                with open(p, "ab") as f:
                    f.write(b"more")
            return ids

        archiver.read_file = read_while_written  # type: ignore[method-assign, assignment]
        rebuild = Rebuild(repo, writer, archiver, Selection())
        try:
            node = rebuild.rebuild(str(path), None, Changes())
        finally:
            archiver.close()
        writer.abort()
    assert node is not None
    assert len(seen) == reads
    assert rebuild.moving == ([str(path)] if moving else [])
    assert node.size == (size if moving else size + 4)  # as it was read
