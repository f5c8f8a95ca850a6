"""The vectorised lookups agree with the one-at-a-time ones, for ids in the sorted array, ids
only added since the last fold, and ids the index does not hold."""

from __future__ import annotations

import os

import numpy as np

from keepwell.repository.index import ENTRY_DTYPE, IndexContent, MasterIndex


def test_lookup_many_and_has_each_match_lookup() -> None:
    n = 1000
    ids = [os.urandom(32) for _ in range(n)]
    entries = np.zeros(n, dtype=ENTRY_DTYPE)
    entries["id"] = np.frombuffer(b"".join(ids), "V32")
    entries["pack"] = np.arange(n) % 3
    entries["offset"] = np.arange(n) * 7
    entries["length"], entries["raw"] = 5, 9
    index = MasterIndex()
    index.stage("a", IndexContent([b"p" * 32, b"q" * 32, b"r" * 32], [0, 0, 1], entries, []))
    index.finish()
    added = os.urandom(32)
    index.add(added, b"s" * 32, 0, 1, 2, 3, 0)
    probe = ids[::7] + [added, os.urandom(32)]
    single = [index.lookup(b) for b in probe]
    assert index.lookup_many(probe) == single
    assert index.has_each(probe) == [loc is not None for loc in single]
    assert sum(loc is not None for loc in single) == len(ids[::7]) + 1
    assert single[-2] is not None and single[-2].pack == b"s" * 32 and single[-1] is None
