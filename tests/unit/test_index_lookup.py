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


def test_index_with_additions_only_answers_without_numpy_and_encodes_like_numpy() -> None:
    """A worker's index starts empty and only adds: lookups, counts and the index object it
    writes must work before any fold, and the NumPy-free encoding of entries must give the very
    bytes the NumPy record array gives (the format is one)."""
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "from keepwell.repository.index import MasterIndex\n"
        "from keepwell.repository.packer import PackEntry, StoredPack, index_content\n"
        "from keepwell.repository.index import encode_index\n"
        "i = MasterIndex()\n"
        "a, b = os.urandom(32), os.urandom(32)\n"
        "assert not i.has(a) and i.lookup(a) is None and len(i) == 0 and i.nbytes() == 0\n"
        "assert i.lookup_many([a]) == [None] and i.has_each([a]) == [False]\n"
        "i.add(a, b'p' * 32, 0, 10, 20, 30, 0)\n"
        "assert i.has(a) and not i.has(b) and len(i) == 1 and i.has_each([a, b]) == [True, False]\n"
        "assert i.lookup_many([b, a])[1].offset == 10\n"
        "data = encode_index(index_content([StoredPack(b'p' * 32, 0, [PackEntry(0, a, 10, 20, 30)])]))\n"
        "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
        "sys.stdout.buffer.write(data)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    from keepwell.repository.index import decode_index, encode_index

    content = decode_index(out)
    assert content.packs == [b"p" * 32] and len(content) == 1
    row = content.entries[0]
    assert (int(row["offset"]), int(row["length"]), int(row["raw"]), int(row["type"])) == (10, 20, 30, 0)
    assert encode_index(content) == out  # the NumPy path writes the same bytes
    index = MasterIndex()
    index.stage("x", content)
    index.finish()
    loc = index.lookup(bytes(row["id"]))
    assert loc is not None and (loc.pack, loc.offset, loc.length) == (b"p" * 32, 10, 20)
