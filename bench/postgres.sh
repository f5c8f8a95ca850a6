#!/usr/bin/env bash
# keepwell vs pgBackRest on one PostgreSQL cluster (pgbench scale SCALE, default 50).
#
# Measures, in the same run on the same cluster: first physical backup (time, repository size),
# restore time, second backup after a pgbench workload (time, repository growth: keepwell's full
# backup with dedup vs pgBackRest's incremental), and WAL archive throughput through
# archive_command (segments per second, synchronous and asynchronous).
#
# keepwell's repository is always encrypted, so pgBackRest's is too (repo1-cipher-type
# aes-256-cbc), as a user wanting the same protection would set it; PGBR_ENCRYPT=0 measures
# pgBackRest without encryption.
#
# Run as root from the checkout (servers run as the `postgres` user): bash bench/postgres.sh
# Needs .ci/install.d/postgres.sh to have run. Leaves nothing behind but bench/work/.
#
# PARTS chooses what is measured (default "backup restore wal"): `backup` (both backups and the
# repository growth), `restore` (RESTORES restores per tool, default 3, in turns; the median is
# reported; without `backup` a first backup of each is made untimed), `wal` (every archive rate),
# `wal-async` (only the two asynchronous rates). KW_PUSH overrides the archive_command fast path
# (e.g. the checkout's src/keepwell/sources/postgres/keepwell-wal-push).
set -euo pipefail

