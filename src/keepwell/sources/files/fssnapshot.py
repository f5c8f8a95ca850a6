"""Filesystem snapshots under a file backup (``backup --fs-snapshot``, docs/files.md).

A backup of a live tree reads one file after another while the tree changes, so two files
changed together may be saved one before and one after the change. A filesystem snapshot
freezes the whole tree at one instant; the backup reads the snapshot and records what it read
under the original paths (the *reads* map: path as backed up → path it is read from, which
`keepwell.sources.files.archiver.backup_paths` follows), and the snapshot is removed again.

Methods:

- ``btrfs``: a read-only snapshot of the subvolume holding the path (``btrfs subvolume
  snapshot -r``), placed in that subvolume's root as ``.keepwell-fssnap-PID-XXXXXXXX``. A
  snapshot holds no nested subvolume's content (those appear as empty directories), and a
  backup's walk never enters one of these snapshots.
- ``lvm``: a snapshot of the logical volume holding the path (``lvcreate -s``: a thin
  snapshot of a thin volume; for a classic volume a copy-on-write area of a fifth of its size,
  at most the free space of the volume group), mounted read-only at a temporary mountpoint
  (``nouuid,norecovery`` for XFS, ``noload`` for ext3/4).
- ``auto``: btrfs where statfs(2) says btrfs, LVM where the path's device is a device-mapper
  device of LVM; anything else is refused with one line.

Paths on one filesystem share one snapshot. Every snapshot is removed when the backup ends,
whichever way: a `KeyboardInterrupt` from SIGINT, and SIGTERM while snapshots exist (turned
into one by a handler installed in the main thread), unwind through the removal. A snapshot
left by a process that was killed outright (its PID is in the name, and that process is gone)
is removed by the next run on the same filesystem, with a warning.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from keepwell.errors import SourceError, UsageError
from keepwell.sources.files.inotify import filesystem_type

METHODS = ("btrfs", "lvm", "auto")
PREFIX = "keepwell-fssnap-"  # every snapshot's name starts so: an LV's, a mountpoint's
BTRFS_PREFIX = "." + PREFIX  # a btrfs snapshot's directory, in the subvolume's root
BTRFS_MAGIC = 0x9123683E
BTRFS_ROOT_INODE = 256  # the root directory of every btrfs subvolume has this inode number
_NAME = re.compile(r"\.?" + re.escape(PREFIX) + r"(\d+)-[0-9a-f]{8}$")
_FSTYPES = {BTRFS_MAGIC: "btrfs", 0xEF53: "ext2/3/4", 0x58465342: "xfs", 0x01021994: "tmpfs", 0x794C7630: "overlay",
            0x4D44: "vfat", 0x5346544E: "ntfs", 0x2FC12FC1: "zfs", 0x6969: "nfs"}
Notice = Callable[[str], None]


def snapshot_name() -> str:
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"


def left_behind(name: str) -> bool:
    """Whether ``name`` is one of these snapshots whose process is gone."""
    m = _NAME.match(name)
    if m is None:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _run(argv: list[str], what: str) -> str:
    """Run one tool of the filesystem; its own session, so a Ctrl-C at the terminal reaches
    keepwell (which removes the snapshot) and not the tool half way."""
    if shutil.which(argv[0]) is None:
        raise SourceError(f"{what}: {argv[0]} is not installed",
                          hint="install btrfs-progs (btrfs) or lvm2 (LVM)")
    try:
        out = subprocess.run(argv, capture_output=True, text=True, start_new_session=True,
                             stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise SourceError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        raise SourceError(f"{what}: {' '.join(argv[:3])} failed: {last.strip()}")
    return out.stdout


def _fs_name(path: str) -> str:
    kind = filesystem_type(path)
    return "an unknown filesystem" if kind is None else _FSTYPES.get(kind, f"filesystem 0x{kind:x}")


# -- btrfs --------------------------------------------------------------------------------------
def subvolume_root(path: str) -> str:
    """The root, as mounted here, of the btrfs subvolume holding ``path``: the nearest directory
    at or above it with the subvolume root's inode number on the same device."""
    dev = os.lstat(path).st_dev
    at = path if os.path.isdir(path) and not os.path.islink(path) else os.path.dirname(path)
    while True:
        st = os.lstat(at)
        if st.st_dev == dev and st.st_ino == BTRFS_ROOT_INODE:
            return at
        if at == "/":
            raise SourceError(f"cannot find the btrfs subvolume that holds {path}")
        at = os.path.dirname(at)


