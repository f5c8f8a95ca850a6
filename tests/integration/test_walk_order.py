"""The backup walk goes depth first: a directory's tree is written, and the nodes it holds
released, soon after its own subtree is walked, so the directories held open at once grow with
the tree's depth, not with its width (breadth first, every directory of a level stayed open
until the level below was walked). The walk's memory grows with what it holds open.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from keepwell.backends.local import LocalBackend
from keepwell.repository import Repository
from keepwell.sources.files.archiver import Archiver
from keepwell.sources.files.select import Selection

pytestmark = pytest.mark.integration


def test_directories_held_open_grow_with_depth_not_width(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for a in range(60):
        for b in range(5):
            (root / f"a{a:02}" / f"b{b}").mkdir(parents=True)  # empty: settled when listed
    Repository.init(LocalBackend(str(tmp_path / "repo")), "pw")
    repo = Repository.open(LocalBackend(str(tmp_path / "repo")), "pw")
    with repo.new_snapshot("files", [str(root)]) as writer:
        archiver = Archiver(repo, writer, selection=Selection(), one_file_system=False,
                            parent=None, workers=1)
        try:
            node = archiver.backup_root(str(root))
        finally:
            archiver.close()
        assert node is not None
        writer.add_node(str(root), node)
        snap = writer.commit()
    assert archiver.counts["dirs"] == 1 + 60 + 300
    assert archiver.dirs_open == 0
    assert archiver.dirs_open_peak <= 4  # the root, one a*, one b* (breadth first: 61 or more)
    under = str(root).strip("/") + "/"
    assert len([p for p, _ in repo.walk(snap) if p.startswith(under)]) == 360
