"""The backup options restic users reach for: ``--dry-run``, ``--files-from*``, the exclusion
options (``--exclude-if-present``, ``--exclude-caches``, ``--exclude-larger-than``,
``--iexclude``, ``--exclude-file``).

A dry run counts what a backup would add and leaves the repository exactly as it was (not an
object added or touched, no session left); the lists of ``--files-from`` are read as restic
reads them, and a missing path in them is a warning and exit 3; each exclusion drops what restic
drops. The real ``keepwell`` command runs in a subprocess against a real local repository.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fault.cli import KW, PASSWORD, kw, ok


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    location = tmp_path / "repo"
    ok(kw(location, "init"))
    return location


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory below ``root``: size and mtime (ns)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(d, name))
            out[os.path.relpath(os.path.join(d, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def _snapshots(repo: Path) -> list[dict[str, Any]]:
    return list(json.loads(ok(kw(repo, "snapshots", "--json"))))


def _backup(repo: Path, *args: str) -> dict[str, Any]:
    return dict(json.loads(ok(kw(repo, "backup", "--json", *args)))["snapshot"])


def _files(repo: Path, snapshot_id: str) -> set[str]:
    rows = json.loads(ok(kw(repo, "ls", snapshot_id, "--json")))
    return {r["path"] for r in rows if r["type"] == "file"}


def _usage(r: Any, words: str) -> None:
    """One clear line on stderr, exit code 2, no traceback."""
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def _run(repo: Path, *args: str, stdin: str = "") -> Any:
    env = {**os.environ, "KEEPWELL_PASSWORD": PASSWORD, "KEEPWELL_REPOSITORY": str(repo),
           "KEEPWELL_TESTONLY_WEAK_KDF": "1"}
    return subprocess.run([*KW, *args], input=stdin, env=env, capture_output=True, timeout=120,
                          text=True)


# -- --dry-run ------------------------------------------------------------------------------------
def test_dry_run_counts_and_writes_nothing(repo: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    # enough small files for the worker processes to start: they must write nothing either
    _tree(data, {f"small/{i:03}": f"file {i}\n".encode() * 20 for i in range(300)})
    _tree(data, {"big.bin": os.urandom(3 << 20), "same.txt": b"same"})
    first = _backup(repo, str(data))
    (data / "new.bin").write_bytes(os.urandom(100_000))
    (data / "same.txt").write_bytes(b"changed")
    before = _state(repo)

    out = json.loads(ok(kw(repo, "backup", "--dry-run", "--json", str(data))))
    assert _state(repo) == before
    assert out["dry_run"] is True and out["parent"] == first["id"] and out["errors"] == []
    s = out["summary"]
    assert (s["files_new"], s["files_changed"], s["files_unmodified"]) == (1, 1, 301)
    assert 100_000 <= s["bytes_added"] < 200_000 and s["bytes_stored"] > 0
    assert [x["id"] for x in _snapshots(repo)] == [first["id"]]

    text = ok(kw(repo, "backup", "-n", str(data)))
    assert _state(repo) == before
    assert "dry run" in text and "1 new, 1 changed, 301 unmodified" in text
    assert "Would add to the repository" in text
    # the real run afterwards adds what the dry run announced
    second = _backup(repo, str(data))
    assert second["summary"]["bytes_added"] == s["bytes_added"]


def test_dry_run_of_a_first_backup_and_of_stdin(repo: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _tree(data, {"a": b"a" * 5000, "b/c": b"c" * 7000})
    before = _state(repo)
    out = json.loads(ok(kw(repo, "backup", "-n", "--json", str(data))))
    assert out["summary"]["files_new"] == 2 and out["summary"]["bytes_added"] >= 12000
    r = _run(repo, "backup", "--stdin", "--dry-run", "--json", stdin="x" * 9000)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["summary"]["bytes_added"] >= 9000
    assert _state(repo) == before and _snapshots(repo) == []


# -- --files-from, --files-from-verbatim, --files-from-raw ---------------------------------------
def test_files_from_reads_patterns_comments_and_blank_lines(repo: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _tree(data, {"a.txt": b"a", "b.txt": b"b", ".hidden.txt": b"h", "c.log": b"c",
                 "dir/d": b"d", "other": b"o"})
    listing = tmp_path / "list"
    listing.write_text(f"# what to keep\n\n  {data}/*.txt  \n{data}/dir\r\n#{data}/other\n")
    snap = _backup(repo, "--files-from", str(listing), str(data / "c.log"))
    assert _files(repo, snap["id"]) == {f"{data}/{n}" for n in
                                        ("a.txt", "b.txt", ".hidden.txt", "c.log", "dir/d")}


def test_files_from_verbatim_and_raw_take_names_literally(repo: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    odd = ["*star", " lead space", "#hash", "new\nline"]
    _tree(data, {n: n.encode() for n in odd} | {"xstar": b"x"})
    verbatim = tmp_path / "verbatim"
    verbatim.write_bytes(b"".join(f"{data}/{n}\n".encode() for n in odd[:3]) + b"\n")
    raw = tmp_path / "raw"
    raw.write_bytes(f"{data}/{odd[3]}\0".encode())
    snap = _backup(repo, "--files-from-verbatim", str(verbatim), "--files-from-raw", str(raw))
    assert _files(repo, snap["id"]) == {f"{data}/{n}" for n in odd}


def test_files_from_standard_input(repo: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _tree(data, {"one": b"1", "two": b"2"})
    r = _run(repo, "backup", "--json", "--files-from-raw", "-",
             stdin=f"{data}/one\0{data}/two\0")
    assert r.returncode == 0, r.stderr
    assert _files(repo, json.loads(r.stdout)["snapshot"]["id"]) == {f"{data}/one", f"{data}/two"}
    _usage(_run(repo, "backup", "--files-from", "-", "--files-from-verbatim", "-", stdin="x\n"),
           "both read standard input")


def test_files_from_missing_paths_are_warnings(repo: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _tree(data, {"here": b"h"})
    listing = tmp_path / "list"
    listing.write_text(f"{data}/here\n{data}/gone\n{data}/nothing*\n")
    r = kw(repo, "backup", "--files-from", str(listing))
    assert r.returncode == 3, r.stderr
    assert f"warning: {data}/gone: no such file or directory" in r.stderr
    assert f"warning: {data}/nothing*: no such file or directory" in r.stderr
    assert "Traceback" not in r.stderr
    (snap,) = _snapshots(repo)
    assert snap["paths"] == [f"{data}/here"]
    _usage(kw(repo, "backup", "--files-from", str(tmp_path / "absent")), "--files-from")
    (tmp_path / "empty").write_text("# nothing\n")
    _usage(kw(repo, "backup", "--files-from", str(tmp_path / "empty")), "nothing to back up")
    _usage(kw(repo, "backup", "--stdin", "--files-from", str(listing)), "--files-from")


# -- exclusions -----------------------------------------------------------------------------------
SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"


def test_exclude_caches_keeps_only_the_tag_of_a_tagged_directory(repo: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _tree(data, {"keep.txt": b"k",
                 "cache/CACHEDIR.TAG": SIGNATURE + b"\n# a cache\n", "cache/blob": b"b",
                 "cache/sub/deep": b"d",
                 "fake/CACHEDIR.TAG": b"not the signature", "fake/kept": b"f"})
    snap = _backup(repo, "--exclude-caches", str(data))
    assert _files(repo, snap["id"]) == {f"{data}/keep.txt", f"{data}/cache/CACHEDIR.TAG",
                                        f"{data}/fake/CACHEDIR.TAG", f"{data}/fake/kept"}
    # a tagged directory named as the path to back up keeps only its tag too
    only = _backup(repo, "--exclude-caches", str(data / "cache"))
    assert _files(repo, only["id"]) == {f"{data}/cache/CACHEDIR.TAG"}


def test_exclude_if_present_with_and_without_header(repo: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _tree(data, {"a/.nobackup": b"", "a/x": b"x", "b/.marker": b"HEADER and more", "b/y": b"y",
                 "c/.marker": b"other", "c/z": b"z", "d/w": b"w"})
    snap = _backup(repo, "--exclude-if-present", ".nobackup",
                   "--exclude-if-present", ".marker:HEADER", str(data))
    assert _files(repo, snap["id"]) == {f"{data}/a/.nobackup", f"{data}/b/.marker",
                                        f"{data}/c/.marker", f"{data}/c/z", f"{data}/d/w"}
    _usage(kw(repo, "backup", "--exclude-if-present", ":HEADER", str(data)),
           "--exclude-if-present")


def test_exclude_larger_than(repo: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _tree(data, {"small": b"s" * 1024, "edge": b"e" * 2048, "big": b"b" * 2049,
                 "sub/huge": b"h" * 10_000})
    snap = _backup(repo, "--exclude-larger-than", "2K", str(data), str(data / "sub" / "huge"))
    assert _files(repo, snap["id"]) == {f"{data}/small", f"{data}/edge"}
    dry = json.loads(ok(kw(repo, "backup", "-n", "--json", "--exclude-larger-than", "1k",
                           str(data))))
    assert dry["summary"]["files_new"] + dry["summary"]["files_unmodified"] == 1
    _usage(kw(repo, "backup", "--exclude-larger-than", "big", str(data)),
           "--exclude-larger-than")


def test_iexclude_exclude_file_and_iexclude_file_add_up(repo: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _tree(data, {"Photo.JPG": b"p", "notes.txt": b"n", "Build/out.o": b"o", "Secret.KEY": b"s",
                 "scratch/t": b"t", "keep.md": b"k"})
    (tmp_path / "ex").write_text("# comment\n\nscratch\n")
    (tmp_path / "iex").write_text("*.key\n")
    snap = _backup(repo, "--iexclude", "*.jpg", "--iexclude", "build", "--exclude", "*.TXT",
                   "--exclude-file", str(tmp_path / "ex"), "--iexclude-file", str(tmp_path / "iex"),
                   str(data))
    # --exclude stays case-sensitive: *.TXT leaves notes.txt in
    assert _files(repo, snap["id"]) == {f"{data}/notes.txt", f"{data}/keep.md"}
    _usage(kw(repo, "backup", "--iexclude-file", str(tmp_path / "absent"), str(data)),
           "absent")


def _summary(repo: Path, *args: str) -> dict[str, Any]:
    return dict(json.loads(ok(kw(repo, "backup", "--json", *args)))["snapshot"]["summary"])


def test_parent_names_the_snapshot_to_compare_with(repo: Path, tmp_path: Path) -> None:
    """``--parent`` (as restic's): unchanged files are judged against the snapshot it names,
    not against the latest one."""
    src = tmp_path / "src"
    _tree(src, {"a": b"one", "b": b"two", "sub/c": b"three"})
    first = json.loads(ok(kw(repo, "backup", "--json", str(src))))["snapshot"]["short_id"]
    (src / "a").write_bytes(b"one, changed")
    assert _summary(repo, str(src))["files_changed"] == 1
    again = _summary(repo, str(src))  # the latest holds the change: nothing changed
    assert (again["files_changed"], again["files_unmodified"]) == (0, 3)
    against_first = _summary(repo, "--parent", first, str(src))
    assert (against_first["files_changed"], against_first["files_unmodified"]) == (1, 2)
    r = kw(repo, "backup", "--parent", "abcdef12", str(src))
    assert r.returncode == 1 and "no snapshot with id abcdef12" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_force_reads_every_file_again_and_stores_nothing_new(repo: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src, {"a": b"x" * 5000, "sub/b": os.urandom(300_000)})
    _summary(repo, str(src))
    forced = _summary(repo, "--force", str(src))
    assert forced["files_unmodified"] == 0
    assert forced["files_new"] + forced["files_changed"] == 2
    assert forced["bytes_read"] + forced["bytes_processed"] >= 305_000
    assert forced["bytes_added"] < 2000  # the trees of a new snapshot, never the content again
    r = kw(repo, "backup", "--force", "--parent", "latest", str(src))
    assert r.returncode == 2 and "--force" in r.stderr
