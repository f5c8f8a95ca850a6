#!/usr/bin/env bash
# FUSE for `keepwell mount` and its tests. Idempotent; runs as root on a bare Debian 12.
#
# fuse3 gives libfuse3 and fusermount3; libfuse3-dev and pkg-config are what pip needs to build
# pyfuse3 (the mount extra, part of the dev extra), so the Makefile runs this script before it
# installs the venv. The tests need /dev/fuse too: a container must be given the device.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

need=()
for pkg in fuse3 libfuse3-dev pkg-config gcc; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

pkg-config --modversion fuse3
command -v fusermount3 >/dev/null
[ -c /dev/fuse ] || { echo "/dev/fuse is missing: load the fuse module or pass the device" >&2; exit 1; }
