"""``stats --mode``: restic's four ways of counting snapshots, with the snapshot filters.

restore-size counts every entry a restore writes and the bytes of its files; files-by-contents
each distinct content once; blobs-per-file the distinct blobs of each path (before compression);
raw-data the distinct blobs the chosen snapshots use, as stored. The real ``keepwell`` command
runs in a subprocess against a real local repository.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fault.cli import kw, ok


@pytest.fixture
def two(tmp_path: Path) -> dict[str, Any]:
    repo = tmp_path / "repo"
    ok(kw(repo, "init"))
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a").write_bytes(b"x" * 5000)
    (data / "b").write_bytes(b"x" * 5000)  # the same content as a
    (data / "sub" / "c").write_bytes(b"y" * 3000)
    first = json.loads(ok(kw(repo, "backup", "--json", "--host", "one", "--tag", "t1",
                             str(data))))["snapshot"]
    (data / "d").write_bytes(b"z" * 100)
    second = json.loads(ok(kw(repo, "backup", "--json", "--host", "two", str(data))))["snapshot"]
    # the directories above the backed-up path are entries of every snapshot too
    return {"repo": repo, "first": first, "second": second, "above": len(data.parts) - 1}


def _stats(repo: Path, *args: str) -> dict[str, Any]:
    return dict(json.loads(ok(kw(repo, "stats", "--json", *args))))


def test_restore_size_is_the_default_and_counts_every_entry(two: dict[str, Any]) -> None:
    repo, above = two["repo"], two["above"]
    everything = _stats(repo)
    assert everything["mode"] == "restore-size" and everything["snapshots"] == 2
    assert everything["total_file_count"] == (above + 4) + (above + 5)
    assert everything["total_size"] == 13_000 + 13_100
    latest = _stats(repo, "--mode", "restore-size", "latest")
    assert (latest["snapshots"], latest["total_size"]) == (1, 13_100)
    assert _stats(repo, "--host", "one")["total_size"] == 13_000
    assert _stats(repo, "--tag", "t1", "latest")["total_size"] == 13_000
    wrong = kw(repo, "stats", "--tag", "t1", two["second"]["id"][:8])
    assert wrong.returncode != 0 and "does not match --tag t1" in wrong.stderr
    text = ok(kw(repo, "stats", "--host", "two"))
    assert "Stats in restore-size mode:" in text and "Total Size:  12.79 KiB" in text


def test_files_by_contents_and_blobs_per_file(two: dict[str, Any]) -> None:
    repo = two["repo"]
    unique = _stats(repo, "--mode", "files-by-contents")
    assert (unique["total_file_count"], unique["total_size"]) == (3, 8_100)
    first = _stats(repo, "--mode", "files-by-contents", two["first"]["id"])
    assert (first["total_file_count"], first["total_size"]) == (2, 8_000)
    per_file = _stats(repo, "--mode", "blobs-per-file")
    # a and b share their blob, but each path counts it
    assert (per_file["total_file_count"], per_file["total_blob_count"],
            per_file["total_size"]) == (4, 4, 13_100)


def test_raw_data_of_chosen_snapshots_and_of_the_repository(two: dict[str, Any]) -> None:
    repo = two["repo"]
    first = _stats(repo, "--mode", "raw-data", two["first"]["id"])
    both = _stats(repo, "--mode", "raw-data", "--host", "one", "--host", "two")
    assert first["snapshots"] == 1 and both["snapshots"] == 2
    assert first["blobs"]["data"] == 2 and both["blobs"]["data"] == 3
    assert first["total_uncompressed_size"] >= 8_000 and both["total_uncompressed_size"] >= 8_100
    assert 0 < first["total_size"] < both["total_size"]
    assert first["total_blob_count"] == first["blobs"]["data"] + first["blobs"]["tree"]
    assert first["total_file_size"] == 13_000 and first["dedup_ratio"] > 1
    whole = _stats(repo, "--mode", "raw-data")
    assert whole["blobs"]["data"] == 3 and whole["total_size"] >= both["total_size"]
    text = ok(kw(repo, "stats", "--mode", "raw-data"))
    assert "Stats in raw-data mode:" in text and "Compression Ratio" in text


def test_a_bad_mode_is_one_line(two: dict[str, Any]) -> None:
    r = kw(two["repo"], "stats", "--mode", "bytes")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "restore-size" in r.stderr
    assert "Traceback" not in r.stderr
