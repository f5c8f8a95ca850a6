from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keepwell.backends.local import LocalBackend
from keepwell.backends.memory import MemoryBackend
from keepwell.errors import IntegrityError, RestoreTargetError, WrongPasswordError
from keepwell.repository import Repository
from keepwell.repository.check import check
from keepwell.repository.index import IndexContent, decode_index, encode_index
from keepwell.repository.prune import PruneOptions, prune
from keepwell.repository.sessions import Session
from keepwell.sources.files import backup_paths, restore_snapshot

os.environ.setdefault("KEEPWELL_TESTONLY_WEAK_KDF", "1")


def _repo(tmp_path: Path) -> Repository:
    return Repository.init(LocalBackend(str(tmp_path / "repo")), "pw")


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=3_000_000))
def test_stream_roundtrip(data: bytes) -> None:
    repo = Repository.init(MemoryBackend(), "pw")
    with repo.new_snapshot("stdin", ["x"]) as w:
        w.add_stream("x", io.BytesIO(data))
        snap = w.commit()
    again = Repository.open(repo.backend, "pw")
    assert b"".join(again.iter_file(again.find_snapshot(snap.id), "x")) == data


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=32, max_size=32), st.integers(0, 2**32 - 1)), max_size=50))
def test_index_roundtrip(items: list[tuple[bytes, int]]) -> None:
    import numpy as np

    from keepwell.repository.index import ENTRY_DTYPE

    entries = np.zeros(len(items), dtype=ENTRY_DTYPE)
    for i, (bid, off) in enumerate(items):
        entries[i] = (bid, 0, off, 10, 20, 0)
    content = IndexContent([b"p" * 32], [0], entries, ["ab" * 32])
    back = decode_index(encode_index(content))
    assert back.packs == content.packs and back.supersedes == content.supersedes
    assert back.entries.tobytes() == entries.tobytes()


