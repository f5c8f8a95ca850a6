"""The cores a process may use: its affinity, bounded by the CPU quota of its cgroups (v1 and
v2, on the cgroup or an ancestor), read from a /proc and cgroup file systems laid out in a
temporary directory as the kernel lays them out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keepwell import cpus


def _proc(tmp: Path, cgroup: str, mounts: list[str]) -> str:
    proc = tmp / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("".join(line + "\n" for line in mounts))
    return str(proc)


def _write(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("__", ".")).write_text(text)


def test_v1_quota_of_an_ancestor_bounds_the_process(tmp_path: Path) -> None:
    cpu = tmp_path / "fs" / "cpu,cpuacct"
    _write(cpu, cpu__cfs_quota_us="-1\n", cpu__cfs_period_us="100000\n")
    _write(cpu / "kubepods", cpu__cfs_quota_us="150000\n", cpu__cfs_period_us="100000\n")
    _write(cpu / "kubepods" / "pod1", cpu__cfs_quota_us="-1\n", cpu__cfs_period_us="100000\n")
    proc = _proc(tmp_path, "5:cpu,cpuacct:/kubepods/pod1\n4:memory:/kubepods/pod1\n0::/\n", [
        f"32 31 0:29 / {cpu} rw,relatime - cgroup cgroup rw,cpu,cpuacct",
        f"35 31 0:32 / {tmp_path}/fs/memory rw,relatime - cgroup cgroup rw,memory",
    ])
    assert cpus.cgroup_cpu_quota(proc) == 1.5


def test_v2_quota_is_the_tightest_on_the_path(tmp_path: Path) -> None:
    fs = tmp_path / "fs with space"
    _write(fs, cpu__max="max 100000\n")
    _write(fs / "system.slice", cpu__max="50000 100000\n")
    _write(fs / "system.slice" / "backup.service", cpu__max="200000 100000\n")
    escaped = str(fs).replace(" ", "\\040")
    proc = _proc(tmp_path, "0::/system.slice/backup.service\n",
                 [f"30 23 0:26 / {escaped} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"])
    assert cpus.cgroup_cpu_quota(proc) == 0.5


def test_a_container_mount_shows_only_its_own_part_of_the_hierarchy(tmp_path: Path) -> None:
    """Without a cgroup namespace, /proc/self/cgroup names the host's path and the mount's root
    is that path: the quota is the mount's own directory's."""
    cpu = tmp_path / "cpu"
    _write(cpu, cpu__cfs_quota_us="100000\n", cpu__cfs_period_us="100000\n")
    proc = _proc(tmp_path, "3:cpu:/docker/abc\n",
                 [f"40 31 0:29 /docker/abc {cpu} rw - cgroup cgroup rw,cpu"])
    assert cpus.cgroup_cpu_quota(proc) == 1.0


def test_no_quota_no_cgroup_or_unreadable(tmp_path: Path) -> None:
    cpu = tmp_path / "cpu"
    _write(cpu, cpu__cfs_quota_us="-1\n", cpu__cfs_period_us="100000\n")
    proc = _proc(tmp_path, "3:cpu:/\n0::/\n", [
        f"40 31 0:29 / {cpu} rw - cgroup cgroup rw,cpu",
        f"41 31 0:30 / {tmp_path}/unified rw - cgroup2 cgroup2 rw",  # no cpu.max there
        "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw",
    ])
    assert cpus.cgroup_cpu_quota(proc) is None
    assert cpus.cgroup_cpu_quota(str(tmp_path / "missing")) is None


def test_usable_cores_rounds_a_quota_up_and_keeps_one(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    for quota, cores in ((None, 64), (1.5, 2), (0.25, 1), (128.0, 64)):
        monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda proc="", q=quota: q)
        assert cpus.usable_cores() == cores
        assert cpus.pool_threads() == max(2, min(16, cores))
