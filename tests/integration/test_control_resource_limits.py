"""Hard resource limits of a job, against the kernel's real cgroup files.

A files backup with ``limits.cpu: 0.5`` and ``limits.memory: 256M`` runs in a job process inside
a cgroup whose limit files hold those values; its worker processes are in the cgroup too (read
from ``/proc/PID/cgroup`` while they run); the cgroup is
gone once the job has ended. Where no cgroup can be made (the cgroup root points at a directory
that is not one), the job runs niced, with one warning.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from keepwell.control.cgroups import CFS_PERIOD_US, JobCgroup, ResourceLimits
from keepwell.control.config import load_config
from keepwell.control.jobs import JobContext, JobOutcome, build_job
from keepwell.control.runner import execute
from tests.integration.control_support import PASSWORD, init_repository, write_random
from tests.waiting import wait_for

MIB = 1024 * 1024


def _config(tmp: Path, limits: dict[str, Any], **extra: Any) -> Any:
    repo = tmp / "repo"
    init_repository(repo)
    os.environ["KW_TEST_PASSWORD"] = PASSWORD
    doc = {
        "history": str(tmp / "history.db"),
        "repositories": {"main": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"data": {"kind": "files", "repository": "main",
                             "paths": [str(tmp / "data")], "limits": limits, **extra}},
    }
    path = tmp / "keepwell.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_config(path).config


def _small_files(root: Path, count: int, size: int) -> None:
    for i in range(count):
        write_random(root / f"d{i % 20}" / f"f{i}", size)


def _cgroup_lines(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _h, names, path = line.split(":", 2)
        for name in names.split(","):
            out[name] = path
    return out


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


def _exited(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def test_job_and_its_workers_run_inside_a_cgroup_with_the_limits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Path("/sys/fs/cgroup/cpu/cgroup.procs").exists() or \
        Path("/sys/fs/cgroup/cgroup.controllers").exists(), "this test needs cgroups"
    monkeypatch.setenv("KEEPWELL_FILE_PROCESSES", "2")
    _small_files(tmp_path / "data", 400, 8 * 1024)  # enough small files for worker processes
    cfg = _config(tmp_path, {"cpu": 0.5, "memory": "256M"}, upload_limit="256K")
    spec = build_job(cfg, "backup", "data", 1000.0)
    ctx = JobContext(timeout=600)
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(outcome=execute(spec, ctx)))
    runner.start()
    try:
        # The job process, once it is in its cgroup (before it has read its job).
        job_pids = wait_for(lambda: [p for p in _children(os.getpid()) if _cgroup_lines(p)
                                     .get("cpu", "/").rpartition("/")[2]
                                     .startswith("keepwell-data-")], "the job process")
        assert len(job_pids) == 1, "one job process, in its own cgroup"
        job_pid = job_pids[0]
        lines = _cgroup_lines(job_pid)
        cpu_dir = Path("/sys/fs/cgroup/cpu") / lines["cpu"].lstrip("/")
        memory_dir = Path("/sys/fs/cgroup/memory") / lines["memory"].lstrip("/")
        assert (cpu_dir / "cpu.cfs_period_us").read_text().strip() == str(CFS_PERIOD_US)
        assert (cpu_dir / "cpu.cfs_quota_us").read_text().strip() == str(CFS_PERIOD_US // 2)
        assert int((memory_dir / "memory.limit_in_bytes").read_text()) == 256 * MIB
        # Its worker processes, read while they run. On a v1 hierarchy the kernel shows a task
        # that is exiting in the root cgroup: a worker seen there must turn out to be exiting.
        outside: set[int] = set()

        def workers_inside() -> list[int]:
            inside = []
            for pid in _children(job_pid):
                mine = _cgroup_lines(pid) if not _exited(pid) else {}
                if mine.get("cpu") == lines["cpu"] and mine.get("memory") == lines["memory"]:
                    inside.append(pid)
                elif mine:
                    outside.add(pid)
            return inside

        inside = wait_for(workers_inside, "the job's worker processes in its cgroup",
                          interval=0.005)
        members = {int(p) for p in (cpu_dir / "cgroup.procs").read_text().split()}
        assert job_pid in members
        assert all(p in members or _exited(p) for p in inside)
        for pid in outside:
            wait_for(lambda pid=pid: _exited(pid),  # type: ignore[misc]
                     f"worker {pid}, seen outside the job's cgroup, to be exiting", timeout=30)
    finally:
        runner.join(600)
    outcome = result["outcome"]
    assert outcome.status == "succeeded", outcome.error
    assert outcome.snapshot_id
    assert outcome.bytes_uploaded == ctx.uploaded > 0
    assert outcome.details["confinement"]["cgroup"] == 1
    assert outcome.details["confinement"]["usage"]["cpu_usec"] > 0
    assert not cpu_dir.exists() and not memory_dir.exists(), "the cgroup is removed"


def test_limits_written_for_io_and_removed(tmp_path: Path) -> None:
    limits = ResourceLimits(read_bps=20 * MIB, write_iops=500, devices=(str(tmp_path),))
    group = JobCgroup.create("io-test", limits)
    try:
        dev = os.stat(tmp_path).st_dev
        if group.version == 1:
            text = (group.dirs["blkio"] / "blkio.throttle.read_bps_device").read_text()
            iops = (group.dirs["blkio"] / "blkio.throttle.write_iops_device").read_text()
        else:
            text = iops = (group.dirs[""] / "io.max").read_text()
        if os.major(dev):
            assert f"{20 * MIB}" in text and "500" in iops
        else:
            assert group.skipped, "a path off any block device is reported"
    finally:
        group.remove()
    assert all(not d.exists() for d in group.dirs.values())


def runs_under_root(tmp: Path, limits: dict[str, Any],
                    root: Path) -> tuple[list[JobOutcome], list[tuple[str, str]]]:
    """Two backups of ``tmp/data`` with ``limits`` and the cgroup root ``root``, both
    succeeded; their outcomes and the lines of their runs' logs."""
    cfg = _config(tmp, limits)
    cfg = cfg.model_copy(update={"limits": cfg.limits.model_copy(
        update={"cgroup_root": str(root)})})
    lines: list[tuple[str, str]] = []
    outcomes = []
    for at in (1.0, 2.0):
        ctx = JobContext(timeout=300)
        ctx.on_log = lambda level, message: lines.append((level, message))
        outcome = execute(build_job(cfg, "backup", "data", at), ctx)
        assert outcome.status == "succeeded", outcome.error
        outcomes.append(outcome)
    return outcomes, lines


