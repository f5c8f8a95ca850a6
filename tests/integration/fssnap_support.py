"""Filesystems on loop devices for the ``--fs-snapshot`` tests: made from a sparse file, mounted
under the test's directory, and always taken down again (unmounted, loop device detached)
whatever the test did. They need root, the kernel's btrfs and the tools that
.ci/install.d/fssnapshot.sh installs; a missing one fails the test (it never skips)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any


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
