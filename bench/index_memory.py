"""Open a repository whose index holds N blobs (default 10 million) and deduplicate against it;
print load time, lookup rate, resident memory and bytes per blob.

Usage: .venv/bin/python bench/index_memory.py [N]
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("KEEPWELL_TESTONLY_WEAK_KDF", "1")

from keepwell.backends.local import LocalBackend  # noqa: E402
from keepwell.repository import Repository  # noqa: E402
from keepwell.repository.index import ENTRY_DTYPE, IndexContent  # noqa: E402


def build(path: str, n: int) -> None:
    repo = Repository.init(LocalBackend(path), "pw")
    rng = np.random.default_rng(1)
    per_file, per_pack = 500_000, 1_000
    for start in range(0, n, per_file):
        count = min(per_file, n - start)
        entries = np.zeros(count, dtype=ENTRY_DTYPE)
        entries["id"] = np.frombuffer(rng.bytes(32 * count), "V32")
        entries["pack"] = np.arange(count) // per_pack
        entries["offset"] = (np.arange(count) % per_pack) * 16384
        entries["length"] = 16384
        entries["raw"] = 40000
        packs = [rng.bytes(32) for _ in range((count + per_pack - 1) // per_pack)]
        repo.write_index(IndexContent(packs, [0] * len(packs), entries, []))
        if start == 0:
            np.save(os.path.join(path, "probe.npy"), entries["id"][:100_000].copy())


def measure(path: str) -> None:
    from keepwell.memory import tune_malloc

    tune_malloc()  # as the keepwell command does at start
    t0 = time.perf_counter()
    repo = Repository.open(LocalBackend(path), "pw")
    index = repo.index
    t1 = time.perf_counter()
    probe = np.load(os.path.join(path, "probe.npy"))
    known = [p.tobytes() for p in probe]
    unknown = [os.urandom(32) for _ in range(100_000)]
    t2 = time.perf_counter()
    hits = sum(index.has(b) for b in known) + sum(index.has(b) for b in unknown)
    t3 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = len(index)
    print(f"blobs in index:        {n:,}")
    print(f"index load:            {t1 - t0:.1f} s")
    print(f"lookups:               {200_000 / (t3 - t2):,.0f} per second ({hits:,} of 200,000 found)")
    print(f"in-memory index:       {index.nbytes() / n:.0f} bytes per blob")
    print(f"peak resident memory:  {rss:,.0f} MiB (whole process)")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        measure(sys.argv[2])
        sys.exit(0)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000_000
    with tempfile.TemporaryDirectory(prefix="kw-index-bench-") as tmp:
        t = time.perf_counter()
        build(tmp, n)
        print(f"built an index of {n:,} blobs in {time.perf_counter() - t:.1f} s")
        subprocess.run([sys.executable, __file__, "--measure", tmp], check=True)
