"""The cgroup v2 path against a real cgroup2 hierarchy, mounted by the test at a directory of its
own (``mount -t cgroup2``; needs root), used as the cgroup root: no v1 hierarchy is there, so
the v2 path is the one taken. The job's cgroup is made, the job and the children it starts
after the move are in it (``cgroup.procs``, ``/proc/PID/cgroup``), the kernel accounts their
CPU time, and the cgroup is killed and removed at the end. The limits of every controller the
hierarchy offers are written and read back; those of the controllers it does not offer are
reported in one line, and nice/ionice stand in for them.

On a machine whose v1 hierarchies hold the ``cpu``, ``memory`` and ``io``/``blkio``
controllers, the cgroup2 hierarchy cannot offer them (a controller is in one hierarchy at a
time): there these tests check the reporting and the stand-ins, and the limits on machines
that delegate the controllers.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import keepwell.control.confined as confined
from keepwell.control.cgroups import CFS_PERIOD_US, JobCgroup, ResourceLimits
from tests.integration.control_support import write_random
from tests.integration.test_control_resource_limits import runs_under_root
from tests.waiting import wait_for

MIB = 1024 * 1024

# waits for a line, then starts a child that spends a little CPU; both then wait for a signal
_FAMILY = """
import os, signal, sys, time
sys.stdin.readline()
pid = os.fork()
if pid == 0:
    began = time.process_time()
    while time.process_time() - began < 0.05:
        pass
    signal.pause()  # until killed with its cgroup
    os._exit(0)
print(pid, flush=True)
signal.pause()
"""


@pytest.fixture
def cgroup2(tmp_path: Path) -> Iterator[Path]:
    assert os.geteuid() == 0, "mounting a cgroup2 hierarchy needs root"
    mount = tmp_path / "cgroup2"
    mount.mkdir()
    subprocess.run(["mount", "-t", "cgroup2", "none", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _v2_path(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"process {pid} is in no cgroup v2")


def test_job_cgroup_v2_holds_the_job_and_its_children_and_goes(
        cgroup2: Path, tmp_path: Path) -> None:
    offered = set((cgroup2 / "cgroup.controllers").read_text().split())
    limits = ResourceLimits(cpu=0.5, memory=64 * MIB, read_bps=20 * MIB,
                            devices=(str(tmp_path),), cgroup_root=str(cgroup2))
    group = JobCgroup.create("v2test", limits)
    proc = subprocess.Popen([sys.executable, "-c", _FAMILY], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert group.version == 2
        d = group.dirs[""]
        assert d.parent == cgroup2 / _v2_path(os.getpid()).lstrip("/")
        assert d.name.startswith("keepwell-v2test-") and d.is_dir()
        # the limits of what the hierarchy offers are written; the others are reported
        assert set(group.unapplied) == {"cpu", "memory", "io"} - offered
        if "cpu" in offered:
            assert (d / "cpu.max").read_text().split() == [str(CFS_PERIOD_US // 2),
                                                           str(CFS_PERIOD_US)]
        if "memory" in offered:
            assert int((d / "memory.max").read_text()) == 64 * MIB
        if group.unapplied:
            line = group.unapplied_line(limits.fallback(group.unapplied))
            assert line is not None and "\n" not in line
            for controller in group.unapplied:
                assert controller in line
            if "cpu" in group.unapplied:
                assert "nice 10" in line and limits.fallback(group.unapplied).nice == 10
            if "io" in group.unapplied:
                assert limits.fallback(group.unapplied).ionice == "best-effort"
        # the job moves in before it starts anything; what it starts is in the cgroup too
        group.add(proc.pid)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        child = int(proc.stdout.readline())
        assert _v2_path(proc.pid) == _v2_path(child) == "/" + str(d.relative_to(cgroup2))
        assert group.pids() == {proc.pid, child}
        # the kernel's accounting of the cgroup (cpu.stat is there without the cpu controller)
        usage = wait_for(lambda: group.usage().get("cpu_usec", 0) >= 10_000 and group.usage(),
                         "the child's CPU time in the cgroup's accounting")
        assert usage["cpu_usec"] >= 10_000
    finally:
        group.remove()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "what was left in the cgroup was killed"
    assert not group.dirs[""].exists()


def test_a_job_under_a_v2_root_runs_in_its_cgroup_and_says_what_stands_in(
        cgroup2: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    confined._warned.clear()
    offered = set((cgroup2 / "cgroup.controllers").read_text().split())
    unapplied = [c for c in ("cpu", "memory") if c not in offered]
    write_random(tmp_path / "data" / "a", 256 * 1024)
    with caplog.at_level(logging.WARNING, logger="keepwell.control"):
        outcomes, lines = runs_under_root(tmp_path, {"cpu": 0.5, "memory": "256M"}, cgroup2)
    for outcome in outcomes:
        confinement = outcome.details["confinement"]
        assert confinement["cgroup"] == 2
        # the job process ran in it: the cgroup's own accounting saw its CPU time
        assert confinement["usage"]["cpu_usec"] > 0
        if unapplied:
            assert confinement["unapplied"] == unapplied
            assert confinement["nice"] == (10 if "cpu" in unapplied else None)
        else:
            assert "unapplied" not in confinement
    said = [r.getMessage() for r in caplog.records if "does not offer" in r.getMessage()]
    assert len(said) == (1 if unapplied else 0), said
    assert sum("does not offer" in m for _l, m in lines) == len(said)
    assert not list(cgroup2.glob("keepwell-*")), "every job's cgroup is removed"
