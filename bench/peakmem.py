"""Run a command; print its wall time (s) and the peak resident memory (KiB) of its whole
process tree: the largest sum of VmRSS over the command and its descendants, sampled every
50 ms (and never less than the largest single process, from the kernel's own count).

keepwell stores small files in worker processes, so the memory of one process (what
`/usr/bin/time -f %M` reports) would understate its footprint; this counts them all.
Usage: peakmem.py OUTFILE COMMAND...   (OUTFILE gets "seconds kib")
"""

import os
import resource
import subprocess
import sys
import time


def tree_rss(root: int) -> int:
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[2:]
    start = time.monotonic()
    p = subprocess.Popen(cmd)
    peak = 0
    while p.poll() is None:
        peak = max(peak, tree_rss(p.pid))
        time.sleep(0.25)
    secs = time.monotonic() - start
    single = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(out, "w") as f:
        f.write(f"{secs:.2f} {max(peak, single)}\n")
    return p.returncode


if __name__ == "__main__":
    sys.exit(main())
