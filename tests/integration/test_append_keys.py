"""Append keys (docs/security.md): a key that adds backups and can read and delete nothing.

In a repository made with ``init --append-keys``, an append key backs up (deduplicating against
everything stored, whoever stored it); every command that reads snapshots, trees or data, or
deletes, stops with one line and exit code 13; a full key restores byte for byte what the append
key stored, checks it with ``--read-data``, and prunes it (the blobs it repacks leave their
sender's key for the master key). An append-written pack that is damaged is found by ``check``.
A repository of the first format still opens and restores, and refuses append keys in one line.
An append key's backups are incremental: its own last snapshot and trees are in its local cache;
without them (or when its snapshot was forgotten) every file is read again, and the snapshot is
still whole.
The real ``keepwell`` command runs in a subprocess against a real local repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fault.cli import kw, ok
from tests.integration.compat_support import describe_tree
from tests.integration.test_format_compat import MANIFEST, PASSWORD, copy_repository

APPEND = "append-secret"
NEEDS_FULL = 13


def _as_append(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # the append key's local cache (its own parent snapshots) beside the repository
    return kw(repo, *args, env={"KEEPWELL_PASSWORD": APPEND,
                                "KEEPWELL_CACHE_DIR": str(repo.parent / "cache")})


def _backup(repo: Path, *args: str, append: bool = False) -> dict[str, Any]:
    r = _as_append(repo, "backup", "--json", *args) if append else kw(repo, "backup", "--json", *args)
    return dict(json.loads(ok(r))["snapshot"])


def _refused(r: subprocess.CompletedProcess[str], command: str) -> None:
    """One line naming the command and the role, exit code 13, no traceback."""
    assert r.returncode == NEEDS_FULL, (command, r.returncode, r.stdout + r.stderr)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"append role): {command} needs a full key" in r.stderr, r.stderr


def _files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    location = tmp_path / "repo"
    ok(kw(location, "init", "--append-keys"))
    out = ok(kw(location, "key", "add", "--role", "append", env={"KEEPWELL_NEW_PASSWORD": APPEND}))
    assert out.startswith("added append key ")
    return location


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    _files(root, {"big.bin": os.urandom(3 << 20), "docs/a.txt": b"alpha\n" * 1000,
                  "docs/b.txt": b"beta\n", "empty": b""})
    os.symlink("docs/a.txt", root / "link")
    return root


def test_key_list_shows_roles(repo: Path) -> None:
    keys = json.loads(ok(kw(repo, "key", "list", "--json")))
    assert sorted(k["role"] for k in keys) == ["append", "full"]
    text = ok(_as_append(repo, "key", "list"))
    assert "append" in text and "full" in text
    current = [k for k in json.loads(ok(_as_append(repo, "key", "list", "--json"))) if k["current"]]
    assert [k["role"] for k in current] == ["append"]


def test_full_key_restores_what_the_append_key_stored(repo: Path, tree: Path, tmp_path: Path) -> None:
    snap = _backup(repo, str(tree), append=True)
    assert snap["parent"] is None
    again = _backup(repo, str(tree), append=True)
    assert again["summary"]["bytes_added"] < 4096  # only trees whose times moved, if any
    target = tmp_path / "out"
    ok(kw(repo, "restore", snap["id"][:8], "--target", str(target)))
    assert describe_tree(target / str(tree).lstrip("/")) == describe_tree(tree)
    report = json.loads(ok(kw(repo, "check", "--read-data", "--json")))
    assert report["errors"] == [] and report["blobs_checked"] > 0


def test_append_key_reads_and_deletes_nothing(repo: Path, tree: Path, tmp_path: Path) -> None:
    snap = _backup(repo, str(tree))  # a full key's snapshot
    _backup(repo, str(tree), append=True)
    sid = snap["id"][:8]
    target = str(tmp_path / "out")
    for args, command in [
        (("restore", sid, "--target", target), "restore"),
        (("ls", sid), "ls"),
        (("dump", sid, f"{tree}/docs/a.txt"), "dump"),
        (("find", "a.txt"), "find"),
        (("log", f"{tree}/docs/a.txt"), "log"),
        (("snapshots",), "snapshots"),
        (("diff", sid, "latest"), "diff"),
        (("stats",), "stats"),
        (("forget", sid), "forget"),
        (("forget", "--keep-last", "1"), "forget"),
        (("prune",), "prune"),
        (("check",), "check"),
        (("check", "--read-data"), "check"),
        (("tag", "--add", "x", sid), "tag"),
        (("unlock",), "unlock"),
        (("key", "add"), "key add"),
        (("key", "remove", "abcd"), "key remove"),
    ]:
        _refused(_as_append(repo, *args), command)
    assert not os.path.exists(target)
    # nothing was forgotten: the full key still sees both snapshots
    assert len(json.loads(ok(kw(repo, "snapshots", "--json")))) == 2


def test_dedup_across_roles(repo: Path, tree: Path, tmp_path: Path) -> None:
    _backup(repo, str(tree))
    # the same file under another name and directory, backed up by the append key
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(tree / "big.bin", other / "copy.bin")
    snap = _backup(repo, str(other), append=True)
    summary = snap["summary"]
    assert summary["bytes_processed"] == 3 << 20
    # the data is known: only the new trees are added (a few hundred bytes)
    assert summary["bytes_added"] < 4096, summary
    # and the other way round: what the append key stored, a full key does not store again
    fresh = tmp_path / "fresh"
    _files(fresh, {"new.bin": os.urandom(2 << 20)})
    _backup(repo, str(fresh), append=True)
    shutil.copytree(fresh, tmp_path / "fresh2")
    assert _backup(repo, str(tmp_path / "fresh2"))["summary"]["bytes_added"] < 4096


def test_prune_with_a_full_key_repacks_append_written_data(repo: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _files(src, {f"f{i}": os.urandom(700 << 10) for i in range(4)})
    first = _backup(repo, str(src), append=True)
    (src / "f0").unlink()
    (src / "f1").unlink()
    _backup(repo, str(src), append=True)
    ok(kw(repo, "forget", first["id"][:8]))
    ok(kw(repo, "prune", "--max-unused", "0", "--grace", "0s", "--wait"))
    ok(kw(repo, "prune", "--grace", "0s"))
    report = json.loads(ok(kw(repo, "check", "--read-data", "--json")))
    assert report["errors"] == [], report
    target = tmp_path / "out"
    ok(kw(repo, "restore", "latest", "--target", str(target)))
    assert describe_tree(target / str(src).lstrip("/")) == describe_tree(src)
    # more backups by the append key after the prune still dedup against the repacked data
    assert _backup(repo, str(src), append=True)["summary"]["bytes_added"] < 4096


def _data_packs(repo: Path) -> list[Path]:
    return sorted(p for p in (repo / "data").rglob("*") if p.is_file())


def test_check_finds_a_damaged_append_written_pack(repo: Path, tree: Path) -> None:
    _backup(repo, str(tree), append=True)
    assert json.loads(ok(kw(repo, "check", "--read-data", "--json")))["errors"] == []
    pack = _data_packs(repo)[0]
    data = bytearray(pack.read_bytes())
    data[100] ^= 0x01  # inside the first blob's ciphertext
    os.chmod(pack, 0o600)
    pack.write_bytes(bytes(data))
    r = kw(repo, "check", "--read-data", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    errors = json.loads(r.stdout)["errors"]
    assert any("failed authentication" in e for e in errors), errors
    assert any("does not match its name" in e for e in errors), errors


def test_snapshot_from_an_append_key_is_marked_as_such(repo: Path, tree: Path) -> None:
    _backup(repo, str(tree))
    _backup(repo, str(tree), append=True)
    listed = json.loads(ok(kw(repo, "snapshots", "--json")))
    assert [s.get("written_by") for s in listed] == ["full", "append"]


def test_old_repository_opens_restores_and_refuses_append_keys(tmp_path: Path) -> None:
    repo = copy_repository(tmp_path)
    env = {"KEEPWELL_PASSWORD": PASSWORD}
    files = next(s for s in MANIFEST["snapshots"] if s["kind"] == "files")
    target = tmp_path / "out"
    ok(kw(repo, "restore", files["id"][:8], "--target", str(target), env=env))
    assert any(target.rglob("*"))
    r = kw(repo, "key", "add", "--role", "append", env={**env, "KEEPWELL_NEW_PASSWORD": "x"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "cannot have append keys" in r.stderr and "init --append-keys" in r.stderr


def _many(root: Path, count: int) -> None:
    _files(root, {f"d{i % 7}/f{i}": os.urandom(100 + i) for i in range(count)})


def _own_cache(repo: Path) -> Path:
    (found,) = (repo.parent / "cache" / "append").glob("*/*")
    return found


def test_append_key_backups_are_incremental(repo: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _many(src, 120)
    first = _backup(repo, str(src), append=True)
    assert first["parent"] is None and first["summary"]["files_new"] == 120
    second = _backup(repo, str(src), append=True)
    assert second["parent"] == first["id"]
    s = second["summary"]
    assert (s["files_unmodified"], s["files_new"], s["files_changed"]) == (120, 0, 0), s
    (src / "d1" / "f1").write_bytes(b"changed")
    _files(src, {"d2/new": b"new file"})
    third = _backup(repo, str(src), append=True)
    s = third["summary"]
    assert (s["files_unmodified"], s["files_new"], s["files_changed"]) == (119, 1, 1), s
    target = tmp_path / "out"
    ok(kw(repo, "restore", third["id"][:8], "--target", str(target)))
    assert describe_tree(target / str(src).lstrip("/")) == describe_tree(src)
    # what it keeps is the plaintext of its own trees: readable by its owner only
    cache = _own_cache(repo)
    kept = [p for p in cache.rglob("*") if p.is_file()]
    assert kept and all(p.stat().st_mode & 0o777 == 0o600 for p in kept)
    assert all(p.stat().st_mode & 0o777 == 0o700 for p in [cache, cache / "trees"])


@pytest.mark.parametrize("lose", ["cache", "snapshot"])
def test_append_key_without_its_cache_reads_everything(repo: Path, tmp_path: Path, lose: str) -> None:
    src = tmp_path / "src"
    _many(src, 60)
    first = _backup(repo, str(src), append=True)
    if lose == "cache":
        shutil.rmtree(repo.parent / "cache")
    else:  # its snapshot is forgotten: the cache no longer matches the repository
        ok(kw(repo, "forget", first["id"][:8]))
    (src / "d3" / "f3").write_bytes(b"changed")
    r = _as_append(repo, "backup", "--json", str(src))
    snap = json.loads(ok(r))["snapshot"]
    assert "every file is read" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert snap["parent"] is None and snap["summary"]["files_new"] == 60, snap["summary"]
    target = tmp_path / "out"
    ok(kw(repo, "restore", snap["id"][:8], "--target", str(target)))
    assert describe_tree(target / str(src).lstrip("/")) == describe_tree(src)
    # and the next one is incremental again
    assert _backup(repo, str(src), append=True)["summary"]["files_unmodified"] == 60
