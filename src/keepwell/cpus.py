"""How many cores this process may use: its CPU affinity and its cgroup's CPU quota.

A container or a systemd unit held to one core on a 64-core host still counts 64 in
`os.cpu_count()`, and usually in its affinity too: only its cgroup's CPU quota (``cpu.max`` in
cgroup v2, ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` in v1, on the cgroup or any of its
ancestors) says it gets one core's time. Work sized by the number of cores (worker processes,
compression threads) is sized by `usable_cores()`, so such a host does not start 64 interpreters
that take turns on one core and hold memory the container may not have.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path

_ESCAPED = re.compile(r"\\([0-7]{3})")


def usable_cores(proc: str = "/proc/self") -> int:
    """The cores this process may run on (its affinity), no more than its cgroup's CPU quota
    allows (rounded up); at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 2
    quota = cgroup_cpu_quota(proc)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cgroup_cpu_quota(proc: str = "/proc/self") -> float | None:
    """The CPU time the cgroups of the process ``proc`` names allow it, in cores: the tightest
    quota of its cgroup and their ancestors, in v1's ``cpu`` hierarchy and in v2; None when
    there is none (or it cannot be read)."""
    try:
        own = Path(proc, "cgroup").read_text()
        mounts = Path(proc, "mountinfo").read_text()
    except OSError:
        return None
    paths: dict[str, str] = {}
    for line in own.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for name in parts[1].split(",") if parts[1] else [""]:
                paths[name] = parts[2]
    tightest: float | None = None
    for line in mounts.splitlines():
        left, sep, right = line.partition(" - ")
        fields, more = left.split(), right.split()
        if not sep or len(fields) < 5 or len(more) < 3:
            continue
        root, mountpoint = _unescape(fields[3]), _unescape(fields[4])
        if more[0] == "cgroup2" and "" in paths:
            quota = _tightest(mountpoint, root, paths[""], _v2_quota)
        elif more[0] == "cgroup" and "cpu" in more[2].split(",") and "cpu" in paths:
            quota = _tightest(mountpoint, root, paths["cpu"], _v1_quota)
        else:
            continue
        if quota is not None and (tightest is None or quota < tightest):
            tightest = quota
    return tightest


def _unescape(field: str) -> str:
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 8)), field)


def _tightest(mountpoint: str, root: str, path: str,
              read: Callable[[Path], float | None]) -> float | None:
    """The smallest quota from the cgroup at ``path`` (as /proc/PID/cgroup names it) up to the
    mount's top; ``root`` is the part of the hierarchy the mount shows (not "/" in a container
    without its own cgroup namespace)."""
    top = Path(mountpoint)
    if root != "/" and (path == root or path.startswith(root + "/")):
        path = path[len(root):]
    here = top / path.lstrip("/")
    if not here.is_dir():
        here = top  # a path of another namespace: at least the mount's own limit
    tightest: float | None = None
    while True:
        quota = read(here)
        if quota is not None and (tightest is None or quota < tightest):
            tightest = quota
        if here == top or top not in here.parents:
            return tightest
        here = here.parent


def _v2_quota(directory: Path) -> float | None:
    try:
        limit, period = (directory / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(directory: Path) -> float | None:
    try:
        limit = int((directory / "cpu.cfs_quota_us").read_text())
        if limit <= 0:
            return None
        return limit / int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None


def pool_threads(ceiling: int = 16) -> int:
    """Threads for a pool of native work (compression, encryption, hashing: the GIL released):
    one per usable core, at least two (one waits on I/O while the other works), at most
    ``ceiling`` (each holds a chunk in memory)."""
    return max(2, min(ceiling, usable_cores()))
