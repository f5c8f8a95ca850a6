"""A restore never writes outside its target: not through links or hard links it finds in the
target, not through names a snapshot should never hold (``..``, ``/``, repeated names), and
not by following a link it made itself. Every case runs on both restore paths: in this process
and in the worker processes that write files of one blob. Outside the target, nothing changes:
not contents, not modes, not times."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from keepwell.backends.local import LocalBackend
from keepwell.errors import IntegrityError, UsageError
from keepwell.repository import Repository, Snapshot
from keepwell.repository import repo as repo_module
from keepwell.repository.check import check
from keepwell.repository.repo import open_repository
from keepwell.repository.tree import DIR, FILE, SYMLINK, Node
from keepwell.sources.files import backup_paths, restore_snapshot
from keepwell.sources.files import restorer as restorer_module

os.environ.setdefault("KEEPWELL_TESTONLY_WEAK_KDF", "1")


@pytest.fixture(params=["here", "workers"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which restore path writes the files of one blob."""
    if request.param == "workers":
        monkeypatch.setenv("KEEPWELL_FILE_PROCESSES", "1")
        monkeypatch.setattr(restorer_module, "WRITERS_AFTER", 1)
        monkeypatch.setattr(restorer_module, "BATCH_FILES", 50)  # batches sent before the end
    else:
        monkeypatch.setenv("KEEPWELL_FILE_PROCESSES", "0")
    return str(request.param)


def _repo(tmp_path: Path) -> Repository:
    loc = str(tmp_path / "repo")
    Repository.init(LocalBackend(loc), "pw")
    return open_repository(loc, "pw")  # worker processes can open it again


def _state(root: Path, skip: Path) -> dict[str, tuple[object, ...]]:
    """Everything about ``root`` and what is under it (but ``skip``): kind, mode, times, owner,
    inode, content or link target."""
    out: dict[str, tuple[object, ...]] = {}

    def add(p: Path) -> None:
        st = p.lstat()
        if stat.S_ISREG(st.st_mode):
            body: object = p.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            body = os.readlink(p)
        else:
            body = None
        out[str(p.relative_to(root.parent))] = (st.st_mode, st.st_mtime_ns, st.st_uid, st.st_gid,
                                                st.st_ino, body)

    add(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            add(Path(dirpath, name))
    return out


class Box:
    """``box/``: an outside world with a victim file, a directory and a file with two links,
    and ``box/target`` where the restores go."""

    def __init__(self, tmp_path: Path) -> None:
        self.box = tmp_path / "box"
        self.outdir = self.box / "outdir"
        self.outdir.mkdir(parents=True)
        (self.outdir / "keep").write_bytes(b"outside")
        self.victim = self.box / "victim.txt"
        self.victim.write_bytes(b"victim")
        self.victim.chmod(0o640)
        self.target = self.box / "target"
        self.target.mkdir()
        for p in (self.outdir / "keep", self.victim, self.outdir, self.box):
            os.utime(p, ns=(1_000_000_000, 1_000_000_000))
        self.before = _state(self.box, self.target)

    def unchanged(self) -> None:
        assert _state(self.box, self.target) == self.before
        assert not (self.box / "x").exists() and not (self.outdir / "x").exists()


# -- what the target already holds -----------------------------------------------------------
def _source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "other").mkdir(parents=True)
    (src / "other/a.txt").write_bytes(b"restored a")
    (src / "esc/tmp").mkdir(parents=True)
    (src / "esc/tmp/f.txt").write_bytes(b"restored f")
    (src / "esc/tmp").chmod(0o1777)
    (src / "hard.txt").write_bytes(b"restored hard")
    (src / "big.bin").write_bytes(os.urandom(3_000_000))  # several blobs: written in this process
    (src / "empty").write_bytes(b"")
    (src / "ln").symlink_to("other/a.txt")
    for i in range(30):
        (src / f"many/f{i}").parent.mkdir(exist_ok=True)
        (src / f"many/f{i}").write_bytes(f"file {i}".encode())
    return src


