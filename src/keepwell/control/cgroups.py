"""Hard resource limits of one job: a kernel cgroup, or nice/ionice where there is none.

Words: `ResourceLimits` is what a job may use (a share of cores, memory, read/write bytes per
second and operations per second on the block devices it touches, its nice value and ionice
class), a plain value built from the configuration. `JobCgroup` is the cgroup made for one job:
created before the job's process starts, given the limits, joined by that process (its children
inherit it: worker processes, ``pg_basebackup``, ``mariabackup``), read for accounting, and
removed when the job ends.

Two kernel interfaces: cgroup v2 when the unified hierarchy delegates the ``cpu``, ``memory``
and ``io`` controllers the limits need to the cgroup this process is in; otherwise cgroup v1,
one directory per hierarchy (``cpu``, ``memory``, ``blkio``, and ``cpuacct`` for accounting when
it is mounted), each under this process's own cgroup of that hierarchy. Where v1 cannot be used
either but a v2 cgroup can be made, the job gets a v2 cgroup with the controllers it offers
(the job and its children are still held together, accounted for CPU time, and killed as one):
the limits of the others are *unapplied* (`JobCgroup.unapplied`), and the caller stands in for
them with nice and ionice (`ResourceLimits.fallback`). `CgroupUnavailable` says why no cgroup
can be used (no such root, read-only, not permitted); the caller then falls back to nice and
ionice (`Priority`) for every limit, which the kernel applies to the job's process and its
children too.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import platform
import signal
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keepwell.errors import KeepwellError

CFS_PERIOD_US = 100_000
IONICE_CLASSES = {"realtime": 1, "best-effort": 2, "idle": 3}
FALLBACK_NICE = 10  # what a job with limits but no cgroup is niced to, unless it sets its own
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "arm64": 30, "ppc64le": 273, "s390x": 282}
_counter = itertools.count()


class CgroupUnavailable(KeepwellError):
    """No cgroup can be made for the job here (the reason says why)."""


@dataclass(frozen=True)
class Priority:
    """The nice value and ionice class a job's process takes on before it starts anything."""

    nice: int | None = None
    ionice: str | None = None  # realtime | best-effort | idle
    ionice_level: int | None = None

    def apply(self) -> list[str]:
        """Apply to this process (its children inherit it); problems, one line each."""
        problems: list[str] = []
        if self.nice is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, self.nice)
            except OSError as exc:
                problems.append(f"cannot set nice {self.nice}: {exc.strerror}")
        if self.ionice is not None:
            problems.extend(_set_ionice(IONICE_CLASSES[self.ionice], self.ionice_level))
        return problems

    def as_dict(self) -> dict[str, Any]:
        return {"nice": self.nice, "ionice": self.ionice, "ionice_level": self.ionice_level}


def _set_ionice(klass: int, level: int | None) -> list[str]:
    number = _IOPRIO_SET.get(platform.machine())
    if number is None:
        return [f"ionice is not known on {platform.machine()}"]
    data = 0 if klass == IONICE_CLASSES["idle"] else (4 if level is None else level)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, 1, 0, (klass << 13) | data) != 0:  # IOPRIO_WHO_PROCESS, this one
        return [f"cannot set ionice: {os.strerror(ctypes.get_errno())}"]
    return []


