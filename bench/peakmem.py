"""Run a command; print its wall time (s) and the peak memory (KiB) of its whole process tree,
sampled every 50 ms, in two measures:

- RSS: the largest sum of VmRSS over the command and its descendants (never less than the
  largest single process, from the kernel's own count). Pages that several processes share
  (the interpreter, the native libraries) are counted once per process.
- PSS: the largest sum of the proportional set sizes (/proc/PID/smaps_rollup), where a shared
  page is split between the processes that map it: what the tree as a whole holds in memory.

keepwell stores small files in worker processes, so the memory of one process (what
`/usr/bin/time -f %M` reports) would understate its footprint; this counts them all. For a
single process the two measures differ only by its share of pages other processes also map.
Usage: peakmem.py OUTFILE COMMAND...   (OUTFILE gets "seconds rss_kib pss_kib")
"""

import os
import resource
import subprocess
import sys
import time


def _field(path: str, name: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(name):
                return int(line.split()[1])
    return 0


def tree_memory(root: int) -> tuple[int, int]:
    rss = pss = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            rss += _field(f"/proc/{pid}/status", "VmRSS:")
            pss += _field(f"/proc/{pid}/smaps_rollup", "Pss:")
        except OSError:
            pass
    return rss, pss


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[2:]
    start = time.monotonic()
    p = subprocess.Popen(cmd)
    peak_rss = peak_pss = 0
    while p.poll() is None:
        rss, pss = tree_memory(p.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.05)
    secs = time.monotonic() - start
    single = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(out, "w") as f:
        f.write(f"{secs:.2f} {max(peak_rss, single)} {peak_pss}\n")
    return p.returncode


if __name__ == "__main__":
    sys.exit(main())
