#!/usr/bin/env bash
# The control plane's own overhead: a real daemon drives 1,000 tiny file jobs.
# Usage: bench/control.sh [--jobs N] [--sources N] [--concurrency N]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$py" ] || py=python3
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$here/control_bench.py" "$@"
