#!/usr/bin/env bash
# Filesystem snapshots for `keepwell backup --fs-snapshot` and its tests. Idempotent; runs as
# root on a bare Debian 12.
#
# btrfs-progs gives `btrfs subvolume snapshot/delete` and mkfs.btrfs; lvm2 gives
# pvcreate/vgcreate/lvcreate/lvremove, and thin-provisioning-tools the thin_check that lvm2 runs
# when it activates a thin pool; xfsprogs makes the XFS volumes the LVM tests mount with nouuid.
# The tests build their filesystems on loop devices, so the kernel must have btrfs and
# device-mapper (dm-snapshot, dm-thin-pool) and the machine must allow losetup.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

need=()
for pkg in btrfs-progs lvm2 thin-provisioning-tools xfsprogs; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

btrfs --version
lvm version | head -1
command -v thin_check >/dev/null
grep -qw btrfs /proc/filesystems || { echo "the kernel has no btrfs" >&2; exit 1; }