def _traps(box: Box, base: Path) -> None:
    """Links to the outside where the snapshot has files and directories."""
    (base / "other").mkdir(parents=True)
    (base / "other/a.txt").symlink_to("../" * (len(base.relative_to(box.box).parts) + 1) + "victim.txt")
    (base / "esc").mkdir()
    (base / "esc/tmp").symlink_to(box.outdir)
    os.link(box.victim, base / "hard.txt")  # a hard link to the outside file
    (base / "big.bin").symlink_to(box.victim)
    (base / "empty").symlink_to(box.victim)
    (base / "ln").symlink_to(box.outdir / "keep")
    (base / "many").symlink_to(box.outdir)


def test_overwrite_replaces_links_in_the_target_and_never_follows_them(
        tmp_path: Path, path: str) -> None:
    src = _source(tmp_path)
    repo = _repo(tmp_path)
    snap = backup_paths(repo, [str(src)]).snapshot
    box = Box(tmp_path)
    base = box.target / str(src).lstrip("/")
    _traps(box, base)
    assert (base / "other/a.txt").read_bytes() == b"victim"  # the trap is set
    box.before = _state(box.box, box.target)
    res = restore_snapshot(repo, snap, str(box.target), overwrite=True)
    assert not res.errors
    assert res.processes == (1 if path == "workers" else 0)
    box.unchanged()
    for rel in ("other/a.txt", "esc/tmp/f.txt", "hard.txt", "big.bin", "empty", "many/f7"):
        assert not (base / rel).is_symlink(), rel
        assert (base / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert os.readlink(base / "ln") == "other/a.txt"
    assert (base / "hard.txt").stat().st_nlink == 1
    assert not (base / "esc/tmp").is_symlink()
    assert stat.S_IMODE((base / "esc/tmp").stat().st_mode) == 0o1777
    assert not [p for p in base.rglob(".keepwell-restore-*")]


def test_without_overwrite_a_link_planted_in_the_target_is_reported_not_followed(
        tmp_path: Path, path: str) -> None:
    """Links planted in the target after a first, partial restore; a second restore that may
    not replace what it finds reports them and leaves them, and what they point to, alone."""
    src = _source(tmp_path)
    repo = _repo(tmp_path)
    snap = backup_paths(repo, [str(src)]).snapshot
    box = Box(tmp_path)
    restore_snapshot(repo, snap, str(box.target), excludes=["many", "esc"])
    base = box.target / str(src).lstrip("/")
    (base / "many").symlink_to(box.outdir)
    (base / "esc").symlink_to(box.outdir)
    box.before = _state(box.box, box.target)
    res = _restore_into_nonempty(repo, snap, box.target, ["many", "esc"])
    assert res.errors  # reported: a link is in the way
    box.unchanged()


def _restore_into_nonempty(repo: Repository, snap: Snapshot, target: Path,
                           includes: list[str]) -> restorer_module.RestoreResult:
    """A restore that does not replace what it finds (the Restorer itself: the command line asks
    for --overwrite before it restores into a non-empty target)."""
    return restorer_module.Restorer(
        repo, snap, str(target), includes=restorer_module.Matcher(includes),
        excludes=restorer_module.Matcher([]), workers=2,
        processes=int(os.environ["KEEPWELL_FILE_PROCESSES"])).run()


def test_a_target_that_is_a_link_is_followed_as_named(tmp_path: Path, path: str) -> None:
    src = _source(tmp_path)
    repo = _repo(tmp_path)
    snap = backup_paths(repo, [str(src)]).snapshot
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "named").symlink_to(real)
    res = restore_snapshot(repo, snap, str(tmp_path / "named"))
    assert not res.errors
    assert (real / str(src).lstrip("/") / "other/a.txt").read_bytes() == b"restored a"


