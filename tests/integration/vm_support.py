"""A throwaway virtual machine for tests that need kernel features the test machine lacks
(device-mapper, for LVM): Debian's kernel under QEMU, booted from a tiny initramfs made here
(a static busybox and the kernel modules asked for), with the host's root filesystem shared
read-only over 9p. Inside, /run and /dev/shm are fresh tmpfs (and TMPDIR is /run/tmp: the
host's /tmp may hold the checkout, so it stays visible), and a host directory (the *share*) is
mounted writable at /run/share; the VM runs ``/bin/sh /run/share/run.sh`` as root in the
host's filesystem (the same Python, venv and checkout, at the same paths) and powers off. The script's exit code comes back in the share's ``rc``, everything the VM printed in its
``console``.

.ci/install.d/vm.sh installs QEMU and busybox and unpacks the kernel; a missing piece fails
the test (it never skips). QEMU runs the VM with its own CPU emulation (TCG): where /dev/kvm
exists it may still not work (in a VM without nested virtualisation, as here), and a VM that
hangs would cost the whole timeout, so KVM is not tried.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

VM_DIR = Path(os.environ.get("KEEPWELL_VM_DIR", "/var/cache/keepwell-vm"))
INSTALL = "run .ci/install.d/vm.sh as root (make servers)"

INIT = r"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /modules/*.ko; do insmod "$m" || echo "keepwell-vm: insmod $m failed"; done
o=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $o,cache=loose,ro hostroot /host || echo "keepwell-vm: no host root"
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mount -t tmpfs run /host/run
mkdir -p /host/dev/shm /host/run/share /host/run/lock /host/run/tmp
mount -t tmpfs shm /host/dev/shm
mount -t 9p -o $o share /host/run/share || echo "keepwell-vm: no share"
chroot /host /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/run/tmp TMPDIR=/run/tmp LANG=C.UTF-8 /bin/sh /run/share/run.sh
echo "keepwell-vm: run.sh exited with $?"
sync
poweroff -f
"""


def _release() -> str:
    path = VM_DIR / "release"
    assert path.is_file(), f"no kernel for the VM in {VM_DIR}: {INSTALL}"
    return path.read_text().strip()


def _load_order(modules: Path, wanted: list[str]) -> list[Path]:
    """The modules' files, each after those it depends on (modules.dep)."""
    deps: dict[str, list[str]] = {}
    with open(modules / "modules.dep") as f:
        for line in f:
            name, _, after = line.partition(":")
            deps[name] = after.split()
    by_name = {os.path.basename(k).removesuffix(".ko").replace("_", "-"): k for k in deps}
    order: list[str] = []

    def visit(key: str) -> None:
        if key not in order:
            for dep in reversed(deps[key]):
                visit(dep)
            order.append(key)

    for name in wanted:
        key = by_name.get(name.replace("_", "-"))
        assert key is not None, f"the VM's kernel has no module {name}"
        visit(key)
    return [modules / k for k in order]


def _newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the kernel's initramfs format (newc)."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0, 0, 0,
                  len(raw), 0)
        out.write(b"070701" + b"".join(b"%08X" % v for v in fields) + raw)
        out.write(b"\0" * (-(110 + len(raw)) % 4))
        out.write(data + b"\0" * (-len(data) % 4))
    out.write(b"\0" * (-out.tell() % 512))
    return out.getvalue()


def build_initrd(target: Path, modules: list[str]) -> Path:
    """An initramfs that loads ``modules`` (with what they depend on) and runs INIT."""
    busybox = shutil.which("busybox")
    assert busybox is not None, f"no busybox: {INSTALL}"
    entries: list[tuple[str, int, bytes]] = [
        (d, stat.S_IFDIR | 0o755, b"") for d in ("bin", "dev", "proc", "sys", "host", "modules")]
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, Path(busybox).read_bytes()))
    entries.append(("bin/sh", stat.S_IFLNK | 0o777, b"busybox"))
    for i, path in enumerate(_load_order(VM_DIR / "lib/modules" / _release(), modules)):
        entries.append((f"modules/{i:03d}-{path.name}", stat.S_IFREG | 0o644, path.read_bytes()))
    entries.append(("init", stat.S_IFREG | 0o755, INIT.encode()))
    target.write_bytes(_newc(entries))
    return target


def run_vm(initrd: Path, share: Path, script: str, *, timeout: float,
           memory_mib: int = 2048) -> tuple[int | None, str]:
    """Boot the VM, run ``script`` (shell) in it; (its exit code, or None if it did not finish,
    and the console's text)."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None, f"no qemu-system-x86_64: {INSTALL}"
    share.mkdir(parents=True, exist_ok=True)
    (share / "run.sh").write_text(script + '\necho $? > /run/share/rc\n')
    (share / "rc").unlink(missing_ok=True)
    console = share.parent / f"{share.name}.console"
    argv = [qemu, "-accel", "tcg,thread=multi", "-smp", str(min(os.cpu_count() or 1, 4)),
            "-m", str(memory_mib), "-nographic", "-no-reboot", "-nic", "none",
            "-kernel", str(VM_DIR / "vmlinuz"), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=4",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                       "multidevs=remap",
            "-virtfs", f"local,path={share},mount_tag=share,security_model=none"]
    with open(console, "wb") as out:
        try:
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                           timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    text = console.read_text(errors="replace")
    rc = share / "rc"
    return (int(rc.read_text()) if rc.exists() else None), text
