#!/usr/bin/env bash
# A virtual machine for the LVM tests of `backup --fs-snapshot`. Idempotent; runs as root on a
# bare Debian 12.
#
# LVM needs the kernel's device-mapper (dm-snapshot, dm-thin-pool), which a container's or a
# micro-VM's kernel often lacks. The tests (tests/integration/test_fs_snapshot_lvm.py) then boot
# Debian's own kernel under QEMU, with the host's root filesystem shared read-only over 9p, and
# run the LVM tests inside it on loop devices. This installs QEMU and a static busybox (the VM's
# first process), and unpacks Debian's current kernel package into $KEEPWELL_VM_DIR (default
# /var/cache/keepwell-vm) without installing it: the machine's own boot is not touched.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
dir="${KEEPWELL_VM_DIR:-/var/cache/keepwell-vm}"

need=()
for pkg in qemu-system-x86 busybox-static; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [[ ! -s "$dir/release" ]]; then
    package=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [[ -z "$package" ]]; then
        apt-get update -qq
        package=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    release=${package#linux-image-}
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && apt-get download -qq "$package" 2>/dev/null)
    dpkg-deb -x "$work"/*.deb "$work/root"
    rm -rf "$dir" && mkdir -p "$dir/lib/modules"
    cp "$work/root/boot/vmlinuz-$release" "$dir/vmlinuz"
    mv "$work/root/lib/modules/$release" "$dir/lib/modules/"
    busybox depmod -b "$dir" "$release"
    echo "$release" > "$dir/release"
fi

qemu-system-x86_64 --version | head -n 1
echo "kernel for the VM: $(cat "$dir/release") in $dir"
