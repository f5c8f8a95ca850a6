"""The vectorised lookups agree with the one-at-a-time ones, for ids in the sorted array, ids
only added since the last fold, and ids the index does not hold."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from keepwell.repository import index as index_module
from keepwell.repository.index import ENTRY, ENTRY_DTYPE, IndexContent, MasterIndex


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
    blob_id, _pack, offset, length, raw, btype = ENTRY.unpack_from(content.entries, 0)
    assert (offset, length, raw, btype) == (10, 20, 30, 0)
    assert encode_index(content) == out
    index = MasterIndex()
    index.stage("x", content)
    index.finish()
    loc = index.lookup(blob_id)
    assert loc is not None and (loc.pack, loc.offset, loc.length) == (b"p" * 32, 10, 20)


def _records(n: int, packs: int, seed: int) -> tuple[list[bytes], bytes]:
    rnd = random.Random(seed)
    ids = [rnd.randbytes(32) for _ in range(n)]
    ids += ids[: n // 10]  # some blobs stored twice (in two packs)
    return ids, b"".join(ENTRY.pack(b, i % packs, i * 7, 5, 9, i % 2) for i, b in enumerate(ids))


@pytest.mark.parametrize("numpy_at", [10**9, 1])
def test_python_and_numpy_folds_give_the_same_index(monkeypatch: pytest.MonkeyPatch,
                                                      numpy_at: int) -> None:
    """Small folds sort with Python, large ones with NumPy: both keep every entry (duplicates
    included), in key order, and answer the same."""
    monkeypatch.setattr(index_module, "NUMPY_AT", numpy_at)
    ids, first = _records(3000, 3, 1)
    more, second = _records(2000, 2, 2)
    index = MasterIndex()
    index.stage("a", IndexContent([b"p" * 32, b"q" * 32, b"r" * 32], [0, 0, 1], first, []))
    index.stage("b", IndexContent([b"r" * 32, b"s" * 32], [1, 0], second, []))
    index.finish()
    added = os.urandom(32)
    index.add(added, b"t" * 32, 0, 1, 2, 3, 0)
    assert len(index) == len(ids) + len(more) + 1 and index.nbytes() == 57 * (len(ids) + len(more))
    keys = list(index.key_array())
    assert keys == sorted(keys) and len(keys) == len(ids) + len(more) + 1  # the fold took `added`
    loc = index.lookup(ids[5])
    assert loc is not None and (loc.pack, loc.offset, loc.type) == (b"r" * 32, 35, 1)
    loc = index.lookup(more[4])
    assert loc is not None and (loc.pack, loc.pack_type, loc.offset) == (b"r" * 32, 1, 28)
    listed = sorted((b, loc.pack, loc.offset) for b, loc in index.entries())
    expected = sorted([(b, [b"p", b"q", b"r"][i % 3] * 32, i * 7) for i, b in enumerate(ids)]
                      + [(b, [b"r", b"s"][i % 2] * 32, i * 7) for i, b in enumerate(more)]
                      + [(added, b"t" * 32, 1)])
    assert listed == expected
    assert index.has_each([ids[0], os.urandom(32), added]) == [True, False, True]


@pytest.mark.parametrize("numpy_at", [10**9, 1])
def test_an_entry_past_the_pack_table_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                 numpy_at: int) -> None:
    monkeypatch.setattr(index_module, "NUMPY_AT", numpy_at)
    _ids, records = _records(10, 3, 3)
    with pytest.raises(ValueError, match="past the pack table"):
        MasterIndex().stage("a", IndexContent([b"p" * 32, b"q" * 32], [0, 0], records, []))


def test_opening_a_repository_of_few_blobs_loads_no_numpy(tmp_path: Path) -> None:
    """The CLI's main process keeps NumPy's 16 MiB out while the index is small."""
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "os.environ['KEEPWELL_TESTONLY_WEAK_KDF'] = '1'\n"
        "from keepwell.backends.local import LocalBackend\n"
        "from keepwell.repository import Repository\n"
        "repo = Repository.init(LocalBackend(sys.argv[1]), 'pw')\n"
        "with repo.new_snapshot('stdin', ['x']) as w:\n"
        "    w.add_bytes('x', os.urandom(3 << 20))\n"
        "    w.commit()\n"
        "again = Repository.open(LocalBackend(sys.argv[1]), 'pw')\n"
        "assert len(again.index) > 1 and all(loc for _, loc in again.index.entries())\n"
        "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], check=True)


def test_added_blobs_are_folded_as_they_grow(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that stores many blobs keeps them folded (57 bytes each), not in the dict."""
    monkeypatch.setattr(MasterIndex, "_FOLD_MIN", 100)
    index = MasterIndex()
    ids = [os.urandom(32) for _ in range(1000)]
    for i, b in enumerate(ids):
        index.add(b, b"p" * 32, 0, i, 10, 20, 0)
    assert len(index._extra) < 500 and len(index) == 1000
    assert all(loc is not None and loc.offset == i for i, loc in enumerate(index.lookup_many(ids)))


def test_trim_heap_returns_freed_pages() -> None:
    """Freed buffers among buffers that live on stay resident until the heap is trimmed."""
    import subprocess
    import sys

    code = (
        "from keepwell.memory import tune_malloc, trim_heap\n"
        "tune_malloc()\n"
        "def anon():\n"
        "    return int([l for l in open('/proc/self/status') if l.startswith('RssAnon')][0].split()[1])\n"
        "bufs, keep = [], []\n"
        "for _ in range(64):\n"
        "    bufs.append(bytearray(b'x' * (1 << 20)))  # 1 MiB each: on the heap, not mmap\n"
        "    keep.append(bytearray(b'y' * 200_000))  # buffers that live on, between them\n"
        "before = anon()\n"
        "del bufs\n"
        "untrimmed = before - anon()\n"
        "trim_heap()\n"
        "print(untrimmed, before - anon())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    untrimmed, trimmed = map(int, out.stdout.split())
    assert trimmed - untrimmed > 32 * 1024  # KiB
