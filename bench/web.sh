#!/usr/bin/env bash
# Page render times of the web dashboard over a job history of 10,000 jobs.
# Usage: bench/web.sh [--jobs N] [--requests N]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$py" ] || py=python3
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$here/web_bench.py" "$@"
