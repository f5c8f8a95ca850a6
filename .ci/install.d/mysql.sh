#!/usr/bin/env bash
# MariaDB 10.11 server, client and mariabackup for the MySQL/MariaDB integration tests and
# bench/mysql.sh (plus mydumper for the benchmark, when it installs). Idempotent; runs as root on a bare Debian 12.
#
# The tests never use the packaged service: they run mariadb-install-db into temporary datadirs
# and start their own mariadbd (--no-defaults, --user=root, private socket and port). Debian's
# postinst cannot start the service without an init system; that failure is harmless.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

need=()
for pkg in mariadb-server mariadb-client mariadb-backup zstd; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    apt-get update -qq
    # policy-rc.d keeps the postinst from trying to start the packaged server
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# mydumper is only a competitor in bench/mysql.sh: install it when Debian has it, never fail
if ! command -v mydumper >/dev/null; then
    apt-get install -y -qq --no-install-recommends mydumper >/dev/null 2>&1 \
        || echo "mysql.sh: mydumper not installed (bench/mysql.sh compares without it)" >&2
fi

for tool in mariadbd mariadb-install-db mariadb mariadb-dump mariadb-binlog mariabackup mbstream; do
    command -v "$tool" >/dev/null || [[ -x "/usr/sbin/$tool" ]] \
        || { echo "mysql.sh: $tool is missing after installation" >&2; exit 1; }
done
echo "mysql.sh: $(/usr/sbin/mariadbd --version | awk '{print $1, $2, $3}')"
