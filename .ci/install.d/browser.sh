#!/usr/bin/env bash
# Debian's Chromium for the dashboard's browser tests (tests/integration/test_web_browser.py),
# driven by Playwright from PyPI (the dev extra). Playwright's own browser download does not work
# offline; the system Chromium does. Idempotent; runs as root on a bare Debian 12.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

if ! dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q "install ok installed"; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

/usr/bin/chromium --version