@dataclass(frozen=True)
class ResourceLimits:
    cpu: float | None = None  # cores (0.5: half of one)
    memory: int | None = None  # bytes
    read_bps: int | None = None
    write_bps: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None
    devices: tuple[str, ...] = ()  # paths on the block devices the I/O limits apply to
    priority: Priority = field(default_factory=Priority)
    cgroup_root: str = "/sys/fs/cgroup"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResourceLimits:
        io = data.get("io") or {}
        return cls(cpu=data.get("cpu"), memory=data.get("memory"),
                   read_bps=io.get("read"), write_bps=io.get("write"),
                   read_iops=io.get("read_iops"), write_iops=io.get("write_iops"),
                   devices=tuple(io.get("devices") or data.get("paths") or ()),
                   priority=Priority(data.get("nice"), data.get("ionice"),
                                     data.get("ionice_level")),
                   cgroup_root=data.get("cgroup_root") or "/sys/fs/cgroup")

    def has_io(self) -> bool:
        return any(v is not None for v in (self.read_bps, self.write_bps, self.read_iops,
                                           self.write_iops))

    def needs_cgroup(self) -> bool:
        return self.cpu is not None or self.memory is not None or self.has_io()

    def fallback(self, unapplied: Collection[str] | None = None) -> Priority:
        """What stands in for the cgroup where there is none, or for the limits of the
        controllers in ``unapplied`` (``cpu``, ``io``; None: all): nice and ionice."""
        p = self.priority
        cpu = self.cpu is not None and (unapplied is None or "cpu" in unapplied)
        io = self.has_io() and (unapplied is None or "io" in unapplied)
        nice = p.nice if p.nice is not None else (FALLBACK_NICE if cpu else None)
        ionice, level = p.ionice, p.ionice_level
        if ionice is None and io:
            ionice, level = "best-effort", 7
        return Priority(nice, ionice, level)

    def needed_v2(self) -> list[str]:
        """The v2 controllers the limits need."""
        return [c for c, wanted in (("cpu", self.cpu is not None),
                                    ("memory", self.memory is not None),
                                    ("io", self.has_io())) if wanted]


