#!/usr/bin/env bash
# `keepwell watch` under a writer: RPO (a write's close() to the end of the commit of a snapshot
# holding it, p50/p99/max), the watcher's CPU and memory idle and under load, and losses (files
# whose size or mtime in the last snapshot differ from the tree). A local repository.
# See bench/continuous_bench.py for the load.
#
# Usage: bench/continuous.sh   FILES=50000 SECONDS_=30 RATE=1000 MAX_DELAY=500ms
#        KW and PY name the keepwell command and the Python to use (default: .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
read -r -a KW <<< "${KW:-.venv/bin/keepwell}"
FILES=${FILES:-50000}; SECONDS_=${SECONDS_:-30}; RATE=${RATE:-1000}; MAX_DELAY=${MAX_DELAY:-500ms}
W=$PWD/bench/work/continuous; rm -rf "$W"; mkdir -p "$W"
export KEEPWELL_PASSWORD=bench KEEPWELL_CACHE_DIR=$W/cache KEEPWELL_REPOSITORY=$W/repo
"${KW[@]}" -q init >/dev/null
echo "FILES=$FILES SECONDS=$SECONDS_ RATE=$RATE/s --max-delay $MAX_DELAY --quiet-time 100ms"
$PY bench/continuous_bench.py "$W/repo" "$W/tree" "$FILES" "$SECONDS_" "$RATE" -- \
    "${KW[@]}" -q watch --json --max-delay "$MAX_DELAY" --quiet-time 100ms