SCALE="${SCALE:-50}"
WORKLOAD_SECONDS="${WORKLOAD_SECONDS:-30}"
SEGMENTS="${SEGMENTS:-64}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$here/.venv/bin/python"
HOOK="$here/.venv/bin/keepwell-wal"
[[ -x "$HOOK" ]] || HOOK="$PY -m keepwell.sources.postgres.walcommand"
# archive_command as `keepwell postgres archive-command` prints it: the shell fast path
# PostgreSQL runs archive_command in its data directory: a relative KW_PUSH is made absolute
[[ -n "${KW_PUSH:-}" && "$KW_PUSH" != /* ]] && KW_PUSH="$PWD/$KW_PUSH"
PUSH="${KW_PUSH:-$here/.venv/bin/keepwell-wal-push}"
if [[ -z "${KW_PUSH:-}" && ! -x "$PUSH" ]]; then
    if [[ -x "$here/.venv/bin/keepwell-wal" ]]; then
        PUSH="env KEEPWELL_WAL_HOOK=$HOOK /bin/sh $here/src/keepwell/sources/postgres/keepwell-wal-push"
    else
        PUSH="$HOOK push"
    fi
fi
HOOK_ENV=""  # the checkout's fast path calls the installed hook
[[ -n "${KW_PUSH:-}" ]] && HOOK_ENV="KEEPWELL_WAL_HOOK=$HOOK"
PARTS="${PARTS:-backup restore wal}"   # what to measure (see above)
RESTORES="${RESTORES:-3}"
PGBR_ENCRYPT="${PGBR_ENCRYPT:-1}"
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
PORT="${PORT:-55432}"
W="$(mktemp -d /tmp/kw-bench-pg-XXXXXX)"
chmod 755 "$W"; chown postgres: "$W"
RESULTS="$here/bench/work/postgres-results.md"
mkdir -p "$here/bench/work"

as_pg() { runuser -u postgres -- env KEEPWELL_REPOSITORY="$W/kw-repo" \
    KEEPWELL_PASSWORD_FILE="$W/password" PGHOST=127.0.0.1 PGPORT="$PORT" PGUSER=postgres "$@"; }
# the keepwell command, as the postgres user would run it (found once: a probe inside kw() would
# add an interpreter start to every timed step)
KW_CLI=("$PY" -c "import sys; from keepwell.cli.main import run; sys.argv=['keepwell']+sys.argv[1:]; sys.exit(run())" postgres)
kw() { as_pg "${KW_CLI[@]}" "$@"; }
pgbr() { as_pg pgbackrest --config="$W/pgbackrest.conf" --stanza=bench "$@"; }
psql_() { as_pg "$BIN/psql" -X -q -d postgres -At -c "$1"; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
size_mb() { du -sb "$1" | awk '{ printf "%.1f", $1 / 1048576 }'; }
minus() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a - b }'; }
cleanup() {
    as_pg "$BIN/pg_ctl" -D "$W/pg" -m immediate stop >/dev/null 2>&1 || true
    [[ -f "$W/kw-spool/uploader.lock" ]] && kill -9 "$(head -1 "$W/kw-spool/uploader.lock")" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

echo "bench-password" > "$W/password"; chown postgres: "$W/password"; chmod 600 "$W/password"
as_pg "$PY" -c "
import os
from keepwell.backends.registry import open_backend
from keepwell.repository import Repository
Repository.init(open_backend(os.environ['KEEPWELL_REPOSITORY']), 'bench-password').close()"

mkdir -p "$W/pgbr-repo" "$W/pgbr-spool" "$W/pgbr-log"; chown -R postgres: "$W"
cat > "$W/pgbackrest.conf" <<CONF
[global]
repo1-path=$W/pgbr-repo
repo1-retention-full=10
process-max=2
compress-type=zst
compress-level=3
start-fast=y
archive-async=y
spool-path=$W/pgbr-spool
log-path=$W/pgbr-log
lock-path=$W/pgbr-log
log-level-console=warn
$([[ $PGBR_ENCRYPT = 1 ]] && printf 'repo1-cipher-type=aes-256-cbc\nrepo1-cipher-pass=bench-password')
[bench]
pg1-path=$W/pg
pg1-port=$PORT
pg1-socket-path=$W
CONF
chown postgres: "$W/pgbackrest.conf"

KW_ASYNC="$PUSH --async --spool $W/kw-spool %p"
as_pg "$BIN/initdb" -D "$W/pg" -A trust -U postgres --no-sync >/dev/null
cat >> "$W/pg/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$W'
port = $PORT
wal_level = replica
max_wal_size = '8GB'
shared_buffers = '256MB'
archive_mode = on
archive_command = 'env $HOOK_ENV KEEPWELL_REPOSITORY=$W/kw-repo KEEPWELL_PASSWORD_FILE=$W/password $KW_ASYNC && pgbackrest --config=$W/pgbackrest.conf --stanza=bench archive-push %p'
CONF
as_pg "$BIN/pg_ctl" -D "$W/pg" -l "$W/pg.log" -w start >/dev/null
pgbr stanza-create
echo "building pgbench scale $SCALE ..."
as_pg "$BIN/pgbench" -i -q -s "$SCALE" postgres >/dev/null 2>&1
psql_ "CHECKPOINT"
DB_MB=$(psql_ "SELECT pg_database_size('postgres') / 1048576")

wait_archived() {  # no pipe here: under pipefail, `ls | grep -q` fails when grep quits first
    while compgen -G "$W/pg/pg_wal/archive_status/*.ready" >/dev/null; do sleep 0.05; done
}
wait_archived
wait_uploaded() {  # keepwell's asynchronous push acknowledges from its spool: sizes are measured
    # once the spool has been uploaded (pgBackRest's asynchronous push stores before it acknowledges)
    while compgen -G "$W/kw-spool/ready/*" >/dev/null; do sleep 0.05; done
}

KW_FULL=- KW_SIZE1=0 BR_FULL=- BR_SIZE1=0 KW_SECOND=- KW_SIZE2=0 BR_INCR=- BR_SIZE2=0
KW_RESTORE=- BR_RESTORE=-
if [[ " $PARTS " == *" backup "* ]]; then
# 1. first backups
psql_ "CHECKPOINT"; sync; t0=$(now); kw backup --physical >/dev/null; t1=$(now)
KW_FULL=$(secs "$t0" "$t1")
psql_ "CHECKPOINT"; sync; t0=$(now); pgbr --type=full backup; t1=$(now)
BR_FULL=$(secs "$t0" "$t1")
wait_archived; wait_uploaded; KW_SIZE1=$(size_mb "$W/kw-repo"); BR_SIZE1=$(size_mb "$W/pgbr-repo")

# 2. workload, then second backups
as_pg "$BIN/pgbench" -n -c 4 -j 2 -T "$WORKLOAD_SECONDS" postgres >/dev/null 2>&1
wait_archived
psql_ "CHECKPOINT"; sync; t0=$(now); kw backup --physical >/dev/null; t1=$(now)
KW_SECOND=$(secs "$t0" "$t1")
psql_ "CHECKPOINT"; sync; t0=$(now); pgbr --type=incr backup; t1=$(now)
BR_INCR=$(secs "$t0" "$t1")
wait_archived; wait_uploaded; KW_SIZE2=$(size_mb "$W/kw-repo"); BR_SIZE2=$(size_mb "$W/pgbr-repo")

fi

# 3. restores (data directory only, no recovery run). Every timed step starts with `sync`, so
# neither tool pays for the other's writes still on their way to disk. RESTORES of each, in
# turns (keepwell, pgBackRest, pgBackRest, keepwell, ...), into fresh directories; the median is
# reported (a single restore on this shared disk varies by ±20 %).
if [[ " $PARTS " == *" restore "* ]]; then
if [[ " $PARTS " != *" backup "* ]]; then
    psql_ "CHECKPOINT"; kw backup --physical >/dev/null; pgbr --type=full backup
    wait_archived; wait_uploaded
fi
restore_kw() {
    mkdir -p "$W/r-kw-$1"; chown postgres: "$W/r-kw-$1"; chmod 700 "$W/r-kw-$1"
    sync; t0=$(now); kw restore --target-dir "$W/r-kw-$1" --immediate >/dev/null; t1=$(now)
    KW_RESTORES+=" $(secs "$t0" "$t1")"; rm -rf "$W/r-kw-$1"
}
restore_br() {
    mkdir -p "$W/r-br-$1"; chown postgres: "$W/r-br-$1"; chmod 700 "$W/r-br-$1"
    sync; t0=$(now); pgbr --pg1-path="$W/r-br-$1" --type=immediate restore; t1=$(now)
    BR_RESTORES+=" $(secs "$t0" "$t1")"; rm -rf "$W/r-br-$1"
}
KW_RESTORES="" BR_RESTORES=""
for i in $(seq "$RESTORES"); do
    if (( i % 2 )); then restore_kw "$i"; restore_br "$i"; else restore_br "$i"; restore_kw "$i"; fi
done
median() { echo "$1" | tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 } END {
    if (NR % 2) printf "%.1f", v[(NR + 1) / 2]; else printf "%.1f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
KW_RESTORE="$(median "$KW_RESTORES") s (runs:$KW_RESTORES)" BR_RESTORE="$(median "$BR_RESTORES") s (runs:$BR_RESTORES)"
fi

# 4. WAL archive throughput: make SEGMENTS ready segments, then let one archive_command drain them
psql_ "CREATE TABLE IF NOT EXISTS walfill (v text)"
stop_uploader() {  # each run starts cold, as pgBackRest's async process does
    local lock="$W/kw-spool/uploader.lock" pid i
    [[ -f "$lock" ]] || return 0
    for i in $(seq 50); do
        flock -n "$lock" true && return 0
        pid="$(head -1 "$lock")"
        if [[ -n "$pid" ]] && grep -q "$W/kw-spool" "/proc/$pid/cmdline" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null || true
        fi
        sleep 0.1
    done
}
archive_rate() {  # $1 = archive_command
    psql_ "ALTER SYSTEM SET archive_command = '/bin/false'" >/dev/null
    psql_ "SELECT pg_reload_conf()" >/dev/null
    sleep 0.5
    stop_uploader
    while :; do
        psql_ "INSERT INTO walfill SELECT md5(random()::text) || repeat(md5(g::text), 3) FROM generate_series(1, 60000) g"
        local n; n=$(ls "$W/pg/pg_wal/archive_status/" | grep -c '\.ready$' || true)
        (( n >= SEGMENTS )) && break
    done
    psql_ "TRUNCATE walfill" >/dev/null
    local n; n=$(ls "$W/pg/pg_wal/archive_status/" | grep -c '\.ready$')
    local cmd="${1//\'/\'\'}"
    local t0; t0=$(now)
    psql_ "ALTER SYSTEM SET archive_command = '$cmd'" >/dev/null
    psql_ "SELECT pg_reload_conf()" >/dev/null
    wait_archived
    local t1; t1=$(now)
    awk -v n="$n" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", n / (b - a) }'
}
KW_DIRECT_RATE=- KW_SYNC_RATE=- KW_ASYNC_RATE=- BR_SYNC_RATE=- BR_ASYNC_RATE=- CP_RATE=-
ENVP="env $HOOK_ENV KEEPWELL_REPOSITORY=$W/kw-repo KEEPWELL_PASSWORD_FILE=$W/password"
if [[ " $PARTS " == *" wal "* ]]; then
KW_DIRECT_RATE=$(archive_rate "$ENVP $HOOK push %p")
KW_SYNC_RATE=$(archive_rate "$ENVP $PUSH --spool $W/kw-spool %p")
fi
if [[ " $PARTS " == *" wal "* || " $PARTS " == *" wal-async "* ]]; then
KW_ASYNC_RATE=$(archive_rate "$ENVP $PUSH --async --spool $W/kw-spool %p")
fi
if [[ " $PARTS " == *" wal "* ]]; then
BR_SYNC_RATE=$(archive_rate "pgbackrest --config=$W/pgbackrest.conf --stanza=bench --no-archive-async archive-push %p")
fi
if [[ " $PARTS " == *" wal "* || " $PARTS " == *" wal-async "* ]]; then
BR_ASYNC_RATE=$(archive_rate "pgbackrest --config=$W/pgbackrest.conf --stanza=bench archive-push %p")
fi
if [[ " $PARTS " == *" wal "* ]]; then
CP_RATE=$(archive_rate "cp %p $W/cp-%f")
fi

{
echo "### PostgreSQL: keepwell vs pgBackRest $(pgbackrest version | awk '{print $2}') ($([[ $PGBR_ENCRYPT = 1 ]] && echo "encrypted, aes-256-cbc" || echo "not encrypted"))"
echo
echo "pgbench scale $SCALE (database $DB_MB MiB), $(nproc) cores; workload: pgbench -c 4 -T $WORKLOAD_SECONDS;"
echo "pgBackRest process-max 2, zstd 3; keepwell defaults. $(date -u +%Y-%m-%d)."
echo
echo "| measure | keepwell | pgBackRest |"
echo "|---|---|---|"
echo "| first physical backup | ${KW_FULL} s | ${BR_FULL} s (full) |"
echo "| repository after it (backup + WAL) | ${KW_SIZE1} MiB | ${BR_SIZE1} MiB |"
echo "| second backup after the workload | ${KW_SECOND} s (full, deduplicated) | ${BR_INCR} s (incremental) |"
echo "| repository growth (backup + WAL of the workload) | $(minus "$KW_SIZE2" "$KW_SIZE1") MiB | $(minus "$BR_SIZE2" "$BR_SIZE1") MiB |"
echo "| restore (data directory, median of $RESTORES) | ${KW_RESTORE} | ${BR_RESTORE} |"
echo "| WAL archive, synchronous | ${KW_SYNC_RATE} segments/s (through the uploader; ${KW_DIRECT_RATE}/s opening the repository per segment) | ${BR_SYNC_RATE} segments/s |"
echo "| WAL archive, asynchronous | ${KW_ASYNC_RATE} segments/s | ${BR_ASYNC_RATE} segments/s |"
echo
echo "(\`cp\` as archive_command: ${CP_RATE} segments/s; $SEGMENTS segments per run)"
} | tee "$RESULTS"
