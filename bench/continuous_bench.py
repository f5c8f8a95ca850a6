"""The measuring half of bench/continuous.sh: a writer under load, the watcher's commits, RPO.

Usage: continuous_bench.py REPO TREE FILES SECONDS RATE -- WATCH-COMMAND...

Makes TREE with FILES small files (one directory per 100), starts the watch command (which must
print one JSON line per commit), waits for its start scan, then writes RATE small files a second
for SECONDS into TREE/hot (new files and rewrites, half in new directories made on the way) and
appends 4 KiB to TREE/hot/big.log ten times a second. Afterwards, for each write, the RPO is the
time from its close() to the end of the first commit whose snapshot holds that version or a
newer one (by mtime); the watcher's CPU (its process tree) and peak RSS come from /proc.
Finally the watcher is stopped and the last snapshot compared with the tree (losses).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("KEEPWELL_PASSWORD", "bench")


def tree_pids(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, stack = [], [root]
    while stack:
        p = stack.pop()
        out.append(p)
        stack += kids.get(p, [])
    return out


def cpu_seconds(root: int) -> float:
    total = 0.0
    for p in tree_pids(root):
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            continue
    return total


def rss_mb(root: int) -> float:
    total = 0
    for p in tree_pids(root):
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    repo, tree = sys.argv[1], Path(sys.argv[2])
    files, seconds, rate = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
    command = sys.argv[sys.argv.index("--") + 1:]
    rng = random.Random(1)
    for i in range(files):
        d = tree / "base" / f"d{i // 100}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        (d / f"f{i}").write_bytes(rng.randbytes(rng.randint(100, 4000)))
    (tree / "hot").mkdir()
    log = tree.parent / "watch.jsonl"
    out = open(log, "w")
    proc = subprocess.Popen(command + [str(tree)], stdout=out, stderr=subprocess.DEVNULL)

    def commits() -> list[dict[str, object]]:
        return [json.loads(x) for x in log.read_text().splitlines() if x.strip()]

    t0 = time.monotonic()
    while not commits():
        time.sleep(0.05)
    start_scan = time.monotonic() - t0
    time.sleep(2)
    idle_cpu0 = cpu_seconds(proc.pid)
    time.sleep(5)
    idle_cpu = (cpu_seconds(proc.pid) - idle_cpu0) / 5
    idle_rss = rss_mb(proc.pid)

    writes: list[tuple[str, float, int]] = []  # path, wall time after close, mtime_ns
    cpu0 = cpu_seconds(proc.pid)
    peak_rss = idle_rss
    begin = time.time()
    n = 0
    big = tree / "hot" / "big.log"
    dirs = [tree / "hot"]
    while (now := time.time()) < begin + seconds:
        due = begin + n / rate
        if due > now:
            time.sleep(due - now)
        if n % 500 == 0:
            nd = dirs[-1] / f"n{n}" if rng.random() < 0.5 else tree / "hot" / f"n{n}"
            nd.mkdir()
            dirs.append(nd)
            peak_rss = max(peak_rss, rss_mb(proc.pid))
        if n % 100 == 0:
            with open(big, "ab") as f:
                f.write(rng.randbytes(4096))
            writes.append((str(big), time.time(), os.stat(big).st_mtime_ns))
        p = rng.choice(dirs) / f"w{rng.randrange(300)}"
        with open(p, "wb") as f:
            f.write(rng.randbytes(rng.randint(50, 2000)))
        writes.append((str(p), time.time(), os.stat(p).st_mtime_ns))
        n += 1
    wrote = time.time() - begin
    load_cpu = (cpu_seconds(proc.pid) - cpu0) / wrote
    # let the last changes be committed, then stop the watcher (it commits what is pending)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    out.close()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from keepwell.repository import open_repository

    r = open_repository(repo, os.environ["KEEPWELL_PASSWORD"])
    done = [(c["snapshot"], float(c["at"])) for c in commits() if c.get("snapshot")]  # type: ignore[arg-type]
    hot = str(tree / "hot")
    held: list[tuple[float, dict[str, int]]] = []
    for sid, at in done:
        snap = r.load_snapshot(str(sid))
        try:
            node = r.find_node(snap, hot)
        except Exception:
            continue
        assert node.subtree is not None
        mt = {f"{hot}/{p}": nd.mtime_ns for p, nd in r.walk(node.subtree.hex()) if nd.type == "file"}
        held.append((at, mt))
    rpo: list[float] = []
    missing = 0
    for path, closed, mtime in writes:
        for at, mt in held:
            if at >= closed and mt.get(path, -1) >= mtime:
                rpo.append(at - closed)
                break
        else:
            missing += 1
    # losses: the last snapshot against the tree as it is now
    last = r.load_snapshot(str(done[-1][0]))
    in_snap = {}
    for p, nd in r.walk(last):
        if nd.type == "file":
            in_snap["/" + p] = (nd.size, nd.mtime_ns)
    lost = 0
    for dirpath, _dirs, names in os.walk(tree):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if in_snap.get(os.path.join(dirpath, name)) != (st.st_size, st.st_mtime_ns):
                lost += 1
    r.close()
    print(f"tree {files} files; start scan {start_scan:.1f}s; {len(writes)} writes in {wrote:.1f}s "
          f"({len(writes) / wrote:.0f}/s); {len(done)} snapshots")
    print(f"RPO close()->committed: p50 {pct(rpo, .5) * 1000:.0f} ms, p99 {pct(rpo, .99) * 1000:.0f} ms, "
          f"max {max(rpo) * 1000:.0f} ms; writes never committed: {missing}")
    print(f"watcher CPU: idle {idle_cpu * 100:.1f}% of a core, under load {load_cpu * 100:.0f}% "
          f"of a core; RSS idle {idle_rss:.0f} MB, peak {peak_rss:.0f} MB")
    print(f"losses (files whose size/mtime differ from the last snapshot): {lost}")


if __name__ == "__main__":
    main()
