#!/usr/bin/env bash
# Fleet mode at scale: a Temporal dev server, one worker per site, many tiny file sources
# scheduled at the same second; schedule lateness (p50/p99/max) and overhead per job.
# Usage: bench/fleet.sh [--sources 1000] [--sites 10] [--workers-per-site 1] [--lead S] [--weak-kdf]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$py" ] || py=python3
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$here/fleet_bench.py" "$@"
