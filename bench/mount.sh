#!/usr/bin/env bash
# `keepwell mount` (pyfuse3, and the same view through mfusepy) against `restic mount` on the
# same data: read throughput of one large file (`cat` of BIG_MB of random bytes) and `ls -lR` of
# a ~50,000-file snapshot, each on a fresh mount with the page cache dropped; median of ROUNDS
# rounds, and keepwell/restic ratios (above 1: keepwell takes longer).
#
# Measured on a shared 2-core VM, Debian 12, restic 0.14.0, pyfuse3 3.5.0, mfusepy 3.1.1, libfuse
# 3.14, a 500 MB file and this Python's lib/ (50,728 files), 1 round (machine shared, load ~6):
#                read (s)   MB/s   ls -lR (s)
#     keepwell     1.73      289     28.95      keepwell/restic: read 0.58x, ls -lR 1.18x
#     mfusepy      1.42      352     20.30      mfusepy/restic:  read 0.47x, ls -lR 0.83x
#     restic       3.01      166     24.44
#   (an earlier 2-round run, before mfusepy answered getxattr: keepwell 2.21 s / 35.9 s,
#   mfusepy 1.49 s / 19.2 s, restic 3.38 s / 29.2 s.) Both Python bindings read faster than
#   restic; the mfusepy prototype (bench/mount_mfusepy.py: path -> entry cache, no memory bound,
#   no forget) lists faster than the pyfuse3 mount. A complete mfusepy adapter (bounded memory,
#   EROFS, signals; libfuse's path interface, each path resolved from the root) was then built and
#   measured in a later run (load 4-5): read 2.74 s (restic 4.18 s: 0.66x), ls -lR 40.35 s
#   (restic 28.43 s: 1.42x), so it listed slower against restic than the pyfuse3 mount (1.18x)
#   and read no faster: pyfuse3, whose inode interface lets the kernel's lookups and forgets bound
#   the memory, is the binding shipped.
# Usage: bench/mount.sh [TREE]   (default: this Python's lib/ directory); ROUNDS=3 BIG_MB=500
#        KW and PY name the keepwell command and the Python to use (default: .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
read -r -a KW <<< "${KW:-.venv/bin/keepwell}"
TREE=${1:-$($PY -c "import sysconfig,os; print(os.path.dirname(sysconfig.get_paths()['stdlib']))")}
ROUNDS=${ROUNDS:-3}
BIG_MB=${BIG_MB:-500}
command -v restic >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic >/dev/null; }
command -v fusermount3 >/dev/null || bash .ci/install.d/fuse.sh
$PY -c "import mfusepy" 2>/dev/null || $PY -m pip install -q 'mfusepy>=3,<4'
W=$PWD/bench/work/mount; rm -rf "$W"; mkdir -p "$W/mnt"
export KEEPWELL_PASSWORD=bench RESTIC_PASSWORD=bench
head -c $((BIG_MB * 1024 * 1024)) /dev/urandom > "$W/big.bin"
echo "tree: $TREE ($(find "$TREE" -type f | wc -l) files) and a $BIG_MB MB file; $ROUNDS rounds"
"${KW[@]}" -q -r "$W/kw" init >/dev/null
"${KW[@]}" -q -r "$W/kw" backup "$W/big.bin" "$TREE" >/dev/null
restic -q -r "$W/restic" init >/dev/null
restic -q -r "$W/restic" backup "$W/big.bin" "$TREE" >/dev/null

mounted() { grep -q " $W/mnt fuse" /proc/mounts; }
start() {  # tool: mounts the repository at $W/mnt in the background
    case $1 in
        keepwell) "${KW[@]}" -q -r "$W/kw" mount "$W/mnt" 2>>"$W/log" & ;;
        mfusepy) $PY bench/mount_mfusepy.py "$W/kw" "$W/mnt" 2>>"$W/log" & ;;
        restic) restic -q -r "$W/restic" mount "$W/mnt" >>"$W/log" 2>&1 & ;;
    esac
    PID=$!
    until mounted; do kill -0 $PID 2>/dev/null || { cat "$W/log"; exit 1; }; sleep 0.05; done
}
stop() { fusermount3 -u "$W/mnt"; wait $PID || true; }
timed() {  # tool step command...: one measure on a fresh mount
    local tool=$1 step=$2; shift 2
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    start "$tool"
    local t0 t1; t0=$(date +%s.%N)
    "$@" > /dev/null
    t1=$(date +%s.%N)
    stop
    echo "$tool $step $(echo "$t1 - $t0" | bc)" >> "$W/results"
}
TOOLS=(keepwell mfusepy restic)
for round in $(seq 1 "$ROUNDS"); do
    for tool in "${TOOLS[@]}"; do
        timed "$tool" read cat "$W/mnt/snapshots/latest$W/big.bin"
        timed "$tool" ls ls -lR "$W/mnt/snapshots/latest$TREE"
    done
done
$PY - "$W/results" "$BIG_MB" <<'PYEOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
big = int(sys.argv[2])
med = {}
for tool, step, secs in rows:
    med.setdefault((tool, step), []).append(float(secs))
med = {k: statistics.median(v) for k, v in med.items()}
print(f"{'':10} {'read (s)':>9} {'MB/s':>7} {'ls -lR (s)':>11}")
for tool in ("keepwell", "mfusepy", "restic"):
    r, l = med[tool, "read"], med[tool, "ls"]
    print(f"{tool:10} {r:9.2f} {big / r:7.0f} {l:11.2f}")
for tool in ("keepwell", "mfusepy"):
    print(f"{tool}/restic: read {med[tool, 'read'] / med['restic', 'read']:.2f}x, "
          f"ls -lR {med[tool, 'ls'] / med['restic', 'ls']:.2f}x")
PYEOF
