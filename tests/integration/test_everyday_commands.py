"""The everyday commands restic users reach for: ``find``, ``tag``, ``rewrite``, ``check
--read-data-subset`` and ``dump`` of a directory.

``find`` lists, per snapshot, the paths a pattern ends at, with sizes and times; ``tag`` and
``rewrite`` replace a snapshot by a new one (original time and id kept), the old one removed only
after the new one is stored: a failed store leaves the old one, a kill between the two leaves
both; ``rewrite --forget`` and ``prune`` take a secret's data out of the repository while a file
another snapshot shares stays; ``check --read-data-subset`` reads n/m groups that add up to
every pack; a directory dumps as a tar or zip archive whose names never escape. The real ``keepwell`` command runs in a subprocess against a real
local repository.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from keepwell.backends.local import LocalBackend
from keepwell.repository import Repository
from keepwell.repository.tree import DIR, FILE, Node
from tests.fault.cli import KW, PASSWORD, kw, ok
from tests.integration.snapshot_edit_faults import hook_env

DAY = 86400


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    location = tmp_path / "repo"
    ok(kw(location, "init"))
    return location


def _tree(root: Path, files: dict[str, bytes], mtime: float | None = None) -> None:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        if mtime is not None:
            os.utime(p, (mtime, mtime))


def _snapshots(repo: Path) -> list[dict[str, Any]]:
    return list(json.loads(ok(kw(repo, "snapshots", "--json"))))


def _backup(repo: Path, *args: str) -> dict[str, Any]:
    return dict(json.loads(ok(kw(repo, "backup", "--json", *args)))["snapshot"])


def _usage(r: Any, words: str) -> None:
    """One clear line on stderr, exit code 2, no traceback."""
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- find ------------------------------------------------------------------------------------------
@pytest.fixture
def two_hosts(repo: Path, tmp_path: Path) -> dict[str, Any]:
    data = tmp_path / "data"
    _tree(data, {"docs/report.txt": b"r" * 1000, "docs/Notes.TXT": b"n", "src/main.py": b"p"},
          mtime=1_700_000_000)
    first = _backup(repo, str(data), "--host", "alpha")
    _tree(data, {"docs/later.txt": b"l" * 10}, mtime=1_700_000_000 + 30 * DAY)
    second = _backup(repo, str(data), "--host", "beta")
    return {"data": data, "first": first, "second": second}


def test_find_lists_each_snapshot_with_its_matches(repo: Path, two_hosts: dict[str, Any]) -> None:
    data = two_hosts["data"]
    out = json.loads(ok(kw(repo, "find", "*.txt", "--json")))
    assert [s["snapshot"] for s in out] == [two_hosts["first"]["id"], two_hosts["second"]["id"]]
    assert [m["path"] for m in out[0]["matches"]] == [f"{data}/docs/report.txt"]
    assert [m["path"] for m in out[1]["matches"]] == [f"{data}/docs/later.txt",
                                                     f"{data}/docs/report.txt"]
    report = out[0]["matches"][0]
    assert report["size"] == 1000 and report["type"] == "file" and out[0]["hits"] == 1
    assert report["mtime"].startswith("2023-11-14T22:13:20")
    text = ok(kw(repo, "find", "report.txt"))
    assert f"Found matching entries in snapshot {two_hosts['first']['short_id']}" in text
    assert "1000 B  " in text and f"{data}/docs/report.txt" in text


def test_find_patterns_end_at_the_path_they_match(repo: Path, two_hosts: dict[str, Any]) -> None:
    data = two_hosts["data"]
    snap = ["--snapshot", two_hosts["first"]["id"][:8]]
    paths = [m["path"] for s in json.loads(ok(kw(repo, "find", f"{data}/docs", "--json", *snap)))
             for m in s["matches"]]
    assert paths == [f"{data}/docs"]  # the directory, not what it holds
    paths = [m["path"] for s in json.loads(ok(kw(repo, "find", "docs/*", "--json", *snap)))
             for m in s["matches"]]
    assert sorted(paths) == [f"{data}/docs/Notes.TXT", f"{data}/docs/report.txt"]
    insensitive = json.loads(ok(kw(repo, "find", "-i", "notes.txt", "--json", *snap)))
    assert [m["path"] for m in insensitive[0]["matches"]] == [f"{data}/docs/Notes.TXT"]
    assert json.loads(ok(kw(repo, "find", "notes.txt", "--json", *snap))) == []


def test_find_selects_snapshots_and_times(repo: Path, two_hosts: dict[str, Any]) -> None:
    out = json.loads(ok(kw(repo, "find", "*.txt", "--host", "beta", "--json")))
    assert [s["snapshot"] for s in out] == [two_hosts["second"]["id"]]
    out = json.loads(ok(kw(repo, "find", "*.txt", "--json", "--oldest", "2023-12-01")))
    assert [[m["path"].rsplit("/", 1)[1] for m in s["matches"]] for s in out] == [["later.txt"]]
    out = json.loads(ok(kw(repo, "find", "*.txt", "--json", "--newest", "2023-11-20 12:00")))
    assert [[m["path"].rsplit("/", 1)[1] for m in s["matches"]] for s in out] == [
        ["report.txt"], ["report.txt"]]


def test_find_refuses_bad_input_in_one_line(repo: Path, two_hosts: dict[str, Any]) -> None:
    _usage(kw(repo, "find", "x", "--oldest", "soon"), "--oldest: expected a time")
    _usage(kw(repo, "find", "x", "--oldest", "6m"), "ambiguous")
    _usage(kw(repo, "find", "x", "--oldest", "2024-01-02", "--newest", "2024-01-01"), "after")
    _usage(kw(repo, "find", "x", "--snapshot", "nothex"), "is not a snapshot id")
    assert kw(repo, "find").returncode == 2


# -- tag -------------------------------------------------------------------------------------------
@pytest.fixture
def one_snapshot(repo: Path, tmp_path: Path) -> dict[str, Any]:
    _tree(tmp_path / "data", {"f": b"hello"})
    return _backup(repo, str(tmp_path / "data"), "--tag", "daily")


def test_tag_replaces_the_snapshot_keeping_time_and_original(
        repo: Path, one_snapshot: dict[str, Any]) -> None:
    old = one_snapshot
    out = json.loads(ok(kw(repo, "tag", "--add", "keep,audit", "--remove", "daily", "--json",
                           old["id"][:8])))
    [change] = out["changed"]
    assert change["old"] == old["id"] and change["tags"] == ["audit", "keep"]
    [now] = _snapshots(repo)
    assert now["id"] == change["new"] != old["id"]
    assert now["tags"] == ["audit", "keep"] and now["original"] == old["id"]
    assert now["time"] == old["time"] and now["tree"] == old["tree"]
    assert now["summary"] == old["summary"]
    ok(kw(repo, "tag", "--set", "only", "latest"))
    [again] = _snapshots(repo)
    assert again["tags"] == ["only"] and again["original"] == old["id"]  # the first id stays
    # a change that changes nothing writes nothing
    assert "modified tags on 0 snapshots" in ok(kw(repo, "tag", "--add", "only"))
    assert _snapshots(repo) == [again]
    ok(kw(repo, "tag", "--set", "", "--tag", "only"))
    assert _snapshots(repo)[0]["tags"] == []
    assert "no errors were found" in ok(kw(repo, "check"))


def test_tag_refuses_bad_input_in_one_line(repo: Path, one_snapshot: dict[str, Any]) -> None:
    _usage(kw(repo, "tag", "latest"), "nothing to do")
    _usage(kw(repo, "tag", "--set", "a", "--add", "b"), "--set replaces every tag")
    _usage(kw(repo, "tag", "--add", "a", "zz"), "is not a snapshot id")
    assert _snapshots(repo)[0]["id"] == one_snapshot["id"]


def test_tag_whose_new_snapshot_cannot_be_stored_keeps_the_old(
        repo: Path, one_snapshot: dict[str, Any]) -> None:
    r = kw(repo, "tag", "--add", "x", env=hook_env("fail_snapshot_writes"))
    assert r.returncode == 1 and "input/output error" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "internal error" not in r.stderr, r.stderr
    assert [s["id"] for s in _snapshots(repo)] == [one_snapshot["id"]]


def test_tag_killed_between_store_and_remove_leaves_both(
        repo: Path, one_snapshot: dict[str, Any]) -> None:
    r = kw(repo, "tag", "--add", "x", env=hook_env("die_on_snapshot_delete"))
    assert r.returncode == 137, r.stderr
    snaps = _snapshots(repo)
    assert len(snaps) == 2
    new = next(s for s in snaps if s["id"] != one_snapshot["id"])
    assert new["original"] == one_snapshot["id"] and new["tags"] == ["daily", "x"]
    ok(kw(repo, "unlock"))  # the killed run's session
    assert "no errors were found" in ok(kw(repo, "check", "--read-data"))


# -- rewrite ---------------------------------------------------------------------------------------
def _blobs_of(repo: Path, snapshot_id: str, path: str) -> list[bytes]:
    with Repository.open(LocalBackend(str(repo)), PASSWORD) as r:
        return list(r.find_node(r.load_snapshot(snapshot_id), path).content)


def _indexed(repo: Path, blobs: list[bytes]) -> list[bool]:
    with Repository.open(LocalBackend(str(repo)), PASSWORD) as r:
        return [r.index.lookup(b) is not None for b in blobs]


def test_rewrite_forget_and_prune_remove_a_secret(repo: Path, tmp_path: Path) -> None:
    data, other = tmp_path / "data", tmp_path / "other"
    secret, shared = os.urandom(300_000), os.urandom(200_000)
    _tree(data, {"app/config": b"ok", "app/.env": secret, "app/shared.bin": shared})
    _tree(other, {"shared.bin": shared})
    first = _backup(repo, str(data), "--tag", "daily")
    kept = _backup(repo, str(other))
    secret_blobs = _blobs_of(repo, first["id"], f"{data}/app/.env")
    shared_blobs = _blobs_of(repo, first["id"], f"{data}/app/shared.bin")

    preview = json.loads(ok(kw(repo, "rewrite", "-e", ".env", "-e", "shared.bin", "--dry-run",
                               "--json", "--path", str(data))))
    assert preview["rewritten"][0]["files_removed"] == 2 and len(_snapshots(repo)) == 2
    kept_only = json.loads(ok(kw(repo, "rewrite", "-e", ".env", "--json")))  # originals stay
    [row] = kept_only["rewritten"]
    assert row["removed"] == [f"{data}/app/.env"] and row["bytes_removed"] == len(secret)
    assert row["old"] == first["id"] and not row["forgotten"] and kept_only["unchanged"] == 1
    snaps = {s["id"]: s for s in _snapshots(repo)}
    assert set(snaps) == {first["id"], kept["id"], row["new"]}
    new = snaps[row["new"]]
    assert new["tags"] == ["daily", "rewrite"] and new["original"] == first["id"]
    assert new["time"] == first["time"]

    ok(kw(repo, "forget", first["id"]))
    ok(kw(repo, "prune", "--max-unused", "0%", "--grace", "0", "--wait"))
    assert _indexed(repo, secret_blobs) == [False] * len(secret_blobs)
    assert all(_indexed(repo, shared_blobs))  # still used by two snapshots
    assert "no errors were found" in ok(kw(repo, "check", "--read-data"))
    target = tmp_path / "restored"
    ok(kw(repo, "restore", row["new"][:8], "--target", str(target)))
    assert not (target / str(data).lstrip("/") / "app/.env").exists()
    assert (target / str(data).lstrip("/") / "app/shared.bin").read_bytes() == shared


def test_rewrite_with_forget_removes_the_original(repo: Path, tmp_path: Path) -> None:
    _tree(tmp_path / "data", {"a/secret.key": b"k" * 100, "a/b": b"b"})
    first = _backup(repo, str(tmp_path / "data"))
    text = ok(kw(repo, "rewrite", "--iexclude", "SECRET.KEY", "--forget", "latest"))
    assert f"removed {tmp_path}/data/a/secret.key" in text and "original forgotten" in text
    [now] = _snapshots(repo)
    assert now["original"] == first["id"] and now["summary"]["rewritten"]["files_removed"] == 1
    assert "rewrote 0 of 1" in ok(kw(repo, "rewrite", "-e", "secret.key"))
    _usage(kw(repo, "rewrite", "latest"), "nothing to remove")


# -- check --read-data-subset ----------------------------------------------------------------------
def test_check_read_data_subset_forms(repo: Path, tmp_path: Path) -> None:
    for i in range(6):  # several packs: one backup each
        _tree(tmp_path / f"d{i}", {"f": os.urandom(50_000)})
        _backup(repo, str(tmp_path / f"d{i}"))

    def packs_read(*args: str) -> int:
        return int(json.loads(ok(kw(repo, "check", "--json", *args)))["packs_read"])

    everything = packs_read("--read-data")
    assert everything >= 6
    groups = [packs_read("--read-data-subset", f"{n}/3") for n in (1, 2, 3)]
    assert sum(groups) == everything
    assert packs_read("--read-data-subset", "2/3") == groups[1]  # the same packs every time
    assert packs_read("--read-data-subset", "100%") == everything
    assert packs_read("--read-data-subset", "1G") == everything
    assert 1 <= packs_read("--read-data-subset", "1K") < everything
    assert "no errors were found (" in ok(kw(repo, "check", "--read-data-subset", "50%"))
    _usage(kw(repo, "check", "--read-data-subset", "150%"), "at most 100%")
    _usage(kw(repo, "check", "--read-data-subset", "0%"), "above 0%")
    _usage(kw(repo, "check", "--read-data-subset", "4/3"), "1 <= n <= m")
    _usage(kw(repo, "check", "--read-data-subset", "lots"), "expected n/m")


# -- dump of a directory ---------------------------------------------------------------------------
def _dump(repo: Path, *args: str) -> bytes:
    proc = subprocess.run([*KW, "dump", *args], capture_output=True, timeout=120,
                          env={**os.environ, "KEEPWELL_PASSWORD": PASSWORD,
                               "KEEPWELL_REPOSITORY": str(repo), "KEEPWELL_TESTONLY_WEAK_KDF": "1"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_dump_of_a_directory_is_a_tar_or_zip_archive(repo: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    big = os.urandom(3_000_000)
    _tree(data, {"a.txt": b"hello", "sub/big.bin": big}, mtime=1_700_000_000)
    (data / "sub/big.bin").chmod(0o600)
    (data / "link").symlink_to("a.txt")
    ok(kw(repo, "backup", str(data)))
    with tarfile.open(fileobj=io.BytesIO(_dump(repo, "latest", str(data))), mode="r:") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"data", "data/a.txt", "data/link", "data/sub", "data/sub/big.bin"}
        assert tar.extractfile("data/sub/big.bin").read() == big  # type: ignore[union-attr]
        assert members["data/sub/big.bin"].mode == 0o600 and members["data"].isdir()
        assert members["data/a.txt"].mtime == 1_700_000_000
        assert members["data/link"].issym() and members["data/link"].linkname == "a.txt"
    with zipfile.ZipFile(io.BytesIO(_dump(repo, "latest", f"{data}/sub", "--archive", "zip"))) as z:
        assert z.namelist() == ["sub/", "sub/big.bin"] and z.read("sub/big.bin") == big
        assert z.getinfo("sub/big.bin").external_attr >> 16 == stat.S_IFREG | 0o600
    root = tarfile.open(fileobj=io.BytesIO(_dump(repo, "latest", "/")), mode="r:").getnames()
    assert root[0] == str(data).strip("/").split("/")[0] and not any(
        n.startswith("/") or ".." in n.split("/") for n in root)
    assert _dump(repo, "latest", f"{data}/a.txt") == b"hello"  # a file: its bytes, as before
    _usage(kw(repo, "dump", "latest", str(data), "--archive", "rar"), "give one of tar, zip")


def test_dump_of_names_that_are_not_utf8(repo: Path, tmp_path: Path) -> None:
    """Linux file names are bytes: both archives hold them as they are (a zip without its UTF-8
    flag on such a name, as Info-ZIP and restic write them), as a restore gives them back."""
    data = tmp_path / "data"
    raw = b"caf\xe9.txt"  # Latin-1, not UTF-8
    (data / "sub").mkdir(parents=True)
    (data / "sub" / os.fsdecode(raw)).write_bytes(b"latin")
    (data / "sub" / "ok.txt").write_bytes(b"fine")
    ok(kw(repo, "backup", str(data)))
    with tarfile.open(fileobj=io.BytesIO(_dump(repo, "latest", str(data))), mode="r:",
                      encoding="utf-8", errors="surrogateescape") as tar:
        assert tar.extractfile("data/sub/" + os.fsdecode(raw)).read() == b"latin"  # type: ignore[union-attr]
    with zipfile.ZipFile(io.BytesIO(_dump(repo, "latest", str(data), "--archive", "zip"))) as z:
        # zipfile reads a name without the UTF-8 flag as CP437
        names = {i.filename.encode("cp437") if not i.flag_bits & 0x800 else i.filename.encode()
                 for i in z.infolist()}
        assert names == {b"data/", b"data/sub/", b"data/sub/" + raw, b"data/sub/ok.txt"}
        assert z.read("data/sub/ok.txt") == b"fine"
        assert z.read("data/sub/" + raw.decode("cp437")) == b"latin"


def test_dump_refuses_a_name_that_would_escape(repo: Path) -> None:
    # a forged tree: the writer's paths refuse '..', so the directory's nodes are made by hand
    with Repository.open(LocalBackend(str(repo)), PASSWORD) as r, \
            r.new_snapshot("files", ["/d"]) as w:
        nodes = []
        for name, data in (("ok", b"fine"), ("..", b"escape")):
            ids, size = w.save_content(io.BytesIO(data))
            nodes.append(Node(name=name, type=FILE, mode=0o644, size=size, content=ids,
                              mtime_ns=2_000_000_000))
        w.add_node("d", Node(name="d", type=DIR, mode=0o755, subtree=w.save_tree(nodes),
                             mtime_ns=2_000_000_000))
        w.commit()
    r2 = kw(repo, "dump", "latest", "/d")
    assert r2.returncode == 1 and "'..'" in r2.stderr and r2.stderr.count("\n") == 1, r2.stderr
