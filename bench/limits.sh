#!/usr/bin/env bash
# Hard resource limits: a backup limited to half a core and 20 MB/s of reads, alone and beside
# a PostgreSQL database under pgbench. Needs root (cgroups, the postgres user) and pgbench.
# Usage: bench/limits.sh [--data-mb N] [--scale N] [--seconds N]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$py" ] || py=python3
export PYTHONPATH="$here/../src:$here/..${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$here/limits_bench.py" "$@"