def test_wrong_password(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    with pytest.raises(WrongPasswordError):
        Repository.open(repo.backend, "nope")


def test_insert_at_start_restores_few_chunks(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    data = os.urandom(20 * 1024 * 1024)
    with repo.new_snapshot("stdin", ["x"]) as w:
        w.add_stream("x", io.BytesIO(data))
        w.commit()
    with repo.new_snapshot("stdin", ["x"]) as w:
        w.add_stream("x", io.BytesIO(b"hello" + data))
        second = w.commit()
    assert second.summary["blobs_new"] <= 3  # one or two data chunks and the tree
    assert second.summary["bytes_added"] < 3 * 8 * 1024 * 1024


def _tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.txt").write_text("hello\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(3_000_000))
    (root / "sub" / "deeper" / "zero").write_bytes(b"")
    (root / "odd name \u00e9 \n").write_bytes(b"odd")
    os.symlink("a.txt", root / "link")
    os.link(root / "a.txt", root / "hard")
    with open(root / "sparse", "wb") as f:
        f.truncate(50 * 1024 * 1024)
        f.write(b"start")
    os.chmod(root / "a.txt", 0o640)


def test_rebackup_keeps_unchanged_nodes_and_sees_every_change(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for name in ("a", "b", "c", "d/e"):
        (src / name).write_bytes(name.encode() * 1000)
    repo = _repo(tmp_path)
    first = backup_paths(repo, [str(src)]).snapshot
    again = backup_paths(repo, [str(src)]).snapshot
    assert again.summary["files_unmodified"] == 4 and again.summary["files_changed"] == 0
    # every tree blob below the backed-up directory is the old one (the directories above it,
    # /tmp among them, may change meanwhile)
    assert repo.find_node(again, str(src)).subtree == repo.find_node(first, str(src)).subtree
    os.chmod(src / "b", 0o600)  # metadata only: ctime moves, so it is read again
    st_c = os.stat(src / "c")
    os.utime(src / "c", ns=(st_c.st_atime_ns, st_c.st_mtime_ns + 1))
    (src / "d/e").write_bytes(b"x" * 3000)  # same size, new bytes
    third = backup_paths(repo, [str(src)]).snapshot
    assert third.summary["files_unmodified"] == 1 and third.summary["files_changed"] == 3
    out = tmp_path / "out"
    assert not restore_snapshot(repo, third, str(out)).errors
    restored = out / str(src).lstrip("/")
    assert os.stat(restored / "b").st_mode & 0o777 == 0o600
    assert os.stat(restored / "c").st_mtime_ns == st_c.st_mtime_ns + 1
    assert (restored / "d/e").read_bytes() == b"x" * 3000
    assert (restored / "a").read_bytes() == b"a" * 1000


def test_file_roundtrip_keeps_metadata(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _tree(src)
    repo = _repo(tmp_path)
    snap = backup_paths(repo, [str(src)]).snapshot
    out = tmp_path / "out"
    res = restore_snapshot(repo, snap, str(out))
    assert not res.errors
    restored = out / str(src).lstrip("/")
    r = subprocess.run(["diff", "-r", "--no-dereference", str(src), str(restored)], capture_output=True)
    assert r.returncode == 0, r.stdout
    assert os.readlink(restored / "link") == "a.txt"
    assert os.stat(restored / "a.txt").st_mode & 0o777 == 0o640
    assert os.stat(restored / "a.txt").st_ino == os.stat(restored / "hard").st_ino
    assert os.stat(restored / "a.txt").st_mtime_ns == os.stat(src / "a.txt").st_mtime_ns
    assert (restored / "empty").is_dir()
    assert os.stat(restored / "sparse").st_blocks * 512 < 10 * 1024 * 1024
    with pytest.raises(RestoreTargetError):
        restore_snapshot(repo, snap, str(out))
    # unchanged files are not re-read
    second = backup_paths(repo, [str(src)]).snapshot
    assert second.summary["files_new"] == 0 and second.summary["files_changed"] == 0
    assert second.summary["files_unmodified"] >= 6  # only the trees above src changed
    assert check(repo, read_data_fraction=1.0).ok


def test_flipped_byte_is_detected_and_never_served(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(200_000))
    repo = _repo(tmp_path)
    snap = backup_paths(repo, [str(src)]).snapshot
    pack = next(p for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file())
    raw = bytearray(pack.read_bytes())
    raw[100] ^= 0xFF
    os.chmod(pack, 0o600)
    pack.write_bytes(bytes(raw))
    rep = check(Repository.open(repo.backend, "pw"), read_data_fraction=1.0)
    assert not rep.ok and snap.id in rep.affected
    fresh = Repository.open(repo.backend, "pw")
    with pytest.raises(IntegrityError):
        b"".join(fresh.iter_file(snap, str(src / "f").lstrip("/")))


def test_prune_keeps_referenced_and_waits_for_sessions(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    keep_data, drop_data = os.urandom(2_000_000), os.urandom(2_000_000)
    snaps = []
    for data in (keep_data, drop_data):
        with repo.new_snapshot("stdin", ["x"]) as w:
            w.add_stream("x", io.BytesIO(data))
            snaps.append(w.commit())
    repo.forget([snaps[1].id])
    session = Session(repo, "test")  # a backup running elsewhere
    try:
        first = prune(repo, PruneOptions(grace=0))
        assert first.waiting_for_sessions == 1 and first.packs_deferred >= 1
        assert first.packs_deleted == 0
    finally:
        session.end()
    report = prune(repo, PruneOptions(grace=0, wait=True))
    assert report.packs_deleted >= 1
    fresh = Repository.open(repo.backend, "pw")
    assert b"".join(fresh.iter_file(snaps[0], "x")) == keep_data
    assert check(fresh, read_data_fraction=1.0).ok


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "KEEPWELL_PASSWORD": "pw"}
    kw = [sys.executable, "-m", "keepwell.cli.main"]
    r = subprocess.run(kw + ["-r", str(tmp_path / "none"), "snapshots"], capture_output=True, text=True, env=env)
    assert r.returncode == 10 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    subprocess.run(kw + ["-r", str(tmp_path / "r"), "init"], check=True, capture_output=True, env=env)
    r = subprocess.run(kw + ["-r", str(tmp_path / "r"), "snapshots"], capture_output=True, text=True,
                       env={**env, "KEEPWELL_PASSWORD": "bad"})
    assert r.returncode == 12 and r.stderr.startswith("keepwell: wrong password")
    r = subprocess.run(kw + ["-r", str(tmp_path / "r"), "restore", "zzzz", "--target", "x"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "not a snapshot id" in r.stderr
    unreadable = tmp_path / "u"
    unreadable.mkdir()
    (unreadable / "ok").write_text("x")
    r = subprocess.run(kw + ["-r", str(tmp_path / "r"), "backup", str(tmp_path / "missing")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_fixed_pieces_store_large_blobs_that_restore_and_deduplicate(tmp_path: Path) -> None:
    """`add_bytes(fixed=True)` (completed WAL segments) stores pieces of the largest chunk size,
    not content-defined chunks; they read back intact, pass check --read-data, and the same
    bytes stored again add nothing."""
    repo = _repo(tmp_path)
    step = repo.chunker_params.max_size
    data = os.urandom(step) + bytes(step) + os.urandom(1000)  # three pieces, one of zeros
    with repo.new_snapshot("files", ["/w"]) as w:
        w.add_bytes("/w/seg", data, fixed=True)
        first = w.commit()
    node = repo.find_node(first, "w/seg")
    assert node.size == len(data) and len(node.content) == 3
    assert [loc.raw_length for loc in repo.locate_many(node.content)] == [step, step, len(data) - 2 * step]
    assert b"".join(repo.iter_file(first, "w/seg")) == data
    with repo.new_snapshot("files", ["/w"]) as w:
        w.add_bytes("/w/again", data, fixed=True)
        second = w.commit()
    assert repo.find_node(second, "w/again").content == node.content
    assert second.summary["blobs_known"] >= 3  # the pieces, stored once
    assert check(repo, read_data_fraction=1.0).ok


def test_probing_writer_picks_the_level_blob_by_blob(tmp_path: Path) -> None:
    """A writer with `probe_levels` (the WAL archive) compresses each large blob at the level a
    slice of it favours, whatever earlier blobs were like: text that the strong level shrinks
    11 % more gets it, hex digests that the fast level stores 8 % smaller get the fast one."""
    import hashlib
    import random

    import zstandard

    from keepwell.crypto import BLOB_OVERHEAD

    repo = _repo(tmp_path)
    rnd = random.Random(7)
    words = [bytes(rnd.randrange(97, 123) for _ in range(rnd.randrange(2, 9))) for _ in range(3000)]
    text = b" ".join(rnd.choice(words) for _ in range(400_000))[: 2 << 20]
    hexes = b"".join(hashlib.md5(rnd.randbytes(8)).hexdigest().encode()
                     + hashlib.md5(str(g).encode()).hexdigest().encode() * 3
                     for g in range(20_000))[: 2 << 20]

    def size(data: bytes, level: int) -> int:
        return len(zstandard.ZstdCompressor(level=level).compress(data))

    strong, fast = repo.compression, repo.fast_compression
    assert size(text, strong) < 0.95 * size(text, fast)
    assert size(hexes, fast) < 0.95 * size(hexes, strong)
    with repo.new_snapshot("x", ["/w"], probe_levels=True) as w:
        for name, data in (("hex-1", hexes), ("text", text), ("hex-2", hexes[1:] + b"x")):
            w.add_bytes(f"/w/{name}", data, fixed=True)
        snap = w.commit()
    stored = {}
    for name in ("hex-1", "text", "hex-2"):
        (loc,) = repo.locate_many(repo.find_node(snap, f"w/{name}").content)
        assert loc is not None
        stored[name] = loc.length - 1 - BLOB_OVERHEAD
    assert stored["hex-1"] == size(hexes, fast)
    assert stored["text"] == size(text, strong)
    assert stored["hex-2"] == size(hexes[1:] + b"x", fast)
    assert b"".join(repo.iter_file(snap, "w/text")) == text
