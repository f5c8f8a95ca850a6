"""The metadata a files snapshot keeps beyond bytes, modes and times: extended attributes, POSIX
ACLs, FIFOs and device nodes, sockets (skipped), and what a restore without privilege does.

Tests run as root (as in CI); the unprivileged cases run the restore as ``nobody``, and as root
of a user namespace (``unshare -r``), where chown to an unmapped id, mknod and the privileged
xattr namespaces are refused, as in a restricted container.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

from keepwell.backends.local import LocalBackend
from keepwell.repository import Repository, Snapshot, open_repository
from keepwell.repository.format import TREE
from keepwell.repository.tree import FIFO, SOCKET, encode_node
from keepwell.sources.files import archiver, backup_paths, restore_snapshot, restorer

os.environ.setdefault("KEEPWELL_TESTONLY_WEAK_KDF", "1")

ROOT = os.geteuid() == 0
SRC = str(Path(__file__).resolve().parents[2] / "src")
NOBODY = 65534
ACL_UNDEFINED = 0xFFFFFFFF


def acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL in the kernel's xattr form: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


# user::rw-, user:1234:r--, group::r--, mask::r--, other::---
ACCESS = acl((0x01, 6, ACL_UNDEFINED), (0x02, 4, 1234), (0x04, 4, ACL_UNDEFINED),
             (0x10, 4, ACL_UNDEFINED), (0x20, 0, ACL_UNDEFINED))
# default: user::rwx, group::r-x, other::r-x
DEFAULT = acl((0x01, 7, ACL_UNDEFINED), (0x04, 5, ACL_UNDEFINED), (0x20, 5, ACL_UNDEFINED))


def xattrs_of(path: Path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False)
            for n in sorted(os.listxattr(path, follow_symlinks=False))}


def make_tree(src: Path, small_files: int = 0) -> None:
    """Files, a directory and an empty file with user. xattrs; as root also trusted. and
    security. ones, an access ACL and a default ACL, a symlink with a trusted. xattr, a FIFO
    and a device node; ``small_files`` more files with a user. xattr each."""
    (src / "d").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"alpha\n")
    (src / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024))  # several blobs, large path
    (src / "empty").write_bytes(b"")
    for name in ("a.txt", "big.bin", "empty", "d"):
        os.setxattr(src / name, "user.origin", f"from {name}".encode())
    os.setxattr(src / "a.txt", "user.empty-value", b"")
    for i in range(small_files):
        p = src / "d" / f"f{i:04d}"
        p.write_bytes(f"small {i}\n".encode())
        os.setxattr(p, "user.n", str(i).encode())
    if ROOT:
        os.setxattr(src / "a.txt", "trusted.t", b"T")
        os.setxattr(src / "a.txt", "security.keepwell", b"S")
        os.setxattr(src / "a.txt", "system.posix_acl_access", ACCESS)
        os.setxattr(src / "d", "system.posix_acl_default", DEFAULT)
        os.symlink("a.txt", src / "link")
        os.setxattr(src / "link", "trusted.l", b"L", follow_symlinks=False)
        os.mkfifo(src / "fifo", 0o620)
        os.mknod(src / "null", 0o640 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(src / "a.txt", 0o640)
    for p in [src / "a.txt", src / "empty", src / "d"]:
        os.utime(p, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))


def describe(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry's type, mode, mtime, device number, owner and xattrs."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            link = stat.S_ISLNK(st.st_mode)
            out[str(p.relative_to(root))] = (
                stat.S_IFMT(st.st_mode), None if link else stat.S_IMODE(st.st_mode),
                None if link else st.st_mtime_ns, st.st_rdev, st.st_uid, st.st_gid, xattrs_of(p))
    return out


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    """Opened from its location, so worker processes can open it too."""
    Repository.init(LocalBackend(str(tmp_path / "repo")), "pw")
    return open_repository(str(tmp_path / "repo"), "pw")


@pytest.mark.parametrize("processes", [False, True], ids=["in-process", "worker-processes"])
def test_xattrs_acls_and_special_files_round_trip(repo: Repository, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  processes: bool) -> None:
    src = tmp_path / "src"
    make_tree(src, small_files=40)
    if processes:  # small files read and written by worker processes
        monkeypatch.setenv("KEEPWELL_FILE_PROCESSES", "2")
        monkeypatch.setattr(archiver, "READERS_AFTER", 1)
        monkeypatch.setattr(restorer, "WRITERS_AFTER", 1)
    else:
        monkeypatch.setenv("KEEPWELL_FILE_PROCESSES", "0")
    snap = backup_paths(repo, [str(src)]).snapshot
    assert (snap.summary["reader_processes"] > 0) == processes
    res = restore_snapshot(repo, snap, str(tmp_path / "out"))
    assert not res.errors
    assert (res.processes > 0) == processes
    assert res.metadata.notes() == [] and res.metadata.complete
    restored = tmp_path / "out" / str(src).lstrip("/")
    assert describe(restored) == describe(src)
    assert xattrs_of(restored / "d/f0007") == {"user.n": b"7"}
    if ROOT:
        assert xattrs_of(restored / "a.txt")["system.posix_acl_access"] == ACCESS
        assert xattrs_of(restored / "d")["system.posix_acl_default"] == DEFAULT
        assert stat.S_ISFIFO(os.lstat(restored / "fifo").st_mode)
        assert os.lstat(restored / "null").st_rdev == os.makedev(1, 3)


def test_a_changed_xattr_is_seen_by_the_next_backup(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    backup_paths(repo, [str(src)])
    os.setxattr(src / "a.txt", "user.origin", b"changed")
    os.removexattr(src / "d", "user.origin")
    snap = backup_paths(repo, [str(src)]).snapshot
    assert snap.summary["files_changed"] == 1  # the ctime moved: the file is read again
    restore_snapshot(repo, snap, str(tmp_path / "out"))
    restored = tmp_path / "out" / str(src).lstrip("/")
    assert xattrs_of(restored / "a.txt")["user.origin"] == b"changed"
    assert "user.origin" not in xattrs_of(restored / "d")
    assert xattrs_of(restored / "big.bin") == {"user.origin": b"from big.bin"}  # kept as it was


def test_sockets_are_skipped_and_counted(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "kept").write_bytes(b"x")
    os.mkfifo(src / "pipe")
    with socket.socket(socket.AF_UNIX) as s1, socket.socket(socket.AF_UNIX) as s2:
        s1.bind(str(src / "s1"))
        s2.bind(str(src / "s2"))
        res = backup_paths(repo, [str(src)])
        alone = backup_paths(repo, [str(src / "s1")])  # one named on the command line
    assert not res.errors and res.snapshot.summary["sockets_skipped"] == 2
    assert alone.snapshot.summary["sockets_skipped"] == 1
    kinds = {n.name: n.type for _, n in repo.walk(res.snapshot) if n.name in {"pipe", "s1", "s2"}}
    assert kinds == {"pipe": FIFO}
    assert SOCKET not in {n.type for _, n in repo.walk(alone.snapshot)}


def test_the_backup_command_says_sockets_were_skipped_and_exits_0(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "kept").write_bytes(b"x")
    env = {**os.environ, "PYTHONPATH": SRC, "KEEPWELL_REPOSITORY": str(tmp_path / "repo"),
           "KEEPWELL_PASSWORD": "pw", "KEEPWELL_TESTONLY_WEAK_KDF": "1"}
    cli = [sys.executable, "-m", "keepwell.cli.main"]
    subprocess.run([*cli, "init"], env=env, check=True, capture_output=True)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(src / "sock"))
        out = subprocess.run([*cli, "backup", str(src)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("skipped 1 socket(s)") == 1


# -- restoring without privilege ------------------------------------------------------------------
@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A directory other users can reach (pytest's own are root's, mode 0700)."""
    if not ROOT:
        pytest.fail("these tests run as root, to restore as another user")
    d = Path(tempfile.mkdtemp(prefix="keepwell-meta-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _snapshot_owned_by_others(shared: Path) -> tuple[Path, Path]:
    """A repository (owned by nobody) holding a tree owned by uid/gid 1234, with modes, times,
    user. and trusted. xattrs, a FIFO and a device node; and that tree."""
    src = shared / "src"
    make_tree(src, small_files=300)  # enough for the worker processes to write some
    for p in [src, *src.rglob("*")]:
        os.chown(p, 1234, 1234, follow_symlinks=False)
    repo_dir = shared / "repo"
    Repository.init(LocalBackend(str(repo_dir)), "pw")
    repo = open_repository(str(repo_dir), "pw")
    backup_paths(repo, [str(src)])
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(repo_dir)], check=True)
    (shared / "out").mkdir()
    os.chown(shared / "out", NOBODY, NOBODY)
    return src, repo_dir