def is_own_btrfs_snapshot(name: str, st: os.stat_result) -> bool:
    """Whether a directory entry is one of these snapshots (so a backup's walk leaves it out)."""
    return (st.st_ino == BTRFS_ROOT_INODE and name.startswith(BTRFS_PREFIX)
            and stat.S_ISDIR(st.st_mode))


# -- LVM ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo, as far as it is needed here."""

    device: str  # "major:minor"
    root: str  # the directory of the filesystem mounted (/ for the whole one)
    point: str
    fstype: str
    source: str


def _unescape(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def mounts() -> list[Mount]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            out.append(Mount(a[2], _unescape(a[3]), _unescape(a[4]), b[0], _unescape(b[1])))
    return out


def mount_of(path: str) -> Mount | None:
    """The mount ``path`` is on: the longest mountpoint above it with its device."""
    st = os.lstat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    best: Mount | None = None
    for m in mounts():
        inside = path == m.point or path.startswith(m.point.rstrip("/") + "/")
        if m.device == dev and inside and (best is None or len(m.point) > len(best.point)):
            best = m
    return best


def dm_name(device: str) -> str | None:
    """The device-mapper name of an LVM device ``major:minor``, or None for any other."""
    try:
        with open(f"/sys/dev/block/{device}/dm/uuid") as f:
            if not f.read().startswith("LVM-"):
                return None
        with open(f"/sys/dev/block/{device}/dm/name") as f:
            return f.read().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    lv: str
    attr: str
    size: int
    vg_free: int
    extent: int

    @property
    def thin(self) -> bool:
        return self.attr[:1] == "V"

    def snapshot_size(self) -> int | None:
        """Bytes of copy-on-write area for a classic snapshot (a fifth of the volume, at most
        the volume group's free space, in whole extents), or None when there is no room."""
        size = min(self.size // 5, self.vg_free) // self.extent * self.extent
        return size if size >= self.extent else None


_LVS_FIELDS = "vg_name,lv_name,lv_attr,lv_size,vg_free,vg_extent_size"


def parse_lvs(line: str) -> LogicalVolume:
    """One line of ``lvs --noheadings --nosuffix --units b --separator '|' -o _LVS_FIELDS``."""
    vg, lv, attr, size, free, extent = (x.strip() for x in line.strip().split("|"))
    return LogicalVolume(vg, lv, attr, int(size), int(free), int(extent))


def mount_options(fstype: str) -> str:
    """Read-only options that mount a snapshot beside its origin (same UUID) without replaying
    a journal into it."""
    if fstype == "xfs":
        return "ro,nouuid,norecovery"
    if fstype in ("ext3", "ext4"):
        return "ro,noload"
    return "ro"


def _lvs(*args: str) -> list[str]:
    out = _run(["lvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", "|", *args],
               "--fs-snapshot lvm")
    return [ln for ln in out.splitlines() if ln.strip()]


# -- taking and removing ------------------------------------------------------------------------
@dataclass
class _Taken:
    """One snapshot: how to remove it (steps run in order, each tried once)."""

    what: str
    steps: list[tuple[list[str], str]] = field(default_factory=list)
    mountpoint: str | None = None


class _Signals:
    """SIGINT and SIGTERM raise `KeyboardInterrupt` in the main thread, except while a snapshot
    is being made or removed: then the interruption waits until that step is done."""

    def __init__(self) -> None:
        self.critical = 0
        self.pending = False
        self._old: dict[int, Any] = {}

    def _handler(self, _signum: int, _frame: FrameType | None) -> None:
        if self.critical:
            self.pending = True
            return
        raise KeyboardInterrupt

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    @contextmanager
    def held(self) -> Iterator[None]:
        self.critical += 1
        try:
            yield
        finally:
            self.critical -= 1
        if not self.critical and self.pending and self._old:
            self.pending = False
            raise KeyboardInterrupt


class FsSnapshots:
    def __init__(self, method: str, warn: Notice) -> None:
        if method not in METHODS:
            raise UsageError(f"--fs-snapshot {method!r}: give one of {', '.join(METHODS)}")
        self.method = method
        self.warn = warn
        self.taken: list[_Taken] = []
        self._cleaned: set[str] = set()

    # -- planning -----------------------------------------------------------------------------
    def _kind(self, path: str) -> str:
        btrfs = filesystem_type(path) == BTRFS_MAGIC
        if self.method == "btrfs" and not btrfs:
            raise UsageError(f"--fs-snapshot btrfs: {path} is on {_fs_name(path)}, not on btrfs",
                             hint="use --fs-snapshot lvm or auto, or back it up without "
                                  "--fs-snapshot")
        if btrfs and self.method != "lvm":
            return "btrfs"
        m = mount_of(path)
        if m is not None and dm_name(m.device) is not None:
            return "lvm"
        where = (f"{_fs_name(path)}" + (f" on {m.source}" if m is not None else ""))
        if self.method == "lvm":
            raise UsageError(f"--fs-snapshot lvm: {path} is on {where}, not on an LVM logical "
                             "volume", hint="use --fs-snapshot btrfs or auto, or back it up "
                                            "without --fs-snapshot")
        raise UsageError(f"--fs-snapshot auto: {path} is on {where}, neither a btrfs subvolume "
                         "nor an LVM logical volume",
                         hint="back it up without --fs-snapshot, or put it on btrfs or LVM")

    def take(self, paths: list[str], signals: _Signals) -> dict[str, str]:
        """Snapshot every filesystem that holds ``paths`` (absolute, existing); the reads map."""
        groups: dict[tuple[str, str], list[str]] = {}
        for p in paths:
            kind = self._kind(p)
            if kind == "btrfs":
                key = subvolume_root(p)
            else:
                m = mount_of(p)
                assert m is not None
                key = m.device
            groups.setdefault((kind, key), []).append(p)
        reads: dict[str, str] = {}
        for (kind, key), members in groups.items():
            if kind == "btrfs":
                root = self._btrfs(key, signals)
                for p in members:
                    reads[p] = root + p[len(key.rstrip("/")):]
            else:
                m = mount_of(members[0])
                assert m is not None
                point = self._lvm(m, signals)
                base = m.point.rstrip("/")
                for p in members:
                    # the mount's own root may be a directory of the filesystem (a bind mount)
                    inside = (m.root.rstrip("/") + p[len(base):]) if m.root != "/" else p[len(base):]
                    reads[p] = point.rstrip("/") + (inside or "")
        return reads

    # -- btrfs --------------------------------------------------------------------------------
    def _btrfs_leftovers(self, root: str) -> None:
        if root in self._cleaned:
            return
        self._cleaned.add(root)
        try:
            names = [n for n in os.listdir(root) if n.startswith(BTRFS_PREFIX)]
        except OSError:
            return
        for name in names:
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if is_own_btrfs_snapshot(name, st) and left_behind(name):
                _run(["btrfs", "subvolume", "delete", path], "--fs-snapshot btrfs")
                self.warn(f"removed btrfs snapshot {path}, left behind by an earlier backup "
                          "that was killed")

    def _btrfs(self, root: str, signals: _Signals) -> str:
        self._btrfs_leftovers(root)
        snap = os.path.join(root, "." + snapshot_name())
        with signals.held():
            taken = _Taken(f"btrfs snapshot {snap}",
                           [(["btrfs", "subvolume", "delete", snap], "btrfs")])
            _run(["btrfs", "subvolume", "snapshot", "-r", root, snap], "--fs-snapshot btrfs")
            self.taken.append(taken)
        return snap

    # -- LVM ----------------------------------------------------------------------------------
    def _lvm_leftovers(self, vg: str) -> None:
        if vg in self._cleaned:
            return
        self._cleaned.add(vg)
        for line in _lvs("-o", "lv_name,lv_kernel_major,lv_kernel_minor", vg):
            name, major, minor = (x.strip() for x in line.split("|"))
            if not left_behind(name):
                continue
            for m in mounts():
                if m.device == f"{major}:{minor}":
                    _run(["umount", m.point], "--fs-snapshot lvm")
                    if os.path.basename(m.point).startswith(PREFIX):
                        os.rmdir(m.point)
            _run(["lvremove", "-y", f"{vg}/{name}"], "--fs-snapshot lvm")
            self.warn(f"removed LVM snapshot {vg}/{name}, left behind by an earlier backup that "
                      "was killed")

    def _lvm(self, m: Mount, signals: _Signals) -> str:
        name = dm_name(m.device)
        assert name is not None
        lines = _lvs("-o", _LVS_FIELDS, f"/dev/mapper/{name}")
        if not lines:
            raise SourceError(f"--fs-snapshot lvm: lvs does not know /dev/mapper/{name}")
        lv = parse_lvs(lines[0])
        self._lvm_leftovers(lv.vg)
        snap = snapshot_name()
        create = ["lvcreate", "-s", "-n", snap]
        if lv.thin:
            create += ["-kn"]  # thin snapshots skip activation by default
        else:
            size = lv.snapshot_size()
            if size is None:
                raise SourceError(f"--fs-snapshot lvm: no room for a snapshot of {lv.vg}/{lv.lv} "
                                  f"({lv.vg_free} bytes free in volume group {lv.vg})",
                                  hint="free space in the volume group (vgextend, lvreduce) or "
                                       "use a thin volume")
            create += ["-L", f"{size}b"]
        create.append(f"{lv.vg}/{lv.lv}")
        with signals.held():
            taken = _Taken(f"LVM snapshot {lv.vg}/{snap}",
                           [(["lvremove", "-y", f"{lv.vg}/{snap}"], "lvm")])
            _run(create, "--fs-snapshot lvm")
            self.taken.append(taken)
            point = tempfile.mkdtemp(prefix=PREFIX)
            taken.mountpoint = point
            dev = _lvs("-o", "lv_dm_path", f"{lv.vg}/{snap}")[0].strip()
            _run(["mount", "-o", mount_options(m.fstype), dev, point], "--fs-snapshot lvm")
            taken.steps.insert(0, (["umount", point], "lvm"))
        return point

    # -- removing -----------------------------------------------------------------------------
    def remove(self) -> list[str]:
        """Remove every snapshot taken (newest first); what could not be removed."""
        failed = []
        while self.taken:
            t = self.taken.pop()
            try:
                for argv, what in t.steps:
                    _run(argv, f"removing the {what} snapshot")
                if t.mountpoint is not None:
                    os.rmdir(t.mountpoint)
            except (SourceError, OSError) as exc:
                failed.append(f"{t.what} could not be removed: {exc}")
        return failed


@contextmanager
def fs_snapshots(paths: list[str], method: str, warn: Notice) -> Iterator[dict[str, str]]:
    """Snapshot the filesystems of ``paths`` (absolute, existing) with ``method``; yields the
    reads map (each path → where its snapshot shows it) and removes every snapshot on the way
    out, also when interrupted (see the module doc)."""
    snaps = FsSnapshots(method, warn)
    signals = _Signals()
    signals.install()
    try:
        try:
            reads = snaps.take(paths, signals)
            yield reads
        except BaseException:
            for line in _remove(snaps, signals):  # the backup's own failure is the one raised
                warn(line)
            raise
        failed = _remove(snaps, signals)
        for line in failed[1:]:
            warn(line)
        if failed:
            raise SourceError(failed[0], hint="remove it by hand (btrfs subvolume delete, "
                                              "umount and lvremove)")
    finally:
        signals.restore()


def _remove(snaps: FsSnapshots, signals: _Signals) -> list[str]:
    with signals.held():
        return snaps.remove()