def test_without_cgroups_the_job_is_niced_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import keepwell.control.confined as confined

    confined._warned.clear()
    write_random(tmp_path / "data" / "a", 4096)
    with caplog.at_level(logging.WARNING, logger="keepwell.control"):
        outcomes, lines = runs_under_root(tmp_path, {"cpu": 0.5, "memory": "256M"},
                                          tmp_path / "no-cgroups")
    for outcome in outcomes:
        assert outcome.details["confinement"] == {"cgroup": None, "nice": 10,
                                                  "ionice": None, "ionice_level": None}
    warnings = [r for r in caplog.records if "cgroups are not available" in r.getMessage()]
    assert len(warnings) == 1
    assert sum("cgroups are not available" in m for _l, m in lines) == 1


def test_the_job_process_is_niced(tmp_path: Path) -> None:
    """nice is applied in the job process itself, so everything it starts inherits it."""
    write_random(tmp_path / "data" / "a", 4096)
    cfg = _config(tmp_path, {"nice": 7, "ionice": "idle"})
    spec = build_job(cfg, "backup", "data", 1.0)
    outcome = execute(spec, JobContext(timeout=300))
    assert outcome.status == "succeeded", outcome.error
    assert outcome.details["confinement"]["nice"] == 7


def test_a_stopped_job_stops_its_job_process_and_its_cgroup_goes(tmp_path: Path) -> None:
    write_random(tmp_path / "data" / "big", 8 * MIB)
    cfg = _config(tmp_path, {"cpu": 0.5}, upload_limit="64K")
    spec = build_job(cfg, "backup", "data", 1.0)
    ctx = JobContext(timeout=600)
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(outcome=execute(spec, ctx)))
    runner.start()
    try:
        wait_for(lambda: ctx.bytes_read > 0, "the job's progress")
        job_pid = wait_for(lambda: [p for p in _children(os.getpid()) if _cgroup_lines(p)
                                    .get("cpu", "/").rpartition("/")[2]
                                    .startswith("keepwell-data-")], "the job process")[0]
        cpu_dir = Path("/sys/fs/cgroup/cpu") / _cgroup_lines(job_pid)["cpu"].lstrip("/")
        ctx.cancel.set()  # what the daemon does at shutdown
    finally:
        runner.join(600)
    outcome = result["outcome"]
    assert outcome.status == "interrupted", outcome.error
    assert not cpu_dir.exists()


def test_a_process_held_to_one_core_by_its_cgroup_starts_one_worker(tmp_path: Path) -> None:
    """Worker processes and thread pools are sized by the cores a process may use: a job held to
    one core by its cgroup's CPU quota starts one worker process, not one per core the machine
    (and the process's affinity) has, and its pools get two threads."""
    group = JobCgroup.create("cores-test", ResourceLimits(cpu=1.0))
    code = ("import sys; sys.stdin.readline()\n"
            "from keepwell.cpus import pool_threads\n"
            "from keepwell.sources.files.workers import worker_count\n"
            "print(worker_count('KEEPWELL_FILE_PROCESSES'), pool_threads())\n")
    env = {k: v for k, v in os.environ.items() if k != "KEEPWELL_FILE_PROCESSES"}
    try:
        assert "cpu" not in group.unapplied, group.unapplied
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)
        group.add(proc.pid)
        out, _ = proc.communicate("go\n", timeout=60)
    finally:
        group.remove()
    assert proc.returncode == 0
    assert out.split() == ["1", "2"], out
