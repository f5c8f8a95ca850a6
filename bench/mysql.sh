#!/usr/bin/env bash
# keepwell's MySQL/MariaDB backups against the tools people use today, on a generated database
# of at least 1 GB: keepwell logical vs `mariadb-dump | zstd` (and mydumper when Debian's package
# installs), keepwell physical vs `mariabackup --stream | zstd`. Reports backup time, restore
# time, stored size and the second day's growth after a write workload.
# Usage: bench/mysql.sh [--rows-per-table N] [--tables N] [--no-restore] [--keep] [--scattered]
#                      [--pairs N]
# Needs root (mariabackup reads the datadir) and .ci/install.d/mysql.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$py" ] || py=python3
if ! command -v mydumper >/dev/null && [ "$(id -u)" = 0 ] && [ -z "${MYSQL_BENCH_NO_MYDUMPER:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mydumper \
        >/dev/null 2>&1 || echo "mydumper did not install; comparing without it" >&2
fi
export PYTHONPATH="$here/..:$here/../src${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$here/mysql_bench.py" "$@"
