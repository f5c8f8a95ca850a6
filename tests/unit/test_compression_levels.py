"""The zstd level of data blobs: the repository's level, or its fast level where the strong one
does not pay on the data being written (keepwell.compression.Levels); both kept in the config."""

from __future__ import annotations

import glob
import os
import random
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import zstandard

from keepwell.backends.memory import MemoryBackend
from keepwell.compression import Levels, pack_payload
from keepwell.repository import Repository

os.environ.setdefault("KEEPWELL_TESTONLY_WEAK_KDF", "1")


def _hex_rows(seed: int, n: int = 8000) -> bytes:
    """Rows of random hex digests: zstd 3 stores them no smaller than zstd 1."""
    rnd = random.Random(seed)
    return b"".join(b"(%d,'%s')," % (i, rnd.randbytes(60).hex().encode()) for i in range(n))


def _source_text() -> list[bytes]:
    """Python source in blobs of about 1 MB: zstd 3 stores it about 8 % smaller than zstd 1."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    text = b"".join(Path(f).read_bytes() for f in files)
    return [text[i:i + 1_000_000] for i in range(0, len(text) - 1_000_000, 1_000_000)]


def _level_of(payload: bytes, data: bytes) -> int | None:
    """Which of levels 1 and 3 produced a stored payload."""
    for level in (1, 3):
        if payload[1:] == zstandard.ZstdCompressor(level=level).compress(data):
            return level
    return None


def test_levels_follow_what_the_strong_level_buys() -> None:
    levels = Levels(3, 1)
    for i in range(40):
        levels.payload(_hex_rows(i))
    assert levels.current() == 1  # level 3 buys nothing on random hex
    data = _hex_rows(99)
    assert _level_of(levels.payload(data), data) == 1  # not a sampled blob: the fast level
    texts = _source_text()
    for i in range(200):
        levels.payload(texts[i % len(texts)])
    assert levels.current() == 3  # the data changed: recent samples outweigh the old ones


def test_a_single_level_is_used_as_it_is() -> None:
    levels = Levels(3, 3)
    assert not levels.adaptive
    data = _hex_rows(1)
    assert levels.payload(data) == pack_payload(data, 3)
    assert Levels(0, 1).payload(b"x" * 1000)[0] == 0  # level 0: stored raw


def test_repository_keeps_a_chooser_per_kind_and_the_levels_in_its_config() -> None:
    repo = Repository.init(MemoryBackend(), "pw", compression=5, fast_compression=2)
    assert repo.levels("files") is repo.levels("files")
    assert repo.levels("files") is not repo.levels("mysql-physical")
    assert (repo.levels("files").strong, repo.levels("files").fast) == (5, 2)
    again = Repository.open(repo.backend, "pw")
    assert (again.compression, again.fast_compression) == (5, 2)


def _heap_pages(seed: int, n: int = 512) -> bytes:
    """8 KiB pages of pgbench-like account rows, a third of them rewritten by updates."""
    rnd = random.Random(seed)
    out = bytearray()
    aid = seed * 100_000
    for page in range(n):
        rows = []
        for slot in range(61):
            aid += 1
            balance = rnd.randint(-5000, 5000) if rnd.random() < 0.3 else 0
            xmin = rnd.randint(700, 90_000) if balance else 1
            xmax = rnd.randint(700, 90_000) if rnd.random() < 0.15 else 0
            rows.append(struct.pack("<IIIHHHBBiii", xmin, xmax, 0, 0, page, slot + 1, 11, 24,
                                    aid, 1 + aid // 100_000, balance) + b" " * 84)
        body = b"".join(rows)
        pointers = b"".join(struct.pack("<I", (8192 - (i + 1) * 121) | 1 << 15 | 121 << 17)
                            for i in range(61))
        head = struct.pack("<QHHHHHHI", rnd.getrandbits(40), 0, 0, 24 + len(pointers),
                           8192 - len(body), 8192, 0x2004, 0) + pointers
        out += head + bytes(8192 - len(head) - len(body)) + body
    return bytes(out)


def test_page_images_get_the_page_level() -> None:
    repo = Repository.init(MemoryBackend(), "pw")
    assert (repo.compression, repo.fast_compression, repo.page_compression) == (3, 1, 5)
    assert repo.levels("postgres-physical", pages=True).strong == 5
    assert repo.levels("postgres-physical", pages=True) is not repo.levels("postgres-physical")
    assert repo.levels("files").strong == 3
    data = _heap_pages(1) + _heap_pages(2) + _heap_pages(3) + _heap_pages(4)
    stored = {}
    for pages in (False, True):
        with repo.new_snapshot(f"pages-{pages}", ["x"], page_levels=pages) as w:
            w.add_bytes("x", data)
            stored[pages] = w.commit().summary["bytes_stored"]
    # zstd 5 stores these pages 3 % smaller than zstd 3 (and 12 % smaller than zstd 1)
    assert stored[True] < 0.99 * stored[False]


def test_older_configs_and_no_compression_keep_their_level_for_pages() -> None:
    repo = Repository.init(MemoryBackend(), "pw", compression=0)
    assert repo.levels("postgres-physical", pages=True).strong == 0
    old = dict(Repository.init(MemoryBackend(), "pw").config)
    del old["page_compression"]  # configs written before the setting existed
    repo = Repository(MemoryBackend(), repo.master, old, repo.key_id)
    assert repo.page_compression == repo.compression == 3


def test_init_takes_levels(tmp_path: Path) -> None:
    env = dict(os.environ, KEEPWELL_PASSWORD="pw", KEEPWELL_TESTONLY_WEAK_KDF="1")
    cli = [sys.executable, "-c", "import sys; from keepwell.cli.main import run; sys.exit(run())",
           "-r", str(tmp_path / "r"), "init"]
    done = subprocess.run([*cli, "--compression", "7", "--fast-compression", "7",
                           "--page-compression", "9"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from keepwell.backends.local import LocalBackend

    repo = Repository.open(LocalBackend(str(tmp_path / "r")), "pw")
    assert (repo.compression, repo.fast_compression, repo.page_compression) == (7, 7, 9)
    assert not repo.levels("files").adaptive
    bad = subprocess.run([*cli[:-2], str(tmp_path / "s"), "init", "--compression", "40"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
