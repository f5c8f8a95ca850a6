"""``keepwell mount``: a real repository mounted through FUSE by the real command, in a process of
its own.

A snapshot seen through the mount is the backed-up tree byte for byte, with its modes, owners,
times, link counts, symlink targets and extended attributes; a large file reads from the middle
without being read whole; every change is refused with EROFS; a damaged pack makes the read of
the affected file fail with EIO, never give other bytes; SIGTERM and SIGINT unmount. Waits are
on the mountpoint appearing in (or leaving) /proc/mounts.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepwell.backends.local import LocalBackend
from keepwell.errors import MissingExtraError
from keepwell.repository import Repository, open_repository
from keepwell.repository.format import pack_object_name
from keepwell.sources.files.fuseload import load_fuse
from keepwell.sources.files.mount import NotFound, RepositoryView
from tests.fault.cli import KW, PASSWORD, kw, ok
from tests.waiting import wait_for

BIG = 24 * 1024 * 1024 + 12345  # several blobs (1 MiB on average, 8 MiB at most)


def mounted(point: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(point) for line in f)


def write_source(root: Path) -> Path:
    rng = random.Random(23)
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "big.bin").write_bytes(rng.randbytes(BIG))
    for i in range(40):
        d = root / ("docs/deep/er" if i % 3 == 0 else "docs" if i % 3 == 1 else "")
        (d / f"f{i}.txt").write_bytes(rng.randbytes(rng.randint(0, 70_000)))
    (root / "empty.txt").write_bytes(b"")
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "script.sh", 0o750)
    os.chmod(root / "docs" / "f1.txt", 0o600)
    os.symlink("docs/f1.txt", root / "link")
    os.symlink("/nowhere/at/all", root / "dangling")
    os.link(root / "docs" / "f4.txt", root / "hard")
    os.setxattr(root / "docs" / "f1.txt", "user.colour", b"blue")
    os.setxattr(root / "docs" / "f1.txt", "user.blob", bytes(range(256)))
    os.chown(root / "docs" / "f7.txt", 1234, 5678)
    os.utime(root / "docs" / "f10.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return root


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("mount")
    src = write_source(base / "src")
    repo = base / "repo"
    ok(kw(repo, "init"))
    ok(kw(repo, "backup", str(src), "--tag", "first", "--host", "alpha"))
    ok(kw(repo, "backup", str(src), "--tag", "second", "--host", "beta"))
    return repo, src


class Mount:
    def __init__(self, repo: Path, point: Path, *args: str) -> None:
        point.mkdir(exist_ok=True)
        self.point = point
        env = {**os.environ, "KEEPWELL_PASSWORD": PASSWORD, "KEEPWELL_REPOSITORY": str(repo),
               "KEEPWELL_TESTONLY_WEAK_KDF": "1"}
        self.proc = subprocess.Popen(KW + ["mount", str(point), *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: mounted(point) or self.proc.poll() is not None, "the mount")
        assert mounted(point), self.proc.communicate()

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        _out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


@pytest.fixture
def mount(backed_up: tuple[Path, Path], tmp_path: Path) -> Iterator[Mount]:
    m = Mount(backed_up[0], tmp_path / "mnt")
    try:
        yield m
    finally:
        m.stop()
        if mounted(m.point):
            subprocess.run(["fusermount3", "-u", str(m.point)], check=False)


def describe(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything the mount must show of a tree, by relative path."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            kind = stat.S_IFMT(st.st_mode)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            xattrs = sorted((a, os.getxattr(p, a, follow_symlinks=False))
                            for a in os.listxattr(p, follow_symlinks=False)) \
                if not stat.S_ISLNK(st.st_mode) else []
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            nlink = st.st_nlink if not stat.S_ISDIR(st.st_mode) else None
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size,
                        st.st_mtime_ns, nlink, content, xattrs)
    return out


def test_a_snapshot_reads_back_as_the_tree_it_holds(mount: Mount,
                                                    backed_up: tuple[Path, Path]) -> None:
    _repo, src = backed_up
    top = mount.point
    assert sorted(os.listdir(top)) == ["hosts", "ids", "snapshots", "tags"]
    times = sorted(n for n in os.listdir(top / "snapshots") if n != "latest")
    assert len(times) == 2
    assert os.readlink(top / "snapshots" / "latest") == times[-1]
    assert sorted(os.listdir(top / "hosts")) == ["alpha", "beta"]
    assert os.listdir(top / "hosts" / "alpha") and os.readlink(
        top / "hosts" / "alpha" / "latest") == times[0]
    assert sorted(os.listdir(top / "tags")) == ["first", "second"]
    assert len(os.listdir(top / "ids")) == 2

    want = describe(src)
    for view in (top / "snapshots" / "latest", top / "tags" / "first" / times[0],
                 *(top / "ids" / i for i in os.listdir(top / "ids"))):
        got = describe(view / str(src).lstrip("/"))
        assert got == want, {k: (want.get(k), got.get(k)) for k in want.keys() | got.keys()
                             if want.get(k) != got.get(k)}
    assert (top / "snapshots" / "latest" / str(src).lstrip("/") / "hard").stat().st_nlink == 2


def test_a_large_file_reads_from_the_middle(mount: Mount, backed_up: tuple[Path, Path]) -> None:
    _repo, src = backed_up
    data = (src / "big.bin").read_bytes()
    with open(mount.point / "snapshots" / "latest" / str(src).lstrip("/") / "big.bin", "rb") as f:
        for offset, size in [(BIG // 2, 3 * 1024 * 1024), (BIG - 10, 100), (7, 1),
                             (BIG - 5 * 1024 * 1024, 5 * 1024 * 1024)]:
            f.seek(offset)
            assert f.read(size) == data[offset:offset + size]
        f.seek(BIG)
        assert f.read(10) == b""


def test_reading_the_middle_loads_only_the_blobs_that_cover_it(
        backed_up: tuple[Path, Path]) -> None:
    repo_path, src = backed_up
    fetched: list[int] = []

    class CountingBackend(LocalBackend):
        def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
            data = super().get(name, offset, length)
            if name.startswith("data/"):
                fetched.append(len(data))
            return data

    with Repository.open(CountingBackend(str(repo_path)), PASSWORD) as repo:
        view = RepositoryView(repo)
        try:
            snapshots = view.lookup(1, "snapshots").ino
            ino = view.lookup(snapshots, view.readlink(view.lookup(snapshots, "latest").ino)).ino
            for part in [*str(src).lstrip("/").split("/"), "big.bin"]:
                ino = view.lookup(ino, part).ino
            want = (src / "big.bin").read_bytes()[BIG // 2:BIG // 2 + 4096]
            assert view.read(ino, BIG // 2, 4096) == want
        finally:
            view.close()
    # the blob that covers the range, and at most the one after it, fetched ahead
    assert 1 <= len(fetched) <= 2 and sum(fetched) < BIG // 2, fetched


def test_every_change_is_refused(mount: Mount, backed_up: tuple[Path, Path]) -> None:
    _repo, src = backed_up
    snap = mount.point / "snapshots" / "latest"
    inside = snap / str(src).lstrip("/")
    attempts = [
        lambda: open(inside / "docs" / "f1.txt", "r+b"),
        lambda: open(inside / "docs" / "f1.txt", "ab"),
        lambda: open(inside / "new.txt", "wb"),
        lambda: os.mkdir(inside / "newdir"),
        lambda: os.mkdir(mount.point / "snapshots" / "newdir"),
        lambda: os.unlink(inside / "docs" / "f1.txt"),
        lambda: os.rmdir(inside / "empty"),
        lambda: os.rename(inside / "docs" / "f1.txt", inside / "docs" / "g.txt"),
        lambda: os.symlink("x", inside / "newlink"),
        lambda: os.link(inside / "docs" / "f1.txt", inside / "newhard"),
        lambda: os.chmod(inside / "docs" / "f1.txt", 0o777),
        lambda: os.utime(inside / "docs" / "f1.txt", (0, 0)),
        lambda: os.truncate(inside / "docs" / "f1.txt", 0),
        lambda: os.setxattr(inside / "docs" / "f1.txt", "user.colour", b"red"),
        lambda: os.removexattr(inside / "docs" / "f1.txt", "user.colour"),
    ]
    for i, attempt in enumerate(attempts):
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == errno.EROFS, (i, caught.value)
    assert (inside / "docs" / "f1.txt").read_bytes() == (src / "docs" / "f1.txt").read_bytes()


def test_filters_choose_the_snapshots_shown(backed_up: tuple[Path, Path], tmp_path: Path) -> None:
    m = Mount(backed_up[0], tmp_path / "mnt", "--host", "alpha")
    try:
        assert os.listdir(m.point / "hosts") == ["alpha"]
        assert os.listdir(m.point / "tags") == ["first"]
        assert len([n for n in os.listdir(m.point / "snapshots") if n != "latest"]) == 1
    finally:
        m.stop()


def test_a_damaged_pack_fails_the_read_and_never_gives_other_bytes(
        backed_up: tuple[Path, Path], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(backed_up[0], repo)
    src = backed_up[1]
    data = (src / "big.bin").read_bytes()
    with open_repository(str(repo), PASSWORD) as r:
        snap = r.find_snapshot("latest")
        node = r.find_node(snap, str(src / "big.bin"))
        victim = node.content[len(node.content) // 2]
        loc = r.locate(victim)
        assert loc is not None
        pack = repo / pack_object_name(loc.pack_type, loc.pack.hex())
    damaged = bytearray(pack.read_bytes())
    damaged[loc.offset + loc.length // 2] ^= 0x40
    os.chmod(pack, 0o644)
    pack.write_bytes(bytes(damaged))

    m = Mount(repo, tmp_path / "mnt")
    try:
        inside = m.point / "snapshots" / "latest" / str(src).lstrip("/")
        with pytest.raises(OSError) as caught:
            (inside / "big.bin").read_bytes()
        assert caught.value.errno == errno.EIO
        step, failed = 1024 * 1024, 0
        with open(inside / "big.bin", "rb", buffering=0) as f:
            for offset in range(0, BIG, step):
                try:
                    got = os.pread(f.fileno(), step, offset)
                except OSError as exc:
                    assert exc.errno == errno.EIO
                    failed += 1
                    continue
                # a read that meets the damaged blob part way returns what came before it
                assert got == data[offset:offset + len(got)], offset
                failed += len(got) < min(step, BIG - offset)
        assert 1 <= failed < BIG // step
        # files in other blobs read as they were backed up
        assert (inside / "docs" / "f1.txt").read_bytes() == (src / "docs" / "f1.txt").read_bytes()
    finally:
        rc, err = m.stop()
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "warning: mount:" in line]
    assert len(warnings) == 1 and "big.bin" in warnings[0] and "authentication" in warnings[0], err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_unmounts_and_exits(backed_up: tuple[Path, Path], tmp_path: Path,
                                     sig: int) -> None:
    m = Mount(backed_up[0], tmp_path / "mnt")
    assert os.listdir(m.point / "snapshots")
    rc, err = m.stop(sig)
    assert rc == 0, err
    assert not mounted(m.point)
    assert os.listdir(m.point) == []


def test_unmounting_from_outside_ends_the_command(backed_up: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    m = Mount(backed_up[0], tmp_path / "mnt")
    subprocess.run(["fusermount3", "-u", str(m.point)], check=True)
    assert m.proc.wait(timeout=60) == 0
    assert not mounted(m.point)


def test_a_bad_mountpoint_is_one_line(backed_up: tuple[Path, Path], tmp_path: Path) -> None:
    r = kw(backed_up[0], "mount", str(tmp_path / "missing"))
    assert r.returncode == 2
    assert r.stderr.startswith("keepwell: ") and len(r.stderr.splitlines()) == 1, r.stderr


def test_without_fuse_the_error_says_what_to_do() -> None:
    with pytest.raises(MissingExtraError) as caught:
        load_fuse("/nonexistent/fuse")
    assert "/nonexistent/fuse" in str(caught.value)


def test_entries_the_kernel_forgets_are_dropped_and_found_again(
        backed_up: tuple[Path, Path]) -> None:
    repo_path, src = backed_up
    with open_repository(str(repo_path), PASSWORD) as repo:
        view = RepositoryView(repo)
        try:
            ino = view.lookup(1, "ids").ino
            ino = view.lookup(ino, view.listing(ino)[0][0]).ino
            for part in str(src).lstrip("/").split("/"):
                ino = view.lookup(ino, part).ino
            docs = view.lookup(ino, "docs").ino
            names = [name for name, _ in view.listing(docs)]
            before = view.live_entries()
            f1 = view.lookup(docs, "f1.txt")
            view.remember(f1.ino)  # listed with its attributes as well
            view.forget(f1.ino, 2)
            assert view.live_entries() == before - 1
            with pytest.raises(NotFound):
                view.attributes(f1.ino)
            assert [name for name, _ in view.listing(docs)] == names
            again = view.lookup(docs, "f1.txt")
            assert again.ino != f1.ino and again.size == (src / "docs" / "f1.txt").stat().st_size
            assert view.read(again.ino, 0, 1 << 20) == (src / "docs" / "f1.txt").read_bytes()
            assert dict(view.xattrs(again.ino))[b"user.colour"] == b"blue"
        finally:
            view.close()


def test_without_the_binding_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import keepwell.sources.files

    monkeypatch.delitem(sys.modules, "keepwell.sources.files.fuse", raising=False)
    monkeypatch.delattr(keepwell.sources.files, "fuse", raising=False)
    monkeypatch.setitem(sys.modules, "pyfuse3", None)  # as if not installed
    with pytest.raises(MissingExtraError) as caught:
        load_fuse()
    assert "pip install 'keepwell[mount]'" in caught.value.line()
