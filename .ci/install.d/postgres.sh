#!/usr/bin/env bash
# PostgreSQL 15, its client tools, pgbench and pgBackRest for the PostgreSQL integration tests and
# bench/postgres.sh. Idempotent; runs as root on a bare Debian 12.
#
# PostgreSQL refuses to run as root, so the tests run clusters (and the archive_command that calls
# keepwell) as the unprivileged `postgres` user: that user must be able to execute the checkout's
# .venv interpreter, read the checkout and write the temporary directories the tests create.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export DEBIAN_FRONTEND=noninteractive

need=()
for pkg in postgresql-15 postgresql-contrib-15 postgresql-client-15 pgbackrest; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    apt-get update -qq
    # Debian's postinst tries to create and start a cluster; without an init system that start
    # fails harmlessly. The tests make their own clusters.
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! id postgres >/dev/null 2>&1; then
    adduser --system --group --home /var/lib/postgresql --shell /bin/bash postgres
fi

# Let `postgres` traverse (not list) every directory on the way to the interpreter and the
# checkout: a pyenv interpreter under /root is otherwise out of its reach.
grant_path() {
    local p="$1"
    while [[ "$p" != "/" && -n "$p" ]]; do
        if [[ -d "$p" ]] && ! runuser -u postgres -- test -x "$p" 2>/dev/null; then
            chmod o+x "$p"
        fi
        p="$(dirname "$p")"
    done
}
py="$here/.venv/bin/python"
if [[ -e "$py" ]]; then
    grant_path "$(dirname "$(readlink -f "$py")")"
    grant_path "$here/.venv/bin"
fi
grant_path "$here/src/keepwell/sources/postgres"
grant_path "${TMPDIR:-/tmp}"

if [[ -e "$py" ]]; then
    runuser -u postgres -- "$py" -c "import keepwell" \
        || { echo "postgres.sh: user postgres cannot run $py" >&2; exit 1; }
fi
# the archive_command fast path: installed beside the interpreter by `pip install`
fast="$here/src/keepwell/sources/postgres/keepwell-wal-push"
[[ -x "$here/.venv/bin/keepwell-wal-push" ]] && fast="$here/.venv/bin/keepwell-wal-push"
runuser -u postgres -- test -r "$fast" \
    || { echo "postgres.sh: user postgres cannot read $fast" >&2; exit 1; }
echo "postgres.sh: PostgreSQL $(/usr/lib/postgresql/15/bin/postgres --version | awk '{print $3}'), $(pgbackrest version)"