def _restore_as_nobody(shared: Path, repo_dir: Path, *wrapper: str) -> subprocess.CompletedProcess[str]:
    env = ["env", "-i", f"PATH={os.environ['PATH']}", f"PYTHONPATH={SRC}",
           f"KEEPWELL_REPOSITORY={repo_dir}", "KEEPWELL_PASSWORD=pw", "KEEPWELL_TESTONLY_WEAK_KDF=1",
           f"HOME={shared}", "KEEPWELL_FILE_PROCESSES=2"]
    return subprocess.run(["runuser", "-u", "nobody", "--", *wrapper, *env, sys.executable, "-m",
                           "keepwell.cli.main", "restore", "latest", "--target", str(shared / "out")],
                          capture_output=True, text=True, timeout=300)


def _modes_and_times(root: Path) -> dict[str, tuple[object, ...]]:
    return {k: v[:3] for k, v in describe(root).items() if v[0] not in (stat.S_IFCHR, stat.S_IFLNK)}


def test_an_unprivileged_restore_keeps_modes_and_times_and_says_what_it_could_not(
        shared: Path) -> None:
    src, repo_dir = _snapshot_owned_by_others(shared)
    out = _restore_as_nobody(shared, repo_dir)
    # the user could not have asked for owners, trusted. xattrs or device nodes: not a failure
    assert out.returncode == 0, out.stderr
    restored = shared / "out" / str(src).lstrip("/")
    assert _modes_and_times(restored) == _modes_and_times(src)
    assert os.stat(restored / "a.txt").st_uid == NOBODY
    assert xattrs_of(restored / "d/f0123") == {"user.n": b"123"}
    assert not (restored / "null").exists()
    lines = out.stderr.splitlines()
    # every entry but the device node, and src with the two root-owned directories above it
    files = sum(1 for _ in src.rglob("*")) - 1 + 3
    assert f"keepwell: note: ownership not restored for {files} files (not permitted)" in lines
    assert "keepwell: note: 1 device nodes not restored (not permitted)" in lines
    assert any("privileged namespace not restored for" in line for line in lines)
    assert len(lines) == 3, out.stderr


