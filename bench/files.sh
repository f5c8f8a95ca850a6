#!/usr/bin/env bash
# keepwell vs restic vs borg on three shapes of tree, in one run: first backup, unchanged
# re-backup, re-backup after a day's changes, restore; wall time, peak memory of the process
# tree (RSS and PSS), repository size, and keepwell/restic ratios.
#
# Shapes (bench/trees.py; built once from this machine's files into bench/work/trees, at least
# 1 GB each): small (many small source files), mixed (this Python's lib/ and the installed
# packages), large (a disk image, a SQLite database, compressed archives). The change between
# the two re-backups: 3 % of files modified, 1 % deleted, 1 % added (small, mixed); 16 MiB of the
# image rewritten and 1.5 % of the database's rows updated or inserted (large).
#
# Fairness: each round copies the pristine tree afresh and starts from empty repositories; the
# page cache is dropped (sync; drop_caches) before every timed step, so every tool reads from the
# disk; restores go to fresh directories, the tools taking turns to go first (ext4 creates files
# more slowly in the minutes after many were deleted, which would penalise whoever restores first
# after a cleanup), and are deleted only once a shape is done. Medians of ROUNDS rounds; peak
# memory is the highest of the rounds.
# Usage: bench/files.sh [SHAPE...]       (default: small mixed large)
#        TREE=/some/dir bench/files.sh   (a tree of your own, read only: no changed re-backup)
# Environment: ROUNDS=3, BORG=1 (0 leaves borg out)
set -euo pipefail
cd "$(dirname "$0")/.."
# byte code compiled, as an installed package has it (PYTHONDONTWRITEBYTECODE would otherwise
# make every keepwell process compile its modules at start)
.venv/bin/python -m compileall -q src >/dev/null
ROUNDS=${ROUNDS:-3}
BORG=${BORG:-1}
SHAPES=("$@"); [ ${#SHAPES[@]} -gt 0 ] || SHAPES=(small mixed large)
[ -n "${TREE:-}" ] && SHAPES=(own)
for tool in restic borg zstd; do
    command -v $tool >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic borgbackup zstd >/dev/null; }
done
W=bench/work/files; rm -rf "$W"; mkdir -p "$W"
RES=$W/results; : > "$RES"
export KEEPWELL_PASSWORD=bench RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
KW=.venv/bin/keepwell
measure() {  # shape tool step command...
    local shape=$1 tool=$2 step=$3; shift 3
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    .venv/bin/python bench/peakmem.py "$W/t" "$@" >/dev/null 2>"$W/err" || { cat "$W/err"; exit 1; }
    read -r secs rss pss < "$W/t"; echo "$shape $tool $step $secs $rss $pss" >> "$RES"
}
tools=(keepwell restic); [ "$BORG" = 1 ] && tools+=(borg)
backup() {  # shape step tool src
    local shape=$1 step=$2 tool=$3 src=$4
    case $tool in
        keepwell) measure "$shape" keepwell "$step" $KW -q -r "$W/kw" backup "$src" ;;
        restic) measure "$shape" restic "$step" restic -q -r "$W/restic" backup "$src" ;;
        borg) measure "$shape" borg "$step" borg create --compression zstd,3 "$W/borg::$step" "$src" ;;
    esac
}
restore() {  # shape tool out
    local shape=$1 tool=$2 out=$3
    mkdir -p "$out"
    case $tool in
        keepwell) measure "$shape" keepwell restore $KW -q -r "$W/kw" restore latest --target "$out" ;;
        restic) measure "$shape" restic restore restic -q -r "$W/restic" restore latest --target "$out" ;;
        borg) measure "$shape" borg restore bash -c "cd '$out' && borg extract '$PWD/$W/borg::$last'" ;;
    esac
}
for shape in "${SHAPES[@]}"; do
    if [ "$shape" = own ]; then
        src=$(realpath "$TREE")
    else
        pristine=bench/work/trees/$shape
        [ -d "$pristine" ] || { echo "building the $shape tree (once)"; .venv/bin/python bench/trees.py build "$shape" "$pristine"; }
        src=$PWD/$W/tree
    fi
    for round in $(seq 1 "$ROUNDS"); do
        rm -rf "$W/kw" "$W/restic" "$W/borg" "$W/tree"
        [ "$shape" = own ] || cp -a "$pristine" "$W/tree"
        [ "$round" = 1 ] && echo "$shape: $(du -sh "$src" | cut -f1), $(find "$src" -type f | wc -l) files, $ROUNDS rounds"
        $KW -r "$W/kw" init >/dev/null
        restic init -q -r "$W/restic" >/dev/null
        [ "$BORG" = 1 ] && borg init -e repokey-blake2 "$W/borg" >/dev/null 2>&1
        for t in "${tools[@]}"; do backup "$shape" backup "$t" "$src"; done
        for t in "${tools[@]}"; do backup "$shape" unchanged "$t" "$src"; done
        if [ "$shape" != own ]; then
            what=$(.venv/bin/python bench/trees.py change "$shape" "$src" "$round")
            [ "$round" = 1 ] && echo "$shape: the change: $what"
            for t in "${tools[@]}"; do backup "$shape" changed "$t" "$src"; done
        fi
        last=unchanged; [ "$shape" = own ] || last=changed
        order=("${tools[@]}"); [ $((round % 2)) = 0 ] && order=(restic keepwell); [ $((round % 2)) = 0 ] && [ "$BORG" = 1 ] && order+=(borg)
        for t in "${order[@]}"; do restore "$shape" "$t" "$W/out-$t-$round"; done
        if [ "$round" = 1 ]; then
            diff -r --no-dereference "$src" "$W/out-keepwell-$round$src" >/dev/null \
                && echo "$shape: keepwell's restore verified identical to the tree" \
                || { echo "$shape: keepwell's restore DIFFERS from the tree"; exit 1; }
        fi
        for t in kw restic borg; do [ -d "$W/$t" ] && echo "$shape size $t $(du -sb "$W/$t" | cut -f1)" >> "$RES"; done
    done
    rm -rf "$W"/out-* "$W/tree"