# -- snapshots holding names a backup never writes -----------------------------------------
def _file(w: object, name: str, data: bytes = b"planted", mode: int = 0o644) -> Node:
    ids, size = w.save_content(io.BytesIO(data))  # type: ignore[attr-defined]
    return Node(name=name, type=FILE, mode=mode, size=size, content=ids, mtime_ns=2_000_000_000)


def _dir(w: object, name: str, nodes: list[Node], mode: int = 0o755) -> Node:
    return Node(name=name, type=DIR, mode=mode, subtree=w.save_tree(nodes),  # type: ignore[attr-defined]
                mtime_ns=2_000_000_000)


def _link(name: str, target: str) -> Node:
    return Node(name=name, type=SYMLINK, mode=0o777, target=target, mtime_ns=2_000_000_000)


def _crafted(repo: Repository, box: Box, case: str) -> tuple[Snapshot, str]:
    """A snapshot whose ``top`` directory (restored at ``target/top``) holds the case; 300
    ordinary files come first, in ``a``, so the worker processes are busy when it is met.
    Returns the snapshot and the directory the refusal names."""
    with repo.new_snapshot("files", ["/top"]) as w:
        many = [_file(w, f"f{i:03d}", f"file {i}".encode()) for i in range(300)]
        where = "/top"
        if case == "climbing-name":
            nodes = [_file(w, "../../x")]
        elif case == "absolute-name":  # in the snapshot's root: joined to the target, it is itself
            nodes = []
            w._root.children[str(box.victim)] = _file(w, str(box.victim), b"overwritten")
            where = "/"
        elif case == "dotdot-in-subdirectory":
            deep = _dir(w, "..", [_dir(w, "..", [_dir(w, "..", [_file(w, "x")])])])
            nodes = [_dir(w, "sub", [deep])]
            where = "/top/sub"
        elif case == "dotdot-among-300":
            nodes = [*many, _dir(w, "..", [_dir(w, "..", [_file(w, "x")])])]
        elif case == "link-then-file-through-it":
            nodes = [_link("lnk", str(box.outdir)), _file(w, "lnk/x")]
        elif case == "link-and-dir-of-one-name":
            nodes = [_link("d", str(box.outdir)), _dir(w, "d", [_file(w, "x")])]
        elif case == "climbing-link-and-dir-of-its-name":
            nodes = [_link("up", "../../outdir"), _dir(w, "up", [_file(w, "x")], mode=0o777)]
        elif case == "dotdot-dir-mode":
            nodes = [_dir(w, "..", [_dir(w, "..", [], mode=0o777)], mode=0o777)]
        elif case == "empty-name":
            nodes = [_file(w, "")]
        elif case == "nul-name":
            nodes = [_file(w, "a\0b")]
        elif case == "same-name-twice":
            nodes = [_file(w, "x", b"one"), _file(w, "x", b"two")]
        else:
            raise AssertionError(case)
        w.add_node("a", _dir(w, "a", many))
        w.add_node("top", _dir(w, "top", nodes))
        return w.commit(), where


CASES = ["climbing-name", "absolute-name", "dotdot-in-subdirectory", "dotdot-among-300",
         "link-then-file-through-it", "link-and-dir-of-one-name",
         "climbing-link-and-dir-of-its-name", "dotdot-dir-mode", "empty-name", "nul-name",
         "same-name-twice"]


@pytest.mark.parametrize("case", CASES)
def test_a_snapshot_with_unusable_names_is_refused(tmp_path: Path, path: str, case: str) -> None:
    repo = _repo(tmp_path)
    box = Box(tmp_path)
    snap, where = _crafted(repo, box, case)
    with pytest.raises(IntegrityError) as err:
        restore_snapshot(repo, snap, str(box.target))
    assert f"snapshot {snap.short_id} holds" in str(err.value)
    assert str(err.value).endswith(f" in {where}"), str(err.value)
    box.unchanged()