def test_a_restricted_root_restores_modes_and_times_when_chown_is_refused(shared: Path) -> None:
    """As root of a user namespace (a restricted container): chown to an unmapped id fails, and
    the mode and times are set all the same; said once, and the restore is partial."""
    src, repo_dir = _snapshot_owned_by_others(shared)
    out = _restore_as_nobody(shared, repo_dir, "unshare", "--user", "--map-root-user")
    assert out.returncode == 3, out.stderr
    restored = shared / "out" / str(src).lstrip("/")
    assert _modes_and_times(restored) == _modes_and_times(src)
    lines = out.stderr.splitlines()
    # every entry but the device node (not made), and src itself; the directories above it
    # are root's, which this root can give
    files = sum(1 for _ in src.rglob("*")) - 1 + 1
    assert f"keepwell: warning: ownership not restored for {files} files (not permitted)" in lines
    assert not any("cannot set metadata" in line for line in lines)


# -- snapshots of tree version 1 --------------------------------------------------------------------
def _as_version_1(repo: Repository, snap: Snapshot, path: str) -> Snapshot:
    """A copy of a files snapshot of ``path`` whose trees are encoded as version 1 was (each node
    without its extended attributes), as a parent for the next backup."""
    with repo.new_snapshot("files", [path], host=snap.host) as writer:
        def copy(tree_id: bytes) -> bytes:
            rows = []
            for n in repo.load_tree(tree_id):  # shared with the repository's cache: copied
                sub = None if n.subtree is None else copy(n.subtree)
                rows.append(encode_node(replace(n, subtree=sub))[:17])
            return writer.sink.save(TREE, msgpack.packb([1, rows], use_bin_type=True))

        node = repo.find_node(snap, path)
        assert node.subtree is not None
        writer.add_node(path, replace(node, subtree=copy(node.subtree)))
        return writer.commit()


def test_a_version_1_parent_gives_its_contents_and_the_attributes_are_read(
        repo: Repository, tmp_path: Path) -> None:
    """Files unchanged since a parent snapshot of tree version 1 are not read again, and their
    extended attributes, which that snapshot did not record, are read from the files."""
    src = tmp_path / "src"
    make_tree(src, small_files=5)
    first = backup_paths(repo, [str(src)]).snapshot
    parent = _as_version_1(repo, first, str(src))
    assert all(n.xattrs is None for _, n in repo.walk(parent) if n.name == "a.txt")
    snap = backup_paths(repo, [str(src)], parent=parent).snapshot
    assert snap.summary["files_new"] == snap.summary["files_changed"] == 0
    restore_snapshot(repo, snap, str(tmp_path / "out"))
    restored = tmp_path / "out" / str(src).lstrip("/")
    assert describe(restored) == describe(src)
