#!/usr/bin/env bash
# How keepwell's and restic's costs grow with the number of files: generated trees of 100,000,
# 300,000 and 1,000,000 small files (0.5-2 KiB of text, in directories of 1 to a few hundred
# files, three levels deep), and 1,000,000 files as 10,000 directories of 100 files. For each:
# first backup, unchanged re-backup and restore, wall time and the peak memory of the process
# tree (RSS and PSS), page cache dropped before every step. Prints a table and writes the plots
# docs/images/growth-time.svg and docs/images/growth-memory.svg (bench/growth_plot.py).
# Usage: bench/growth.sh [COUNT...]   (default: 100000 300000 1000000; DIRS=0 leaves out the
#        10,000 x 100 tree)
set -euo pipefail
cd "$(dirname "$0")/.."
# byte code compiled, as an installed package has it (PYTHONDONTWRITEBYTECODE would otherwise
# make every keepwell process compile its modules at start)
.venv/bin/python -m compileall -q src >/dev/null
COUNTS=("$@"); [ ${#COUNTS[@]} -gt 0 ] || COUNTS=(100000 300000 1000000)
DIRS=${DIRS:-1}
command -v restic >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic >/dev/null; }
W=bench/work/growth; rm -rf "$W"; mkdir -p "$W"
RES=$W/results; : > "$RES"
export KEEPWELL_PASSWORD=bench RESTIC_PASSWORD=bench
KW=.venv/bin/keepwell
measure() {  # tree files tool step command...
    local tree=$1 files=$2 tool=$3 step=$4; shift 4
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    .venv/bin/python bench/peakmem.py "$W/t" "$@" >/dev/null 2>"$W/err" || { cat "$W/err"; exit 1; }
    read -r secs rss pss < "$W/t"; echo "$tree $files $tool $step $secs $rss $pss" >> "$RES"
    echo "  $tree $files $tool $step: $secs s, $((rss / 1024)) MiB RSS, $((pss / 1024)) MiB PSS"
}
trees=(); for n in "${COUNTS[@]}"; do trees+=("mixed:$n"); done
[ "$DIRS" = 1 ] && trees+=("dirs:1000000")
turn=0
for spec in "${trees[@]}"; do
    kind=${spec%%:*}; n=${spec#*:}
    src=$PWD/bench/work/trees/gen-$kind-$n
    if [ ! -d "$src" ]; then
        echo "generating $n files ($kind)"
        opt=(); [ "$kind" = dirs ] && opt=(--dirs 10000)
        rm -rf "$src.tmp"; .venv/bin/python bench/trees.py generate "$src.tmp" "$n" "${opt[@]}"; mv "$src.tmp" "$src"
    fi
    rm -rf "$W/kw" "$W/restic"
    $KW -r "$W/kw" init >/dev/null; restic init -q -r "$W/restic" >/dev/null
    measure "$kind" "$n" keepwell backup $KW -q -r "$W/kw" backup "$src"
    measure "$kind" "$n" restic backup restic -q -r "$W/restic" backup "$src"
    measure "$kind" "$n" keepwell rebackup $KW -q -r "$W/kw" backup "$src"
    measure "$kind" "$n" restic rebackup restic -q -r "$W/restic" backup "$src"
    # restores go to fresh directories, deleted only at the end (ext4 creates files slowly for a
    # minute after many were deleted), the tools taking turns to go first
    kw_restore() { measure "$kind" "$n" keepwell restore $KW -q -r "$W/kw" restore latest --target "$W/out-kw-$kind-$n"; }
    restic_restore() { measure "$kind" "$n" restic restore restic -q -r "$W/restic" restore latest --target "$W/out-restic-$kind-$n"; }
    turn=$((turn + 1))
    if [ $((turn % 2)) = 1 ]; then kw_restore; restic_restore; else restic_restore; kw_restore; fi
    [ "$(find "$W/out-kw-$kind-$n$src" -type f | wc -l)" = "$n" ] || { echo "keepwell restored the wrong number of files"; exit 1; }
done
rm -rf "$W"/out-*
.venv/bin/python bench/growth_plot.py "$RES" docs/images
