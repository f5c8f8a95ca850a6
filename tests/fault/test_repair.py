"""Damaged data heals instead of spreading: what ``check --read-data`` finds damaged is recorded
and no backup deduplicates against it, and the ``repair`` commands (index, packs, snapshots,
--from-repo) bring a damaged repository back to one that ``check --read-data`` passes.

Every command runs as a real ``keepwell`` process on a local repository.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fault.cli import kw, ok


def objects(repo: Path, prefix: str) -> list[Path]:
    root = repo / prefix
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def flip(path: Path, at: float = 0.3) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


def same_tree(a: Path, b: Path) -> bool:
    return subprocess.run(["diff", "-r", str(a), str(b)], capture_output=True).returncode == 0


@pytest.fixture
def src(tmp_path: Path) -> Path:
    rng = random.Random(5)
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "one").write_bytes(rng.randbytes(2_000_000))  # two or more chunks
    (root / "sub" / "two").write_bytes(rng.randbytes(200_000))
    (root / "three").write_bytes(b"small\n")
    return root


def backup(repo: Path, src: Path) -> str:
    return json.loads(ok(kw(repo, "backup", str(src), "--json")))["snapshot"]["id"]


def restored(repo: Path, snap: str, target: Path, src: Path) -> Path:
    ok(kw(repo, "restore", snap, "--target", str(target)))
    return target / str(src).lstrip("/")


def test_a_backup_after_check_stores_damaged_data_again(tmp_path: Path, src: Path) -> None:
    """One flipped byte in a pack: once check --read-data has seen it, the next backup of the
    same file stores the damaged chunk again instead of reusing it, and restores are exact."""
    repo = tmp_path / "repo"
    ok(kw(repo, "init"))
    first = backup(repo, src)
    (pack,) = objects(repo, "data")
    flip(pack)
    checked = kw(repo, "check", "--read-data")
    assert checked.returncode == 1 and "recorded in damaged/" in checked.stdout
    second = backup(repo, src)
    assert same_tree(restored(repo, second, tmp_path / "out2", src), src)
    # the older snapshot references the same chunk: it is whole again too
    assert same_tree(restored(repo, first, tmp_path / "out1", src), src)
    # left: the damaged pack itself, which repair packs takes out of the index
    ok(kw(repo, "repair", "packs"))
    ok(kw(repo, "prune", "--grace", "0"))
    assert "no errors were found" in ok(kw(repo, "check", "--read-data"))


def test_repair_packs_salvages_intact_blobs_and_dry_run_writes_nothing(tmp_path: Path,
                                                                     src: Path) -> None:
    repo = tmp_path / "repo"
    ok(kw(repo, "init"))
    backup(repo, src)
    (pack,) = objects(repo, "data")
    flip(pack, 0.9)  # past the large file's chunks: only one small blob is hit
    before = {p: p.stat().st_mtime_ns for p in repo.rglob("*") if p.is_file()}
    dry = json.loads(ok(kw(repo, "repair", "packs", "--dry-run", "--json")))
    assert dry["packs_damaged"] == [str(pack.relative_to(repo))]
    assert {p: p.stat().st_mtime_ns for p in repo.rglob("*") if p.is_file()} == before
    rep = json.loads(ok(kw(repo, "repair", "packs", "--json")))
    assert rep["blobs_damaged"] == 1 and rep["blobs_salvaged"] >= 2 and rep["packs_written"] == 1
    assert rep["pending_record"] and rep["damage_record"]
    # the salvaged blobs are served from the new pack; what was lost is named
    checked = kw(repo, "check", "--read-data")
    assert checked.returncode == 1 and "1 damaged or missing file(s)" in checked.stdout
    ok(kw(repo, "backup", str(src)))
    assert "no errors were found" in ok(kw(repo, "check", "--read-data"))
    # nothing left to repair
    assert "no damaged pack found" in ok(kw(repo, "repair", "packs"))


def test_repair_packs_of_a_missing_pack_named_by_id(tmp_path: Path, src: Path) -> None:
    repo = tmp_path / "repo"
    ok(kw(repo, "init"))
    backup(repo, src)
    (pack,) = objects(repo, "data")
    pack.unlink()
    rep = json.loads(ok(kw(repo, "repair", "packs", pack.name[:10], "--json")))
    assert rep["packs_missing"] == [str(pack.relative_to(repo))]
    assert "missing from storage" not in kw(repo, "check").stdout
    wrong = kw(repo, "repair", "packs", "ffffffffff")
    assert wrong.returncode == 2 and "names 0 pack(s)" in wrong.stderr


def test_repair_index_rebuilds_a_lost_or_damaged_index(tmp_path: Path, src: Path) -> None:
    repo = tmp_path / "repo"
    ok(kw(repo, "init"))
    snap = backup(repo, src)
    (src / "four").write_bytes(b"four\n")
    backup(repo, src)
    index = objects(repo, "index")
    assert len(index) == 2
    index[0].unlink()
    flip(index[1])
    failed = kw(repo, "restore", snap, "--target", str(tmp_path / "nothing"))
    assert failed.returncode == 1 and "keepwell repair index" in failed.stderr
    rep = json.loads(ok(kw(repo, "repair", "index", "--json")))
    assert rep["index_damaged"] == [str(index[1].relative_to(repo))]
    assert len(rep["packs_added"]) == rep["packs"] >= 2 and rep["index_written"]
    assert [p.name for p in objects(repo, "index")] == [rep["index_written"]]
    assert "no errors were found" in ok(kw(repo, "check", "--read-data"))
    out = restored(repo, snap, tmp_path / "out", src)
    assert (out / "one").read_bytes() == (src / "one").read_bytes()
    assert "nothing to do" in ok(kw(repo, "repair", "index"))


def test_repair_snapshots_removes_lost_files_and_marks_the_snapshot(tmp_path: Path,
                                                                     src: Path) -> None:
    repo = tmp_path / "repo"
    ok(kw(repo, "init"))
    snap = backup(repo, src)
    (pack,) = objects(repo, "data")
    flip(pack, 0.9)
    ok(kw(repo, "repair", "packs"))
    dry = json.loads(ok(kw(repo, "repair", "snapshots", "--dry-run", "--json")))
    (entry,) = dry["snapshots"]
    lost = entry["removed"]
    assert entry["id"] == snap and len(lost) == 1 and not entry["forgotten"]
    kept = json.loads(ok(kw(repo, "repair", "snapshots", "--keep-originals", "--json")))
    assert kept["snapshots"][0]["repaired"] and not kept["snapshots"][0]["forgotten"]
    snaps = {s["id"]: s for s in json.loads(ok(kw(repo, "snapshots", "--json")))}
    assert len(snaps) == 2
    new = snaps[kept["snapshots"][0]["repaired"]]
    assert "repaired" in new["tags"] and new["summary"]["repaired"]["from"] == snap
    assert new["summary"]["repaired"]["paths"] == lost and new["time"] == snaps[snap]["time"]
    # the repaired snapshot restores, without the lost file and with everything else exact
    out = restored(repo, new["id"], tmp_path / "out", src)
    assert not (out / lost[0].split(str(src) + "/", 1)[1]).exists()
    for p in src.rglob("*"):
        if p.is_file() and str(p) != lost[0]:
            assert (out / p.relative_to(src)).read_bytes() == p.read_bytes()
    # without --keep-originals, the damaged original goes
    final = json.loads(ok(kw(repo, "repair", "snapshots", "--json")))
    assert [s["forgotten"] for s in final["snapshots"]] == [True]
    assert "no errors were found" in ok(kw(repo, "check", "--read-data"))


@pytest.fixture
def with_replica(tmp_path: Path, src: Path) -> tuple[Path, Path]:
    repo, replica = tmp_path / "repo", tmp_path / "replica"
    ok(kw(repo, "init"))
    backup(repo, src)
    ok(kw(replica, "init", "--copy-chunker-params-from", str(repo)))
    ok(kw(replica, "copy", "--from-repo", str(repo)))
    return repo, replica


def test_repair_from_a_replica_takes_good_copies(tmp_path: Path, src: Path,
                                                 with_replica: tuple[Path, Path]) -> None:
    repo, replica = with_replica
    for pack in objects(repo, "data") + objects(repo, "tree"):
        flip(pack)
    assert kw(repo, "check", "--read-data").returncode == 1
    dry = json.loads(ok(kw(repo, "repair", "--from-repo", str(replica), "--dry-run", "--json")))
    assert dry["blobs_taken"] == dry["blobs_lost"] > 0 and not dry["blobs_unavailable"]
    rep = json.loads(ok(kw(repo, "repair", "--from-repo", str(replica), "--json")))
    assert rep["blobs_taken"] == dry["blobs_lost"] and rep["packs_written"] >= 1
    ok(kw(repo, "repair", "packs"))  # the damaged packs leave the index
    assert "no errors were found" in ok(kw(repo, "check", "--read-data"))
    snap = json.loads(ok(kw(repo, "snapshots", "--json")))[0]["id"]
    assert same_tree(restored(repo, snap, tmp_path / "out", src), src)


def test_repair_from_a_replica_that_lacks_the_data(tmp_path: Path, src: Path,
                                                   with_replica: tuple[Path, Path]) -> None:
    repo, replica = with_replica
    shutil.rmtree(replica / "data")
    for pack in objects(repo, "data"):
        pack.unlink()
    ok(kw(repo, "repair", "index"))
    partial = kw(repo, "repair", "--from-repo", str(replica))
    assert partial.returncode == 3 and "not in the replica either" in partial.stderr


def test_repair_from_a_repository_without_shared_ids_is_refused(tmp_path: Path, src: Path) -> None:
    repo, other = tmp_path / "repo", tmp_path / "other"
    ok(kw(repo, "init"))
    ok(kw(other, "init"))
    refused = kw(repo, "repair", "--from-repo", str(other))
    assert refused.returncode == 2 and "does not share blob ids" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1
    usage = kw(repo, "repair")
    assert usage.returncode == 2 and "index, packs, snapshots, or --from-repo" in usage.stderr


def test_copy_never_carries_damage_to_the_replica(tmp_path: Path, src: Path) -> None:
    repo, replica = tmp_path / "repo", tmp_path / "replica"
    ok(kw(repo, "init"))
    backup(repo, src)
    ok(kw(replica, "init", "--copy-chunker-params-from", str(repo)))
    (pack,) = objects(repo, "data")
    flip(pack)
    failed = kw(replica, "copy", "--from-repo", str(repo))
    assert failed.returncode == 1 and "failed authentication" in failed.stderr
    assert f"in {repo}" in failed.stderr and len(failed.stderr.splitlines()) == 1
    assert kw(replica, "snapshots", "--json").stdout.strip() == "[]"
    assert "no errors were found" in ok(kw(replica, "check", "--read-data"))
