"""What a repository does when a snapshot cannot be restored.

A damaged object in ``snapshots/`` is skipped with a warning that names it: backups, restores of
other snapshots and listings go on; ``forget`` removes it by its id (the object's name, which
stays readable); ``check`` fails naming it; ``prune`` refuses (it cannot know what that snapshot
needs) and says what to do. ``check`` fails whenever a snapshot would not restore, whatever the
cause: here, index objects that were lost (the packs are there, but nothing locates them)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from tests.fault.support import (
    PASSWORD,
    Manifest,
    assert_one_line_error,
    audit,
    kw,
    kw_env,
    manifest,
)


def _repo_with_snapshots(tmp_path: Path, count: int) -> tuple[dict[str, str], Path, dict[str, Manifest]]:
    rng = random.Random(count)
    src = tmp_path / "src"
    env = kw_env(tmp_path / "repo")
    kw(env, "init")
    made: dict[str, Manifest] = {}
    for i in range(count):
        for j in range(4):
            p = src / f"d{j}" / f"f{i}"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(rng.randbytes(rng.randint(1_000, 400_000)))
        r = kw(env, "backup", "--json", str(src))
        made[json.loads(r.stdout)["snapshot"]["id"]] = manifest(src)
    return env, src, made


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":
        path.write_bytes(data[:40] + bytes([data[40] ^ 0x10]) + data[41:])
    elif how == "truncate":
        path.write_bytes(data[:20])
    else:  # bytes of something else under this name
        path.write_bytes(b'{"tree": "00"}')


# Whole objects of the repository, written with its key (as a host holding an append key can
# write any JSON), that are not snapshots: JSON that does not decode, or a snapshot's fields of
# the wrong kind (a time without a time zone, a tree that is no id, a host, kind, tag or path
# that is not text)
_UNDECODABLE = {
    "undecodable": {"time": "yesterday"},
    "naive-time": {"time": "2030-01-01T00:00:00", "tree": "00" * 32},
    "tree-not-hex": {"time": "2030-01-01T00:00:00+00:00", "tree": "zz"},
    "fields-not-text": {"time": "2030-01-01T00:00:00+00:00", "tree": "00" * 32, "host": 5,
                        "kind": None, "tags": [1], "paths": [2]},
}


def _undecodable(repo_path: Path, how: str) -> str:
    """A whole object of this repository, written with its key, that is not a snapshot."""
    from keepwell.repository import open_repository
    from keepwell.repository.format import KIND_SNAPSHOT

    with open_repository(str(repo_path), PASSWORD) as repo:
        return repo.put_object("snapshots", KIND_SNAPSHOT, json.dumps(_UNDECODABLE[how]).encode())


@pytest.mark.parametrize("how", ["flip", "truncate", "foreign", *_UNDECODABLE])
def test_a_damaged_snapshot_stops_nothing_but_prune(tmp_path: Path, how: str) -> None:
    env, src, made = _repo_with_snapshots(tmp_path, 3)
    if how in _UNDECODABLE:
        victim = _undecodable(tmp_path / "repo", how)
        made[victim] = {}
    else:
        victim = sorted(made)[1]
        _damage(tmp_path / "repo" / "snapshots" / victim, how)
    short = victim[:8]

    r = kw(env, "snapshots", "--json")
    assert {s["id"] for s in json.loads(r.stdout)} == set(made) - {victim}
    assert f"snapshots/{victim} is damaged" in r.stderr and "warning" in r.stderr

    r = kw(env, "backup", "--json", str(src))  # a damaged snapshot never stops a backup
    made[json.loads(r.stdout)["snapshot"]["id"]] = manifest(src)
    kw(env, "restore", "latest", "--target", str(tmp_path / "latest"))

    r = kw(env, "restore", short, "--target", str(tmp_path / "victim"), check=False)
    assert r.returncode == 1
    assert_one_line_error(r)
    assert f"keepwell forget {short}" in r.stderr

    r = kw(env, "check", check=False)
    assert r.returncode == 1 and f"error: snapshots/{victim} is damaged" in r.stdout, r.stdout

    r = kw(env, "prune", check=False)  # what the damaged snapshot needs is unknown
    assert r.returncode == 1
    assert_one_line_error(r)
    assert "changes nothing" in r.stderr and f"keepwell forget {short}" in r.stderr

    r = kw(env, "forget", short)  # a prefix of the object's name is enough
    assert f"remove {short}" in r.stdout
    del made[victim]
    kw(env, "prune", "--grace", "0", "--wait")
    found = audit(tmp_path / "repo", made, tmp_path / "out")
    assert found.ok and found.snapshots == len(made), found.errors


def test_check_fails_when_the_index_is_lost(tmp_path: Path) -> None:
    """Every index object deleted: the packs are whole, yet nothing can be restored, so check
    fails; prune indexes the packs again, and then check passes and restores work."""
    env, _src, made = _repo_with_snapshots(tmp_path, 2)
    index = tmp_path / "repo" / "index"
    shutil.rmtree(index)
    index.mkdir()
    r = kw(env, "check", "--read-data", check=False)
    assert r.returncode == 1, r.stdout
    assert "so a restore fails" in r.stdout and "run 'keepwell prune'" in r.stdout, r.stdout
    kw(env, "prune", "--grace", "0")
    r = kw(env, "check", "--read-data")
    assert "no errors were found" in r.stdout
    found = audit(tmp_path / "repo", made, tmp_path / "out")
    assert found.ok, found.errors


def test_check_fails_when_one_index_object_is_lost(tmp_path: Path) -> None:
    env, _src, _made = _repo_with_snapshots(tmp_path, 3)
    objects = sorted((tmp_path / "repo" / "index").iterdir(), key=lambda p: p.stat().st_mtime)
    objects[-1].unlink()  # the newest backup's: its new blobs are in no index now
    r = kw(env, "check", check=False)
    assert r.returncode == 1, r.stdout
    assert "no index lists" in r.stdout


def test_check_finds_a_truncated_pack_without_reading_data(tmp_path: Path) -> None:
    """A pack shorter than its index says fails the restores of the files in it (whose error
    says to run check): check finds it from the listing's sizes, without --read-data, and names
    the snapshots it damages."""
    env, _src, made = _repo_with_snapshots(tmp_path, 2)
    repo = tmp_path / "repo"
    # the first backup's: both snapshots hold its files
    victim = min((p for p in (repo / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    r = kw(env, "check", check=False)
    assert r.returncode == 1, r.stdout
    assert f"error: data/{victim.parent.name}/{victim.name}" in r.stdout, r.stdout
    assert "truncated" in r.stdout, r.stdout
    for sid in made:
        assert f"snapshot {sid[:8]}: " in r.stdout, r.stdout


def test_prune_never_indexes_a_damaged_pack_again(tmp_path: Path) -> None:
    """Packs outside the index are read whole before prune indexes them again: a damaged one
    stays out, so the next backup stores its data anew instead of reusing broken blobs."""
    env, src, _made = _repo_with_snapshots(tmp_path, 2)
    repo = tmp_path / "repo"
    shutil.rmtree(repo / "index")
    (repo / "index").mkdir()
    victim = max((p for p in (repo / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    _damage(victim, "flip")
    r = kw(env, "prune", "--grace", "0")
    assert f"data/{victim.parent.name}/{victim.name} is in no index" in r.stderr, r.stderr
    r = kw(env, "backup", "--json", str(src))
    assert json.loads(r.stdout)["snapshot"]["summary"]["blobs_new"] > 0
    out = tmp_path / "latest"
    kw(env, "restore", "latest", "--target", str(out))
    assert manifest(out / str(src).lstrip("/")) == manifest(src)