@pytest.mark.parametrize("case", CASES)
def test_check_reports_a_snapshot_with_unusable_names(tmp_path: Path, case: str) -> None:
    repo = _repo(tmp_path)
    box = Box(tmp_path)
    snap, where = _crafted(repo, box, case)
    with repo.new_snapshot("files", ["/fine"]) as w:
        w.add_node("fine", _dir(w, "fine", [_file(w, "x")]))
        fine = w.commit()
    report = check(repo)
    named = [e for e in report.errors if e.startswith(f"snapshot {snap.short_id} holds ")]
    assert len(named) == 1 and f" in {where}" in named[0], report.errors
    assert report.errors == named, report.errors  # nothing else is wrong with the repository
    assert fine.short_id not in " ".join(report.errors)


def test_check_exits_non_zero_on_a_snapshot_with_unusable_names(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    snap, _ = _crafted(repo, Box(tmp_path), "climbing-name")
    out = _kw(tmp_path, "check")
    assert out.returncode == 1, out
    assert f"error: snapshot {snap.short_id} holds an unusable name '../../x' in /top" in (
        out.stdout.decode()), out.stdout


@pytest.fixture
def unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk lets every name through: what the writing itself does with them."""
    monkeypatch.setattr(repo_module, "unusable_name", lambda nodes: None, raising=False)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("overwrite", [False, True])
def test_unusable_names_that_got_through_still_write_nothing_outside(
        tmp_path: Path, path: str, case: str, overwrite: bool, unchecked: None) -> None:
    repo = _repo(tmp_path)
    box = Box(tmp_path)
    snap, _ = _crafted(repo, box, case)
    restore_snapshot(repo, snap, str(box.target), overwrite=overwrite)  # errors, if any, reported
    box.unchanged()
    assert (box.target / "a/f299").read_bytes() == b"file 299"


def test_a_climbing_link_is_restored_as_it_was_saved_and_never_followed(
        tmp_path: Path, path: str) -> None:
    repo = _repo(tmp_path)
    box = Box(tmp_path)
    with repo.new_snapshot("files", ["/top"]) as w:
        many = [_file(w, f"f{i:03d}") for i in range(300)]
        w.add_node("top", _dir(w, "top", [_link("up", "../../outdir"), *many]))
        snap = w.commit()
    res = restore_snapshot(repo, snap, str(box.target))
    assert not res.errors
    assert os.readlink(box.target / "top/up") == "../../outdir"
    box.unchanged()
    # restored again over itself: the link is replaced, not followed
    res = restore_snapshot(repo, snap, str(box.target), overwrite=True)
    assert not res.errors
    box.unchanged()


# -- names at backup ----------------------------------------------------------------------------
def test_backup_refuses_dot_and_dotdot_parts(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    for bad in ("../../x", "a/../x", "./x", "a/\0"):
        with repo.new_snapshot("stdin", [bad]) as w, pytest.raises(UsageError):
            w.add_bytes(bad, b"data")


def _kw(tmp_path: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "KEEPWELL_PASSWORD": "pw", "KEEPWELL_REPOSITORY": str(tmp_path / "repo"),
           "KEEPWELL_TESTONLY_WEAK_KDF": "1"}
    return subprocess.run([sys.executable, "-m", "keepwell.cli.main", *args], env=env,
                          input=stdin, capture_output=True)


def test_stdin_filename_cannot_climb_and_restore_refuses_one_that_did(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    r = _kw(tmp_path, "backup", "--stdin", "--stdin-filename", "../../x", stdin=b"data")
    assert r.returncode == 2, r.stderr
    assert not list(repo.list_snapshots())
    box = Box(tmp_path)
    with repo.new_snapshot("stdin", ["x"]) as w:  # as an older or forged writer would have it
        w.add_node("top", _dir(w, "top", [_dir(w, "..", [_dir(w, "..", [_file(w, "x")])])]))
        snap = w.commit()
    r = _kw(tmp_path, "restore", snap.short_id, "--target", str(box.target))
    lines = r.stderr.decode().splitlines()
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"keepwell: snapshot {snap.short_id} holds "
                                                   "an unusable name '..' in /top"), lines
    box.unchanged()
