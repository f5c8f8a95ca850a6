"""``backup --fs-snapshot``: the backup reads a filesystem snapshot and records the original
paths, and the snapshot is always removed.

Real btrfs filesystems on loop devices (tests.integration.fssnap_support), the real
``keepwell`` command in a subprocess. Proven here: the recorded paths are the original ones
(excludes match them, a restore gives them back); a pair of files that a writer keeps changing
together is saved as it was at one instant; paths on two filesystems get one snapshot each; the
snapshot is gone after a success, after a failed backup and after SIGTERM; one left by a killed
run (SIGKILL) is removed by the next run with a warning; a path that no method can snapshot is
one line and exit 2. LVM needs device-mapper, which this machine's kernel lacks: here it is
tested as far as that allows (refusing a volume that is not LVM, the pieces that need no
device); the rest runs in a VM (test_fs_snapshot_lvm.py, lvm_checks.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepwell.sources.files import fssnapshot
from keepwell.sources.files.fssnapshot import fs_snapshots
from tests.fault.cli import KW, PASSWORD, kw, ok
from tests.integration.fssnap_support import (
    PairWriter,
    backup_beside_a_writer,
    btrfs,
    ext4,
    held_backup,
    own_snapshots,
    pair,
    sh,
)
from tests.integration.snapshot_edit_faults import hook_env
from tests.waiting import wait_for


@pytest.fixture
def vol(tmp_path: Path) -> Iterator[Path]:
    with btrfs(tmp_path) as mnt:
        yield mnt


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    location = tmp_path / "repo"
    ok(kw(location, "init"))
    return location


def _paths(repo: Path) -> list[str]:
    return sorted(row["path"] for row in json.loads(ok(kw(repo, "ls", "--json", "latest"))))


def test_records_the_original_paths_and_removes_the_snapshot(vol: Path, repo: Path,
                                                             tmp_path: Path) -> None:
    (vol / "data" / "skip").mkdir(parents=True)
    (vol / "data" / "a.txt").write_text("A")
    (vol / "data" / "skip" / "x").write_text("X")
    (vol / "top.txt").write_text("T")
    out = json.loads(ok(kw(repo, "backup", "--json", "--fs-snapshot", "btrfs", "--exclude",
                           f"{vol}/data/skip", str(vol / "data"), str(vol / "top.txt"))))
    assert out["snapshot"]["paths"] == [str(vol / "data"), str(vol / "top.txt")]
    assert own_snapshots(vol) == []
    paths = _paths(repo)
    assert f"{vol}/data/a.txt" in paths and f"{vol}/top.txt" in paths
    assert not any("skip" in p or "keepwell-fssnap" in p for p in paths)
    ok(kw(repo, "restore", "latest", "--target", str(tmp_path / "r")))
    assert (tmp_path / "r" / str(vol).lstrip("/") / "data" / "a.txt").read_text() == "A"
    # a second run finds the first as its parent and reads no file again, though its snapshot
    # is another device (a subvolume made meanwhile took the device number the first one had)
    sh("btrfs", "subvolume", "create", str(vol / "other"))
    again = json.loads(ok(kw(repo, "backup", "--json", "--fs-snapshot", "auto", "--exclude",
                             f"{vol}/data/skip", str(vol / "data"), str(vol / "top.txt"))))
    summary = again["snapshot"]["summary"]
    assert summary["files_new"] == summary["files_changed"] == 0
    assert summary["files_unmodified"] == 2
    # and stores no tree again but those above the subvolume (its root's time changed when the
    # snapshot was made in it): the snapshot's device is recorded as the original's
    assert summary["blobs_known"] >= 1
    # the whole subvolume, snapshot root and all: recorded under its own name
    ok(kw(repo, "backup", "--fs-snapshot", "auto", str(vol)))
    assert f"{vol}/data/a.txt" in _paths(repo) and own_snapshots(vol) == []


def test_the_snapshot_holds_a_pair_from_one_instant(vol: Path) -> None:
    """The snapshot itself: taken while the writer runs, it keeps a consistent pair however
    long the writer goes on (waited for by its counter, not by time)."""
    data = vol / "data"
    data.mkdir()
    with PairWriter(data) as writer, fs_snapshots([str(data)], "btrfs", print) as reads:
        taken = writer.n
        writer.wait_past(taken + 200)
        a, b = pair(lambda name: Path(reads[str(data)], name).read_text())
        assert b <= a <= b + 1 and a <= taken + 1
        assert writer.n > a + 100  # the live files moved on; the snapshot did not
    assert own_snapshots(vol) == []


def test_a_backup_beside_a_writer_saves_a_consistent_pair(vol: Path, repo: Path) -> None:
    data = vol / "data"
    data.mkdir()
    backup_beside_a_writer(repo, data, "btrfs")
    assert own_snapshots(vol) == []


def test_the_snapshot_is_removed_after_a_failed_backup(vol: Path, repo: Path) -> None:
    (vol / "f").write_text("f")
    r = kw(repo, "backup", "--fs-snapshot", "btrfs", str(vol / "f"),
           env=hook_env("fail_snapshot_writes"))
    assert r.returncode == 1, r.stderr
    assert own_snapshots(vol) == []


def test_sigterm_removes_one_snapshot_per_filesystem(vol: Path, repo: Path, tmp_path: Path) -> None:
    (vol / "a").write_text("a")
    with btrfs(tmp_path / "second") as other:
        (other / "b").write_text("b")
        held = tmp_path / "held"
        proc = held_backup(repo, held, vol / "a", other / "b")
        try:
            wait_for(held.exists, "the backup to reach its snapshot write", 120)
            assert len(own_snapshots(vol)) == 1 and len(own_snapshots(other)) == 1
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 130, err  # as for Ctrl-C
        assert own_snapshots(vol) == [] and own_snapshots(other) == []


def test_a_snapshot_left_by_a_killed_run_is_removed_by_the_next(vol: Path, repo: Path,
                                                                tmp_path: Path) -> None:
    (vol / "a").write_text("a")
    held = tmp_path / "held"
    proc = held_backup(repo, held, vol / "a")
    try:
        wait_for(held.exists, "the backup to reach its snapshot write", 120)
    finally:
        proc.kill()
        proc.wait()
    [left] = own_snapshots(vol)
    # a snapshot of a process that still runs is left alone
    live = vol / f".{fssnapshot.PREFIX}{os.getpid()}-0123abcd"
    sh("btrfs", "subvolume", "snapshot", "-r", str(vol), str(live))
    r = kw(repo, "backup", "--fs-snapshot", "btrfs", str(vol / "a"))
    ok(r)
    assert f"keepwell: warning: removed btrfs snapshot {vol}/{left}, left behind by an earlier " \
           "backup that was killed" in r.stderr
    assert own_snapshots(vol) == [live.name]
    sh("btrfs", "subvolume", "delete", str(live))


def test_a_path_no_method_can_snapshot(tmp_path: Path, repo: Path, vol: Path) -> None:
    with ext4(tmp_path) as plain:
        (plain / "f").write_text("f")
        for method, words in (("auto", "neither a btrfs subvolume nor an LVM logical volume"),
                              ("lvm", "not on an LVM logical volume"),
                              ("btrfs", "is on ext2/3/4, not on btrfs")):
            r = kw(repo, "backup", "--fs-snapshot", method, str(plain / "f"))
            assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
            assert words in r.stderr and str(plain / "f") in r.stderr
        # nothing was taken on the btrfs path named beside it either
        r = kw(repo, "backup", "--fs-snapshot", "auto", str(vol), str(plain / "f"))
        assert r.returncode == 2 and own_snapshots(vol) == []
    r = kw(repo, "backup", "--fs-snapshot", "zfs", str(vol))
    assert r.returncode == 2 and "give one of btrfs, lvm, auto" in r.stderr
    r = subprocess.run(KW + ["backup", "--stdin", "--fs-snapshot", "auto"], input="x",
                       capture_output=True, text=True,
                       env={**os.environ, "KEEPWELL_PASSWORD": PASSWORD,
                            "KEEPWELL_REPOSITORY": str(repo), "KEEPWELL_TESTONLY_WEAK_KDF": "1"})
    assert r.returncode == 2 and "--fs-snapshot" in r.stderr


def test_lvm_pieces_that_need_no_device_mapper(tmp_path: Path) -> None:
    with ext4(tmp_path) as plain:
        m = fssnapshot.mount_of(str(plain))
        assert m is not None and m.point == str(plain) and m.fstype == "ext4"
        assert fssnapshot.dm_name(m.device) is None  # a loop device, not LVM
    lv = fssnapshot.parse_lvs("  vg0|home|-wi-ao----|10737418240|1073741824|4194304")
    assert (lv.vg, lv.lv, lv.thin) == ("vg0", "home", False)
    assert lv.snapshot_size() == 1073741824  # a fifth would be 2 GiB: the free space bounds it
    thin = fssnapshot.parse_lvs("vg0|data|Vwi-aotz--|1073741824|0|4194304")
    assert thin.thin and thin.snapshot_size() is None
    assert fssnapshot.mount_options("xfs") == "ro,nouuid,norecovery"
    assert fssnapshot.mount_options("ext4") == "ro,noload"


def test_config_takes_fs_snapshot() -> None:
    from pydantic import ValidationError

    from keepwell.control.config import FilesSource

    src = FilesSource.model_validate({"kind": "files", "repository": "r", "paths": ["/srv"],
                                      "fs_snapshot": "auto"})
    assert src.model_dump(mode="json")["fs_snapshot"] == "auto"
    with pytest.raises(ValidationError):
        FilesSource.model_validate({"kind": "files", "repository": "r", "paths": ["/srv"],
                                    "fs_snapshot": "zfs"})

