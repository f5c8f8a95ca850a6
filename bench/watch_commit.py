"""The CPU of a watcher's commits, in process: what a commit costs per change, apart from the
machine's other work (CPU seconds, not wall time), with an optional cProfile of the last ones.

Usage: watch_commit.py [--work DIR] [--dirs 500] [--files-per-dir 100] [--changes 1700]
                       [--commits 8] [--log] [--profile]

The tree: DIRS directories of FILES small files (100-4,000 bytes), and with --log a 64 MiB file
appended to before every commit (a log written while the watcher runs). Each commit rewrites
CHANGES random files (about 480 of 500 directories touched at 1,700), marks them as the event
loop would, and commits; printed: CPU and wall seconds of each commit (its children included)
and, with --profile, the functions of the second half of the commits by their own time.
Keepwell runs from this checkout's src/.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from keepwell.backends.local import LocalBackend  # noqa: E402
from keepwell.repository import Repository  # noqa: E402
from keepwell.sources.files.journal import Journal  # noqa: E402
from keepwell.sources.files.select import Selection  # noqa: E402
from keepwell.sources.files.watch import Watcher, WatchOptions  # noqa: E402


def cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "watch-commit"))
    ap.add_argument("--dirs", type=int, default=500)
    ap.add_argument("--files-per-dir", type=int, default=100)
    ap.add_argument("--changes", type=int, default=1700)
    ap.add_argument("--commits", type=int, default=8)
    ap.add_argument("--log", action="store_true", help="a 64 MiB file appended to each time")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    work = Path(a.work)
    tree = work / "tree"
    rng = random.Random(1)
    if not tree.exists():
        for d in range(a.dirs):
            (tree / f"d{d:04}").mkdir(parents=True)
            for f in range(a.files_per_dir):
                (tree / f"d{d:04}" / f"f{f:04}").write_bytes(rng.randbytes(rng.randint(100, 4000)))
    log = tree / "big.log"
    if a.log and not log.exists():
        log.write_bytes(os.urandom(64 << 20))
    for old in ("repo", "journal"):
        shutil.rmtree(work / old, ignore_errors=True)
    Repository.init(LocalBackend(str(work / "repo")), "bench")
    repo = Repository.open(LocalBackend(str(work / "repo")), "bench")
    (work / "journal").mkdir()
    w = Watcher(repo, [str(tree)], Journal(str(work / "journal" / "journal")), Selection(),
                WatchOptions())
    started = time.perf_counter()
    w.commit(scan_all=True)
    print(f"start scan: {time.perf_counter() - started:.2f} s")
    prof = cProfile.Profile()
    for i in range(a.commits):
        if a.log:
            with open(log, "ab") as f:
                f.write(os.urandom(4096))
            w._mark(str(log))
        for _ in range(a.changes):
            p = tree / f"d{rng.randrange(a.dirs):04}" / f"f{rng.randrange(a.files_per_dir):04}"
            p.write_bytes(rng.randbytes(rng.randint(100, 4000)))
            w._mark(str(p))
        c0, t0 = cpu(), time.perf_counter()
        profiled = a.profile and i >= a.commits // 2
        if profiled:
            prof.enable()
        w.commit()
        if profiled:
            prof.disable()
        c = w.last_commit
        print(f"commit {i + 1}: {cpu() - c0:.3f} CPU s, {time.perf_counter() - t0:.3f} s; "
              f"{c['changes']} changes, {c['trees_written']} trees written, "
              f"{c['files_read']} files read, trees read from storage so far {repo.trees_read}"
              + (" (profiled)" if profiled else ""))
    if a.profile:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    os.environ.setdefault("KEEPWELL_TESTONLY_WEAK_KDF", "1")  # the key derivation is not measured
    main()
