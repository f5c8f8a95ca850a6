#!/usr/bin/env bash
# Azurite, Microsoft's Azure Storage emulator, for the az:// backend tests. Idempotent.
#
# It comes from the npm registry into a directory of its own, /opt/keepwell-azurite (override
# with KEEPWELL_AZURITE_PREFIX); the tests (tests/servers/azurite.py) run its azurite-blob from
# there on a free port of 127.0.0.1 with a throwaway data directory, and never start a service.
# Needs Node.js >= 18 and npm; on a bare Debian 12 they come from Debian's nodejs and npm.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
PREFIX="${KEEPWELL_AZURITE_PREFIX:-/opt/keepwell-azurite}"
BIN="$PREFIX/node_modules/.bin/azurite-blob"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

if [[ ! -x "$BIN" ]]; then
    mkdir -p "$PREFIX"
    npm install --prefix "$PREFIX" --no-audit --no-fund --loglevel=error azurite@3 >/dev/null
fi

echo "azurite $("$BIN" --version 2>/dev/null | tail -n 1) (node $(node --version)) in $PREFIX"
