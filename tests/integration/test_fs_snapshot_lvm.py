"""``backup --fs-snapshot lvm|auto`` on real LVM, in a virtual machine.

LVM needs the kernel's device-mapper, which the test machine's kernel may lack (this one has
none). The LVM tests (tests/integration/lvm_checks.py) therefore run inside a VM booted with
Debian's own kernel (tests.integration.vm_support): the host's filesystem shared read-only, so
the same venv, checkout and tools; loop devices, a volume group, a thin pool and a classic
volume made inside it. This test boots the VM, runs pytest on that module there and requires
every one of its tests to pass, none skipped.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.integration.vm_support import build_initrd, run_vm

ROOT = Path(__file__).resolve().parents[2]
MODULES = ["crc32c_generic", "virtio_pci", "9pnet_virtio", "9p", "loop", "dm-mod", "dm-snapshot",
           "dm-thin-pool", "ext4", "xfs"]
CHECKS = "tests/integration/lvm_checks.py"

# LVM without udev (the VM runs none): lvm makes the device nodes itself and waits for no event
LVM_CONF = """\
devices { obtain_device_list_from_udev = 0 }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
backup { backup = 0 archive = 0 }
"""


@pytest.mark.timeout(1800)
def test_lvm_snapshots_in_a_vm(tmp_path: Path) -> None:
    initrd = build_initrd(tmp_path / "initrd.img", MODULES)
    script = f"""
mkdir -p /run/lvm-conf
cat > /run/lvm-conf/lvm.conf <<'EOF'
{LVM_CONF}EOF
export LVM_SYSTEM_DIR=/run/lvm-conf KEEPWELL_TESTONLY_WEAK_KDF=1 PYTHONDONTWRITEBYTECODE=1
cd {ROOT}
{sys.executable} -m pytest -q -p no:cacheprovider -o addopts= \\
    --junitxml=/run/share/junit.xml {CHECKS} > /run/share/pytest.log 2>&1
"""
    share = tmp_path / "share"
    rc, console = run_vm(initrd, share, script, timeout=1700)
    log = (share / "pytest.log").read_text() if (share / "pytest.log").exists() else ""
    assert rc == 0, f"pytest in the VM: exit {rc}\n{log}\n-- console --\n{console[-3000:]}"
    suite = ET.parse(share / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    assert counts == {"tests": 5, "failures": 0, "errors": 0, "skipped": 0}, log
