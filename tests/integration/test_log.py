"""``keepwell log PATH``: the versions of one file or directory across snapshots, oldest first.

A real repository gets several backups of a tree while one file in it is changed, deleted and
recreated; the real ``keepwell`` command runs in a subprocess. Consecutive snapshots with the
same version fold into one line, the deletion shows as a gap, and the restore the output
suggests gives back that version. The lookup reads only the trees along the path.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

import keepwell
from keepwell.backends.local import LocalBackend
from keepwell.repository import Repository
from keepwell.sources.files.versions import PathHistory
from tests.fault.cli import KW, PASSWORD, kw, ok


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    location = tmp_path_factory.mktemp("log") / "repo"
    ok(kw(location, "init"))
    return location


def _backup(repo: Path, *paths: Path) -> str:
    out = json.loads(ok(kw(repo, "backup", "--json", *map(str, paths))))
    return str(out["snapshot"]["id"])


def _set(path: Path, data: bytes, mtime: int) -> None:
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


@pytest.fixture(scope="module")
def history(repo: Path) -> dict[str, Any]:
    """Six backups of ``tree``: notes.txt v1 twice, v2, absent twice, v3 (recreated)."""
    tree = repo.parent / "tree"
    (tree / "docs").mkdir(parents=True)
    for i in range(20):  # siblings the lookup must not read
        (tree / f"other{i}").mkdir()
        (tree / f"other{i}" / "x").write_text(str(i))
    notes = tree / "docs" / "notes.txt"
    ids = []
    _set(notes, b"version one\n", 1_700_000_000)
    ids += [_backup(repo, tree), _backup(repo, tree)]
    _set(notes, b"version two, longer\n", 1_700_000_100)
    ids.append(_backup(repo, tree))
    notes.unlink()
    (tree / "docs" / "other.txt").write_text("keeps docs changing")
    ids.append(_backup(repo, tree))
    (tree / "docs" / "other.txt").write_text("still changing")
    ids.append(_backup(repo, tree))
    _set(notes, b"three\n", 1_700_000_200)
    ids.append(_backup(repo, tree))
    return {"tree": tree, "notes": notes, "ids": ids}


def test_versions_fold_and_show_the_gap(repo: Path, history: dict[str, Any], tmp_path: Path) -> None:
    notes, ids = history["notes"], history["ids"]
    out = ok(kw(repo, "log", str(notes))).splitlines()
    assert out[0] == f"{notes}: 3 version(s) in 6 snapshot(s)"
    one, two, gap, three, hint = out[1:]
    assert one.startswith(ids[0][:8]) and f"in 2 snapshots ({ids[0][:8]} .. {ids[1][:8]})" in one
    assert "12 B" in one and "-rw-r--r--" in one and "2023-11-14" in one
    assert two.startswith(ids[2][:8]) and f"in 1 snapshot ({ids[2][:8]})" in two
    assert gap.split() == ["absent", "in", "2", "snapshots", f"({ids[3][:8]}", "..", f"{ids[4][:8]})"]
    assert three.startswith(ids[5][:8])
    assert len({line.split()[6] for line in (one, two, three)}) == 3  # three content ids
    # the suggested restore, with the id of the second version, gives back that version
    command = hint.split(": ", 1)[1].split(" (")[0]
    assert command.startswith("keepwell restore SNAPSHOT --include ")
    include = command.split("--include ")[1].split(" --target")[0].strip("'")
    target = tmp_path / "restored"
    ok(kw(repo, "restore", ids[2][:8], "--include", include, "--target", str(target)))
    assert (target / str(notes).lstrip("/")).read_bytes() == b"version two, longer\n"
    assert not (target / str(history["tree"]).lstrip("/") / "other0").exists()


def test_json(repo: Path, history: dict[str, Any]) -> None:
    ids = history["ids"]
    out = json.loads(ok(kw(repo, "log", "--json", str(history["notes"]))))
    assert out["path"] == str(history["notes"]) and out["snapshots_searched"] == 6
    assert out["versions"] == 3
    runs = out["history"]
    assert [r["present"] for r in runs] == [True, True, False, True]
    assert [r["snapshots"] for r in runs] == [ids[0:2], ids[2:3], ids[3:5], ids[5:6]]
    first = runs[0]
    assert first["type"] == "file" and first["size"] == 12 and first["mode"] == "0o644"
    assert first["mtime_ns"] == 1_700_000_000 * 10**9 and first["count"] == 2
    assert first["first"]["id"] == ids[0] and first["last"]["id"] == ids[1]
    assert runs[0]["content_id"] != runs[1]["content_id"] != runs[3]["content_id"]
    assert "content_id" not in runs[2]


def test_a_directory_and_a_relative_path(repo: Path, history: dict[str, Any]) -> None:
    tree = history["tree"]
    src = str(Path(keepwell.__file__).parents[1])
    env = {**os.environ, "KEEPWELL_PASSWORD": PASSWORD, "KEEPWELL_REPOSITORY": str(repo),
           "KEEPWELL_TESTONLY_WEAK_KDF": "1",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(KW + ["log", "--json", "docs"], cwd=tree, env=env, capture_output=True,
                       text=True)
    out = json.loads(ok(r))
    assert out["path"] == str(tree / "docs")
    runs = out["history"]
    assert all(run["present"] and run["type"] == "dir" for run in runs)
    # the directory changed in every backup but the second
    assert [run["count"] for run in runs] == [2, 1, 1, 1, 1]
    # an unchanged directory folds into one line
    assert json.loads(ok(kw(repo, "log", "--json", str(tree / "other3"))))["history"][0]["count"] == 6


def test_unknown_path_is_one_line_and_exit_2(repo: Path, history: dict[str, Any]) -> None:
    r = kw(repo, "log", str(history["tree"] / "nope.txt"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"keepwell: {history['tree']}/nope.txt is in none of the 6 "
                               "snapshots that back it up")
    r = kw(repo, "log", "/elsewhere/x")
    assert r.returncode == 2 and "in no snapshot: none backs it up" in r.stderr
    # the filters narrow the snapshots searched
    r = kw(repo, "log", "--host", "no-such-host", str(history["notes"]))
    assert r.returncode == 2


def test_reads_only_the_trees_along_the_path(repo: Path, history: dict[str, Any]) -> None:
    with Repository.open(LocalBackend(str(repo)), PASSWORD) as r:
        snaps = r.list_snapshots()
        h = PathHistory(r, str(history["notes"]))
        runs, searched = h.runs(snaps)
        assert searched == 6 and len(runs) == 4
        depth = len(h.parts)
        # one tree per component and snapshot at most, and shared directories once: never the
        # 20 sibling directories
        assert h.trees_read <= depth * len(snaps)
        distinct_dirs = {(snap.tree, 0) for snap in snaps}
        assert h.trees_read < depth * len(snaps) or len(distinct_dirs) == len(snaps)
        again = h.trees_read
        h.runs(snaps)
        assert h.trees_read == again  # every answer remembered
