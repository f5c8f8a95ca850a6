"""``backup --fs-snapshot lvm|auto`` on real LVM: run inside the VM that
test_fs_snapshot_lvm.py boots (a kernel with device-mapper), never on the host (the file's
name is not collected). One volume group on a loop device holds a thin pool with a thin volume
(ext4) and a classic volume (XFS), so both kinds of snapshot and both filesystems' mount
options are exercised; the real ``keepwell`` command in a subprocess, as in
test_fs_snapshot.py.

Proven here: a thin and a classic volume get one snapshot each, the backup records the
original paths and restores them exactly, and a second run reads no file again (the
snapshot's device is recorded as the origin's); a pair of files kept changing together is
saved as it was at one instant; a path on a bind mount of a directory of the volume is read
from that directory of the snapshot; SIGTERM removes the snapshot and its mount; a snapshot
left by a killed run is removed (unmounted, its mountpoint deleted) by the next run with a
warning; a classic volume whose volume group has no free space is one line and exit 1, with
nothing left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepwell.sources.files.fssnapshot import PREFIX
from tests.fault.cli import kw, ok
from tests.integration.fssnap_support import (
    backup_beside_a_writer,
    held_backup,
    loop_device,
    mounted,
    sh,
)
from tests.waiting import wait_for

VG = "kwvg"


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The thin volume (ext4) and the classic one (XFS), mounted: {"thin": ..., "classic": ...}."""
    where = tmp_path_factory.mktemp("lvm")
    with loop_device(where / "pv.img", "1000M") as dev:
        sh("pvcreate", "-q", dev)
        sh("vgcreate", "-q", VG, dev)
        try:
            sh("lvcreate", "-q", "-L", "300M", "-T", f"{VG}/pool")
            sh("lvcreate", "-q", "-V", "200M", "-T", f"{VG}/pool", "-n", "thin")
            sh("lvcreate", "-q", "-y", "-L", "320M", "-n", "classic", VG)
            sh("mkfs.ext4", "-q", f"/dev/{VG}/thin")
            sh("mkfs.xfs", "-q", f"/dev/{VG}/classic")
            with mounted(f"/dev/{VG}/thin", where / "thin") as thin, \
                    mounted(f"/dev/{VG}/classic", where / "classic") as classic:
                yield {"thin": thin, "classic": classic}
        finally:
            subprocess.run(["vgremove", "-ff", "-y", VG], capture_output=True)
            subprocess.run(["pvremove", "-ff", "-y", dev], capture_output=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    location = tmp_path_factory.mktemp("repo") / "repo"
    ok(kw(location, "init"))
    return location


def own_lvs() -> list[str]:
    out = sh("lvs", "--noheadings", "-o", "lv_name", VG)
    return sorted(n.strip() for n in out.split() if n.strip().startswith(PREFIX))


def own_mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [ln.split()[1] for ln in f if PREFIX in ln.split()[1]]


def nothing_left() -> bool:
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    return own_lvs() == [] and own_mounts() == [] and not list(tmp.glob(PREFIX + "*"))


def test_thin_and_classic_volumes(volumes: dict[str, Path], repo: Path, tmp_path: Path) -> None:
    for kind, vol in volumes.items():
        (vol / "data" / "sub").mkdir(parents=True)
        (vol / "data" / "a.txt").write_text(f"A on {kind}")
        (vol / "data" / "sub" / "big").write_bytes(os.urandom(3 << 20))
    paths = [str(volumes["thin"] / "data"), str(volumes["classic"] / "data")]
    out = json.loads(ok(kw(repo, "backup", "--json", "--fs-snapshot", "auto", *paths)))
    assert out["snapshot"]["paths"] == paths
    assert nothing_left()
    ok(kw(repo, "restore", "latest", "--target", str(tmp_path / "r")))
    for kind, vol in volumes.items():
        back = tmp_path / "r" / str(vol).lstrip("/") / "data"
        assert (back / "a.txt").read_text() == f"A on {kind}"
        assert (back / "sub" / "big").read_bytes() == (vol / "data" / "sub" / "big").read_bytes()
        assert not any(PREFIX in str(p) for p in (tmp_path / "r").rglob("*"))
    # a second run finds the first as its parent and reads no file again: the snapshots are
    # new devices, recorded as their origins
    again = json.loads(ok(kw(repo, "backup", "--json", "--fs-snapshot", "lvm", *paths)))
    summary = again["snapshot"]["summary"]
    assert summary["files_new"] == summary["files_changed"] == 0, summary
    assert summary["files_unmodified"] == 4
    assert nothing_left()


def test_a_backup_beside_a_writer_saves_a_consistent_pair(volumes: dict[str, Path],
                                                          repo: Path) -> None:
    data = volumes["thin"] / "pair"
    data.mkdir()
    backup_beside_a_writer(repo, data, "lvm")
    assert nothing_left()


def test_a_bind_mount_of_a_directory_of_the_volume(volumes: dict[str, Path], repo: Path,
                                                   tmp_path: Path) -> None:
    inner = volumes["classic"] / "exported" / "inner"
    inner.mkdir(parents=True)
    (inner / "f.txt").write_text("through the bind mount")
    with mounted(str(volumes["classic"] / "exported"), tmp_path / "bound", "--bind") as bound:
        ok(kw(repo, "backup", "--fs-snapshot", "auto", str(bound / "inner")))
        assert nothing_left()
    rows = json.loads(ok(kw(repo, "ls", "--json", "latest")))
    assert f"{bound}/inner/f.txt" in {row["path"] for row in rows}


def test_sigterm_and_a_killed_run(volumes: dict[str, Path], repo: Path, tmp_path: Path) -> None:
    vol = volumes["classic"]
    (vol / "held").write_text("held")
    proc = held_backup(repo, tmp_path / "held-1", vol / "held", method="lvm")
    try:
        wait_for((tmp_path / "held-1").exists, "the backup to reach its snapshot write", 300)
        assert len(own_lvs()) == 1 and len(own_mounts()) == 1
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    assert nothing_left()
    # killed outright: the snapshot stays, mounted, until the next run on the volume group
    proc = held_backup(repo, tmp_path / "held-2", vol / "held", method="lvm")
    try:
        wait_for((tmp_path / "held-2").exists, "the backup to reach its snapshot write", 300)
    finally:
        proc.kill()
        proc.wait()
    [left] = own_lvs()
    assert len(own_mounts()) == 1
    r = kw(repo, "backup", "--fs-snapshot", "lvm", str(vol / "held"))
    ok(r)
    assert f"keepwell: warning: removed LVM snapshot {VG}/{left}, left behind by an earlier " \
           "backup that was killed" in r.stderr
    assert nothing_left()


def test_no_room_for_a_classic_snapshot(volumes: dict[str, Path], repo: Path) -> None:
    sh("lvcreate", "-q", "-y", "-l", "100%FREE", "-n", "filler", VG)
    try:
        r = kw(repo, "backup", "--fs-snapshot", "lvm", str(volumes["classic"] / "held"))
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"no room for a snapshot of {VG}/classic" in r.stderr
        assert nothing_left()
        # a thin volume needs no free space in the group: its snapshot shares the pool
        ok(kw(repo, "backup", "--fs-snapshot", "lvm", str(volumes["thin"] / "data")))
        assert nothing_left()
    finally:
        sh("lvremove", "-q", "-y", f"{VG}/filler")