def block_device(path: str) -> tuple[int, int] | None:
    """The whole disk (major, minor) that holds ``path``; None off a block device."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    major, minor = os.major(dev), os.minor(dev)
    if major == 0:
        return None  # tmpfs, overlay, a network file system: no block device to throttle
    sysfs = Path(f"/sys/dev/block/{major}:{minor}")
    try:
        if (sysfs / "partition").exists():  # throttling applies to the whole disk
            major_s, minor_s = (sysfs.resolve().parent / "dev").read_text().strip().split(":")
            return int(major_s), int(minor_s)
    except (OSError, ValueError):
        pass
    return major, minor


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and ``""`` for v2."""
    paths: dict[str, str] = {}
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return paths
    for line in text.splitlines():
        _hid, names, path = line.split(":", 2)
        for name in names.split(",") if names else [""]:
            paths[name] = path
    return paths


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class JobCgroup:
    """One job's cgroup (v2: one directory; v1: one per hierarchy). See the module docstring."""

    def __init__(self, version: int, dirs: dict[str, Path], limits: ResourceLimits,
                 unapplied: Sequence[str] = ()) -> None:
        self.version = version
        self.dirs = dirs  # controller (v1) or "" (v2) -> the job's directory
        self.limits = limits
        # v2 controllers the limits need and the hierarchy does not offer: not applied
        self.unapplied = list(unapplied)
        self.skipped: list[str] = []  # limits that could not be applied, one line each

    def unapplied_line(self, instead: Priority) -> str | None:
        """One line saying which limits this cgroup could not apply and what stands in."""
        if not self.unapplied:
            return None
        base = self.dirs[""].parent
        limits = {"cpu": "cpu", "memory": "memory", "io": "I/O"}
        stand_in = []
        if "cpu" in self.unapplied:
            stand_in.append(f"nice {instead.nice}")
        if "io" in self.unapplied:
            stand_in.append(f"ionice {instead.ionice}")
        if "memory" in self.unapplied:
            stand_in.append("no memory limit")
        return (f"cgroup v2 at {base} does not offer the {', '.join(self.unapplied)} "
                f"controller{'s' if len(self.unapplied) > 1 else ''}: the "
                f"{', '.join(limits[c] for c in self.unapplied)} limits are not applied "
                f"(instead: {', '.join(stand_in)})")

    @classmethod
    def create(cls, name: str, limits: ResourceLimits) -> JobCgroup:
        """Make the job's cgroup and give it its limits; `CgroupUnavailable` if none can be."""
        root = Path(limits.cgroup_root)
        if not root.is_dir():
            raise CgroupUnavailable(f"no cgroup file system at {root}")
        leaf = f"keepwell-{name}-{os.getpid()}-{next(_counter)}"
        own = _own_paths()
        group = _create_v2(root, own, leaf, limits, partial=False)
        if group is None:
            try:
                group = _create_v1(root, own, leaf, limits)
            except CgroupUnavailable:
                group = _create_v2(root, own, leaf, limits, partial=True)
                if group is None:
                    raise
        try:
            group._apply()
        except OSError as exc:
            group.remove()
            raise CgroupUnavailable(f"cannot set the job's limits in {root}: "
                                    f"{exc.strerror or exc}") from None
        return group

    def _apply(self) -> None:
        lim = self.limits
        devices = self._devices()
        if self.version == 2:
            d = self.dirs[""]
            if lim.cpu is not None and "cpu" not in self.unapplied:
                _write(d / "cpu.max", f"{round(lim.cpu * CFS_PERIOD_US)} {CFS_PERIOD_US}")
            if lim.memory is not None and "memory" not in self.unapplied:
                _write(d / "memory.max", str(lim.memory))
            for dev in devices if "io" not in self.unapplied else ():
                parts = [f"{k}={v}" for k, v in (("rbps", lim.read_bps), ("wbps", lim.write_bps),
                                                  ("riops", lim.read_iops),
                                                  ("wiops", lim.write_iops)) if v is not None]
                _write(d / "io.max", f"{dev[0]}:{dev[1]} " + " ".join(parts))
            return
        if lim.cpu is not None:
            _write(self.dirs["cpu"] / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(self.dirs["cpu"] / "cpu.cfs_quota_us", str(round(lim.cpu * CFS_PERIOD_US)))
        if lim.memory is not None:
            _write(self.dirs["memory"] / "memory.limit_in_bytes", str(lim.memory))
        for dev in devices:
            for what, value in (("read_bps", lim.read_bps), ("write_bps", lim.write_bps),
                                ("read_iops", lim.read_iops), ("write_iops", lim.write_iops)):
                if value is not None:
                    _write(self.dirs["blkio"] / f"blkio.throttle.{what}_device",
                           f"{dev[0]}:{dev[1]} {value}")

    def _devices(self) -> list[tuple[int, int]]:
        if not self.limits.has_io() or "io" in self.unapplied:
            return []
        found: list[tuple[int, int]] = []
        for path in self.limits.devices:
            dev = block_device(path)
            if dev is None:
                self.skipped.append(f"no block device holds {path}: its I/O is not limited")
            elif dev not in found:
                found.append(dev)
        if not self.limits.devices:
            self.skipped.append("I/O limits name no paths: no device to limit")
        return found

    def add(self, pid: int) -> None:
        """Move a process (before it starts children) into every directory of the job."""
        for d in self.dirs.values():
            _write(d / "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs.values():
            try:
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
            except OSError:
                continue
        return found

    def usage(self) -> dict[str, int]:
        """What the job used, from the kernel's accounting: CPU time (µs), bytes read and
        written on block devices, peak memory."""
        out: dict[str, int] = {}
        try:
            if self.version == 2:
                # cpu.stat is there without the cpu controller; io.stat and memory.peak only
                # with theirs
                d = self.dirs[""]
                stat = dict(line.split() for line in (d / "cpu.stat").read_text().splitlines())
                out["cpu_usec"] = int(stat.get("usage_usec", 0))
                if (d / "io.stat").exists():
                    rbytes = wbytes = 0
                    for line in (d / "io.stat").read_text().splitlines():
                        fields = dict(f.split("=") for f in line.split()[1:])
                        rbytes += int(fields.get("rbytes", 0))
                        wbytes += int(fields.get("wbytes", 0))
                    out["read_bytes"], out["write_bytes"] = rbytes, wbytes
                peak = d / "memory.peak"
                if peak.exists():
                    out["memory_peak"] = int(peak.read_text())
                return out
            if "cpuacct" in self.dirs:
                out["cpu_usec"] = int((self.dirs["cpuacct"] / "cpuacct.usage").read_text()) // 1000
            if "blkio" in self.dirs:
                rbytes = wbytes = 0
                text = (self.dirs["blkio"] / "blkio.throttle.io_service_bytes").read_text()
                for line in text.splitlines():
                    parts = line.split()
                    if len(parts) == 3 and parts[1] == "Read":
                        rbytes += int(parts[2])
                    elif len(parts) == 3 and parts[1] == "Write":
                        wbytes += int(parts[2])
                out["read_bytes"], out["write_bytes"] = rbytes, wbytes
            if "memory" in self.dirs:
                out["memory_peak"] = int(
                    (self.dirs["memory"] / "memory.max_usage_in_bytes").read_text())
        except (OSError, ValueError):
            pass
        return out

    def remove(self, grace: float = 5.0) -> None:
        """End whatever is left in the cgroup (a child the job did not reap) and remove it."""
        end = time.monotonic() + grace
        kill = self.dirs[""] / "cgroup.kill" if self.version == 2 else None
        try:
            if kill is None:
                raise FileNotFoundError
            _write(kill, "1")  # v2 (Linux 5.14): every process in it, forks racing included
        except OSError:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        waiter = threading.Event()
        for d in self.dirs.values():
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:  # EBUSY while the killed processes are still exiting
                    if exc.errno != errno.EBUSY or time.monotonic() > end:
                        break
                    waiter.wait(0.05)


def _create_v2(root: Path, own: dict[str, str], leaf: str, limits: ResourceLimits, *,
               partial: bool) -> JobCgroup | None:
    """The v2 cgroup, when the unified hierarchy delegates what the limits need; else None.
    ``partial``: also when it delegates only some of it (or none): the others are unapplied."""
    base = root if (root / "cgroup.controllers").exists() else root / "unified"
    if not (base / "cgroup.controllers").exists() or "" not in own:
        return None
    need = limits.needed_v2()
    parent = base / own[""].lstrip("/")
    try:
        available = (parent / "cgroup.controllers").read_text().split()
        unapplied = [c for c in need if c not in available]
        if unapplied and not partial:
            return None
        enabled = (parent / "cgroup.subtree_control").read_text().split()
        missing = [c for c in need if c not in enabled and c not in unapplied]
        if missing:
            _write(parent / "cgroup.subtree_control", " ".join("+" + c for c in missing))
        d = parent / leaf
        d.mkdir()
    except OSError:
        return None
    return JobCgroup(2, {"": d}, limits, unapplied)


def _v1_mount(root: Path, controller: str) -> Path | None:
    direct = root / controller
    if (direct / "cgroup.procs").exists():
        return direct
    try:
        for entry in root.iterdir():  # a joint mount such as cpu,cpuacct
            if controller in entry.name.split(",") and (entry / "cgroup.procs").exists():
                return entry
    except OSError:
        return None
    return None


def _create_v1(root: Path, own: dict[str, str], leaf: str,
               limits: ResourceLimits) -> JobCgroup:
    need = [c for c, wanted in (("cpu", limits.cpu is not None),
                                ("memory", limits.memory is not None),
                                ("blkio", limits.has_io())) if wanted]
    dirs: dict[str, Path] = {}
    try:
        for controller in [*need, "cpuacct"]:
            mount = _v1_mount(root, controller)
            if mount is None:
                if controller == "cpuacct":
                    continue  # accounting only
                raise CgroupUnavailable(f"no cgroup v1 '{controller}' hierarchy under {root}")
            d = mount / own.get(controller, "/").lstrip("/") / leaf
            if d in dirs.values():  # a joint mount (cpu,cpuacct): one directory for both
                dirs[controller] = d
                continue
            try:
                d.mkdir()
            except OSError as exc:
                if controller == "cpuacct":
                    continue
                raise CgroupUnavailable(f"cannot create a cgroup under {d.parent}: "
                                        f"{exc.strerror or exc}") from None
            dirs[controller] = d
    except CgroupUnavailable:
        JobCgroup(1, dirs, limits).remove()
        raise
    return JobCgroup(1, dirs, limits)
