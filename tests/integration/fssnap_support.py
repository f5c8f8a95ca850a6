"""Filesystems on loop devices for the ``--fs-snapshot`` tests: made from a sparse file, mounted
under the test's directory, and always taken down again (unmounted, loop device detached)
whatever the test did. They need root, the kernel's btrfs and the tools that
.ci/install.d/fssnapshot.sh installs; a missing one fails the test (it never skips)."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.fault.cli import KW, PASSWORD, kw, ok
from tests.integration.snapshot_edit_faults import hook_env


def sh(*argv: str) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(argv)}: {r.stdout}{r.stderr}"
    return r.stdout


@contextmanager
def loop_device(image: Path, size: str) -> Iterator[str]:
    sh("truncate", "-s", size, str(image))
    dev = sh("losetup", "-f", "--show", str(image)).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
        image.unlink(missing_ok=True)


@contextmanager
def mounted(dev: str, point: Path, *options: str) -> Iterator[Path]:
    point.mkdir(parents=True, exist_ok=True)
    sh("mount", *options, dev, str(point))
    try:
        yield point
    finally:
        # whatever is still mounted below it first (a snapshot mount the test left)
        with open("/proc/self/mounts") as f:
            below = [ln.split()[1] for ln in f if ln.split()[1].startswith(str(point) + "/")]
        for p in sorted(below, reverse=True):
            subprocess.run(["umount", "-l", p], capture_output=True)
        r = subprocess.run(["umount", str(point)], capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


@contextmanager
def filesystem(where: Path, mkfs: list[str], name: str, size: str) -> Iterator[Path]:
    """A fresh filesystem (``mkfs`` DEVICE) on a loop device, mounted at ``where/name``."""
    where.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        dev = stack.enter_context(loop_device(where / f"{name}.img", size))
        sh(*mkfs, dev)
        yield stack.enter_context(mounted(dev, where / name))


def btrfs(where: Path, size: str = "300M") -> Any:
    return filesystem(where, ["mkfs.btrfs", "-q", "-f"], "btrfs", size)


def ext4(where: Path, size: str = "64M") -> Any:
    """ext4 on a plain loop device: neither btrfs nor LVM."""
    return filesystem(where, ["mkfs.ext4", "-q", "-F"], "ext4", size)


def own_snapshots(root: Path) -> list[str]:
    """The ``--fs-snapshot`` btrfs snapshots in a subvolume's root."""
    return sorted(n for n in os.listdir(root) if n.startswith(".keepwell-fssnap-"))


HELD = "KEEPWELL_TESTONLY_HELD_FILE"


def hold_snapshot_writes(module: ModuleType) -> None:
    """A write hook: the snapshot object's write (the backup's last step, long after the
    filesystem snapshot was taken) says so in the file ``$KEEPWELL_TESTONLY_HELD_FILE`` and
    waits for ever, so a test can signal a backup in the middle of its run."""
    real_put = module.LocalBackend.put

    def put(self: Any, name: str, data: Any, **kw: Any) -> None:
        if name.startswith("snapshots/"):
            Path(os.environ[HELD]).write_text(str(os.getpid()))
            threading.Event().wait()
        real_put(self, name, data, **kw)

    module.LocalBackend.put = put


class PairWriter:
    """Writes the same counter into a.txt and then b.txt, each written, flushed (fsync) and
    renamed into place as an application that wants its files to survive a crash does: at
    every instant b <= a <= b + 1. (Without the fsync, a btrfs snapshot may hold a renamed
    file without its data, empty: what a crash at that instant would leave.)"""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.n = 0
        self.stop = threading.Event()
        self.step = threading.Condition()
        self.thread = threading.Thread(target=self._run)

    def _put(self, name: str, value: int) -> None:
        tmp = self.where / f".{name}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{value}\n" + "x" * 4000)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.where / name)

    def _run(self) -> None:
        while not self.stop.is_set():
            n = self.n + 1
            self._put("a.txt", n)
            self._put("b.txt", n)
            with self.step:
                self.n = n
                self.step.notify_all()

    def wait_past(self, n: int) -> None:
        with self.step:
            assert self.step.wait_for(lambda: self.n > n or not self.thread.is_alive(), 60)
            assert self.thread.is_alive()

    def __enter__(self) -> PairWriter:
        self.thread.start()
        self.wait_past(20)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def pair(read: Any) -> tuple[int, int]:
    return int(read("a.txt").split()[0]), int(read("b.txt").split()[0])


def backup_beside_a_writer(repo: Path, data: Path, method: str) -> None:
    """``backup --fs-snapshot METHOD DATA`` while a `PairWriter` runs in ``data``: the pair
    saved must be one the files held together at one instant during the backup."""
    (data / "big").write_bytes(os.urandom(8 << 20))  # between a.txt and b.txt in the walk
    with PairWriter(data) as writer:
        before = writer.n
        ok(kw(repo, "backup", "--fs-snapshot", method, str(data)))
        after = writer.n
    a, b = pair(lambda name: ok(kw(repo, "dump", "latest", f"{data}/{name}")))
    assert b <= a <= b + 1
    assert before <= a <= after + 1


def held_backup(repo: Path, held: Path, *paths: Path,
                method: str = "auto") -> subprocess.Popen[str]:
    """``backup --fs-snapshot METHOD PATHS`` in a process held at its snapshot write (it writes
    its PID into ``held`` then), to be signalled there."""
    env = {**os.environ, "KEEPWELL_PASSWORD": PASSWORD, "KEEPWELL_REPOSITORY": str(repo),
           "KEEPWELL_TESTONLY_WEAK_KDF": "1", HELD: str(held),
           **hook_env("hold_snapshot_writes", __name__)}
    return subprocess.Popen(KW + ["backup", "--fs-snapshot", method, *map(str, paths)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