done
.venv/bin/python - "$RES" <<'PY'
import statistics, sys
from collections import defaultdict
r = defaultdict(list); size = defaultdict(list)
for line in open(sys.argv[1]):
    p = line.split()
    if p[1] == "size": size[(p[0], p[2])].append(int(p[3]))
    else: r[(p[0], p[1], p[2])].append((float(p[3]), int(p[4]) / 1024, int(p[5]) / 1024))
shapes = list(dict.fromkeys(k[0] for k in r))
tools = [t for t in ("keepwell", "restic", "borg") if any(k[1] == t for k in r)]
steps = {"backup": "first backup", "unchanged": "unchanged re-backup",
         "changed": "re-backup after the change", "restore": "restore"}
for shape in shapes:
    print(f"\n### {shape}\n")
    print("| step | " + " | ".join(f"{t} s" for t in tools) + " | keepwell/restic | peak RSS MiB "
          + " / ".join(tools) + " | peak PSS MiB " + " / ".join(tools) + " |")
    print("|---" * (len(tools) + 4) + "|")
    for step, label in steps.items():
        if (shape, "keepwell", step) not in r:
            continue
        runs = {t: r[(shape, t, step)] for t in tools}
        med = {t: statistics.median(x[0] for x in runs[t]) for t in tools}
        rss = " / ".join(f"{max(x[1] for x in runs[t]):.0f}" for t in tools)
        pss = " / ".join(f"{max(x[2] for x in runs[t]):.0f}" for t in tools)
        print(f"| {label} | " + " | ".join(f"{med[t]:.2f}" for t in tools)
              + f" | **{med['keepwell'] / med['restic']:.2f}** | {rss} | {pss} |")
    m = 1 << 20
    sz = {t: statistics.median(size[(shape, k)]) for t, k in
          (("keepwell", "kw"), ("restic", "restic"), ("borg", "borg")) if size[(shape, k)]}
    print("| repository MiB | " + " | ".join(f"{sz[t] / m:.0f}" for t in tools)
          + f" | **{sz['keepwell'] / sz['restic']:.2f}** | | |")
    print("\nevery run (s): " + "; ".join(
        f"{t} {s}: " + " ".join(f"{x[0]:.2f}" for x in r[(shape, t, s)])
        for t in tools for s in steps if (shape, t, s) in r))
PY
