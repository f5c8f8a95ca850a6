#!/usr/bin/env bash
# keepwell vs restic vs borg on the same tree, in one run: first backup, unchanged re-backup,
# restore; wall time, peak RSS, repository size, and keepwell/restic ratios.
# Each round starts from empty repositories; the table gives the median of ROUNDS rounds (a
# single run on a shared virtual disk varies by ±30 %), page cache dropped before every step.
# Restores go to fresh directories, in turns (keepwell first in odd rounds, restic first in even
# ones), and are deleted only at the end: ext4 creates files much more slowly in the minutes after
# many were deleted (it skips recently freed inodes), which would penalise whoever restores first.
# Usage: bench/files.sh [TREE]   (default: this Python's lib/ directory); ROUNDS=3
set -euo pipefail
cd "$(dirname "$0")/.."
TREE=${1:-$(.venv/bin/python -c "import sysconfig,os; print(os.path.dirname(sysconfig.get_paths()['stdlib']))")}
ROUNDS=${ROUNDS:-3}
for tool in restic borg; do
    command -v $tool >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic borgbackup >/dev/null; }
done
W=bench/work/files; rm -rf "$W"; mkdir -p "$W"
export KEEPWELL_PASSWORD=bench RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
measure() {  # name step command...
    local name=$1 step=$2; shift 2
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    .venv/bin/python bench/peakmem.py "$W/t" "$@" >/dev/null 2>"$W/err" || { cat "$W/err"; exit 1; }
    read -r secs rss pss < "$W/t"; echo "$name $step $secs $rss $pss" >> "$W/results"
}
echo "tree: $TREE ($(du -sh "$TREE" | cut -f1), $(find "$TREE" -type f | wc -l) files), $ROUNDS rounds"
for round in $(seq 1 "$ROUNDS"); do
    rm -rf "$W/kw" "$W/restic" "$W/borg"
    .venv/bin/keepwell -r "$W/kw" init >/dev/null
    restic init -q -r "$W/restic" >/dev/null
    borg init -e repokey-blake2 "$W/borg" >/dev/null 2>&1
    measure keepwell backup .venv/bin/keepwell -q -r "$W/kw" backup "$TREE"
    measure restic backup restic -q -r "$W/restic" backup "$TREE"
    measure borg backup borg create --compression zstd,3 "$W/borg::a" "$TREE"
    measure keepwell rebackup .venv/bin/keepwell -q -r "$W/kw" backup "$TREE"
    measure restic rebackup restic -q -r "$W/restic" backup "$TREE"
    measure borg rebackup borg create --compression zstd,3 "$W/borg::b" "$TREE"
    kw_restore() { measure keepwell restore .venv/bin/keepwell -q -r "$W/kw" restore latest --target "$W/out-kw-$round"; }
    restic_restore() { measure restic restore restic -q -r "$W/restic" restore latest --target "$W/out-restic-$round"; }
    if [ $((round % 2)) = 1 ]; then kw_restore; restic_restore; else restic_restore; kw_restore; fi
    mkdir -p "$W/out-borg-$round"; measure borg restore bash -c "cd $W/out-borg-$round && borg extract ../borg::b"
    diff -rq "$TREE" "$W/out-kw-$round$TREE" >/dev/null && echo "round $round: keepwell restore verified byte-identical"
done
for t in kw restic borg; do echo "size $t $(du -sb "$W/$t" | cut -f1)" >> "$W/results"; done
rm -rf "$W"/out-*
.venv/bin/python - "$W/results" <<'PY'
import statistics, sys
from collections import defaultdict
r = defaultdict(list); size = {}
for line in open(sys.argv[1]):
    p = line.split()
    if p[0] == "size": size[p[1]] = int(p[2])
    else: r[(p[0], p[1])].append((float(p[2]), int(p[3]) / 1024, int(p[4]) / 1024))
def med(key):
    runs = r[key]
    return (statistics.median(t for t, _, _ in runs), max(m for _, m, _ in runs),
            max(m for _, _, m in runs), runs)
print("| step | keepwell s | restic s | borg s | keepwell/restic | peak RSS MiB kw / restic / borg"
      " | peak PSS MiB kw / restic / borg |")
print("|---|---|---|---|---|---|---|")
for step in ("backup", "rebackup", "restore"):
    k, rs, b = med(("keepwell", step)), med(("restic", step)), med(("borg", step))
    print(f"| {step} | {k[0]:.2f} | {rs[0]:.2f} | {b[0]:.2f} | {k[0]/rs[0]:.2f} "
          f"| {k[1]:.0f} / {rs[1]:.0f} / {b[1]:.0f} | {k[2]:.0f} / {rs[2]:.0f} / {b[2]:.0f} |")
m = 1024 * 1024
print(f"| repository MiB | {size['kw']/m:.0f} | {size['restic']/m:.0f} | {size['borg']/m:.0f} | {size['kw']/size['restic']:.2f} | | |")
print()
print("every run (s): " + "; ".join(
    f"{n} {s}: " + " ".join(f"{t:.2f}" for t, _, _ in runs) for (n, s), runs in sorted(r.items())))
PY
