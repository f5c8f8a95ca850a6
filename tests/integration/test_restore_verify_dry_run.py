"""``restore --verify``: every restored file read back and compared with the snapshot, blob by
blob. A restore that the disk then fails (a byte flipped, a file cut short, deleted or replaced
by a link) is reported file by file with exit code 1; a link planted in place of a file is
never followed to read what it points at. ``restore --dry-run``: what a restore would write,
the same counts as the restore's, and nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

from keepwell.repository import open_repository
from keepwell.sources.files.restorer import restore_snapshot
from keepwell.sources.files.verify import verify_restored
from tests.fault.cli import PASSWORD, kw, ok

MiB = 1024 * 1024


def _tree(root: Path) -> dict[str, bytes]:
    files = {"big.bin": os.urandom(3 * MiB + 12345), "empty": b"",
             **{f"d{i % 5}/small-{i}.txt": f"file {i}\n".encode() * (i + 1) for i in range(40)}}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "link").symlink_to("big.bin")
    return files


def _backed_up(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    repo, data = tmp_path / "repo", tmp_path / "data"
    ok(kw(repo, "init"))
    files = _tree(data)
    ok(kw(repo, "backup", str(data)))
    return repo, data, files


def test_a_restore_verified_whole(tmp_path: Path) -> None:
    repo, data, files = _backed_up(tmp_path)
    out = ok(kw(repo, "restore", "latest", "--target", str(tmp_path / "a"), "--verify"))
    assert f"verified {len(files)} files" in out and "identical to the snapshot" in out, out
    doc = json.loads(ok(kw(repo, "restore", "latest", "--target", str(tmp_path / "b"),
                           "--verify", "--include", "d1", "--json")))
    assert doc["verified"]["files"] == 8 and doc["verified"]["errors"] == [], doc
    assert doc["verified"]["bytes"] == sum(len(v) for k, v in files.items() if k.startswith("d1/"))
    plain = json.loads(ok(kw(repo, "restore", "latest", "--target", str(tmp_path / "c"),
                             "--json")))
    assert "verified" not in plain  # read back only when asked


def test_what_the_disk_changed_after_the_restore_is_reported(tmp_path: Path) -> None:
    repo_path, data, files = _backed_up(tmp_path)
    os.environ["KEEPWELL_TESTONLY_WEAK_KDF"] = "1"
    repo = open_repository(str(repo_path), PASSWORD)
    try:
        snap = repo.find_snapshot("latest")
        target = tmp_path / "restored"
        result = restore_snapshot(repo, snap, str(target))
        assert not result.errors
        inside = target / str(data).lstrip("/")
        with open(inside / "big.bin", "r+b") as f:  # a byte flipped in the second blob or later
            f.seek(2 * MiB + 7)
            byte = f.read(1)
            f.seek(2 * MiB + 7)
            f.write(bytes([byte[0] ^ 1]))
        with open(inside / "d0" / "small-5.txt", "r+b") as f:
            f.truncate(3)
        (inside / "d1" / "small-1.txt").unlink()
        outside = tmp_path / "outside.txt"
        outside.write_bytes(files["d2/small-2.txt"])  # the right bytes, but not in the target
        (inside / "d2" / "small-2.txt").unlink()
        (inside / "d2" / "small-2.txt").symlink_to(outside)

        found = verify_restored(repo, snap, str(target), selected=lambda _path: True)
    finally:
        repo.close()
    problems = {os.path.relpath(path, inside): what for path, what in found.errors}
    assert set(problems) == {"big.bin", "d0/small-5.txt", "d1/small-1.txt", "d2/small-2.txt"}
    assert problems["big.bin"].startswith("differs from the snapshot in bytes ")
    first, last = map(int, problems["big.bin"].split("bytes ")[1].split("-"))
    assert first <= 2 * MiB + 7 <= last  # the blob that holds the flipped byte
    assert problems["d0/small-5.txt"].startswith("is 3 bytes")
    assert problems["d1/small-1.txt"] == "is missing"
    assert "symbolic link" in problems["d2/small-2.txt"]
    assert found.files == len(files)


def test_a_dry_run_counts_what_the_restore_writes_and_writes_nothing(tmp_path: Path) -> None:
    repo, data, files = _backed_up(tmp_path)
    for i, args in enumerate(([], ["--include", str(data / "d3")], ["--exclude", "*.txt"])):
        target = tmp_path / f"dry{i}"
        plan = json.loads(ok(kw(repo, "restore", "latest", "--target", str(target),
                                "--dry-run", "--json", *args)))
        assert not target.exists(), args
        done = json.loads(ok(kw(repo, "restore", "latest", "--target", str(target), "--json",
                                *args)))
        assert plan["dry_run"] is True
        assert (plan["files"], plan["dirs"], plan["bytes"]) == \
            (done["files"], done["dirs"], done["bytes"]), args
    assert plan["files"] == 2 and plan["symlinks"] == 1  # big.bin, empty and the link
    out = ok(kw(repo, "restore", "latest", "--target", str(tmp_path / "new"), "-n"))
    assert out.startswith(f"would restore {len(files)} files, ") and "1 symbolic links" in out
    busy = kw(repo, "restore", "latest", "--target", str(tmp_path / "dry0"), "--dry-run")
    assert busy.returncode == 1 and "is not empty" in busy.stderr  # checked as a restore would
    both = kw(repo, "restore", "latest", "--target", str(tmp_path / "x"), "-n", "--verify")
    assert both.returncode == 2 and not (tmp_path / "x").exists()
