"""Small files in worker processes. Backup (keepwell.sources.files.readers): what they store
restores byte for byte, copies meet in one worker, blobs the repository already holds are not
stored again, a match on the index's 8-byte key alone is caught, unreadable files are reported.
Restore (keepwell.sources.files.restorer.PackWriter): files, metadata, holes and hard links come
back as they were, and a damaged pack costs exactly the files it holds."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from keepwell.backends.local import LocalBackend
from keepwell.crypto import keyed_id
from keepwell.repository import Repository, open_repository
from keepwell.repository.check import check
from keepwell.repository.format import DATA
from keepwell.repository.index import MasterIndex
from keepwell.sources.files import backup_paths, restore_snapshot
from keepwell.sources.files.archiver import READERS_AFTER
from keepwell.sources.files.metadata import Xattrs

os.environ.setdefault("KEEPWELL_TESTONLY_WEAK_KDF", "1")


def _open(tmp_path: Path) -> Repository:
    loc = str(tmp_path / "repo")
    Repository.init(LocalBackend(loc), "pw")
    return open_repository(loc, "pw")


def _tree(root: Path, n: int, salt: bytes = b"") -> None:
    for i in range(n):
        d = root / f"d{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_bytes(salt + f"file {i} ".encode() * (i % 300 + 1))
    (root / "big.bin").write_bytes(os.urandom(3_000_000))  # cut into several chunks
    (root / "copy-a").write_bytes(b"the same bytes " * 5000)
    (root / "copy-b").write_bytes(b"the same bytes " * 5000)
    (root / "zeros").write_bytes(bytes(200_000))  # one blob of zeros: restored as a hole
    os.link(root / "copy-a", root / "link-to-a")
    for i, f in enumerate(sorted((root / "d1").iterdir())[:50]):
        f.chmod(0o600 + i % 8)
        os.utime(f, ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i * 7))


def _same(src: Path, out: Path) -> None:
    restored = out / str(src).lstrip("/")
    r = subprocess.run(["diff", "-r", "--no-dereference", str(src), str(restored)], capture_output=True)
    assert r.returncode == 0, r.stdout
    for path in src.rglob("*"):
        a, b = path.lstat(), (restored / path.relative_to(src)).lstat()
        assert (a.st_mode, a.st_uid, a.st_gid) == (b.st_mode, b.st_uid, b.st_gid), path
        if not path.is_dir():
            assert a.st_mtime_ns == b.st_mtime_ns, path
    if (src / "zeros").exists():
        assert (restored / "zeros").stat().st_blocks * 512 < 100_000
        linked = (src / "copy-a").stat().st_ino == (src / "link-to-a").stat().st_ino
        assert linked == ((restored / "copy-a").stat().st_ino == (restored / "link-to-a").stat().st_ino)


def test_workers_store_what_restores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPWELL_FILE_PROCESSES", "2")
    src = tmp_path / "src"
    _tree(src, READERS_AFTER + 400)
    unreadable = src / "d0" / "secret"
    unreadable.write_bytes(b"x")
    unreadable.chmod(0)
    repo = _open(tmp_path)
    res = backup_paths(repo, [str(src)])
    s = res.snapshot.summary
    assert s["reader_processes"] == 2
    if os.geteuid() != 0:  # root reads anything
        assert [p for p, _ in res.errors] == [str(unreadable)]
        unreadable.unlink()
    out = tmp_path / "out"
    restored = restore_snapshot(repo, res.snapshot, str(out))  # this process reads them
    assert not restored.errors and restored.processes == 2
    _same(src, out)
    fresh = open_repository(str(tmp_path / "repo"), "pw")
    assert check(fresh, read_data_fraction=1.0).ok
    # copies of one file (copy-b, and the hard link to copy-a) met in one worker: stored once
    data = sum(loc.raw_length for _, loc in fresh.index.entries() if loc.type == DATA)
    assert data == s["bytes_processed"] - 2 * 5000 * 15


def test_known_blobs_are_not_stored_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPWELL_FILE_PROCESSES", "2")
    a, b = tmp_path / "a", tmp_path / "b"
    _tree(a, READERS_AFTER + 200)
    repo = _open(tmp_path)
    backup_paths(repo, [str(a)])
    subprocess.run(["cp", "-r", str(a), str(b)], check=True)  # new paths, new times: all re-read
    snap = backup_paths(repo, [str(b)]).snapshot
    assert snap.summary["reader_processes"] == 2
    assert snap.summary["files_new"] > READERS_AFTER
    assert snap.summary["bytes_added"] < 50_000  # only trees are new
    out = tmp_path / "out"
    assert not restore_snapshot(open_repository(str(tmp_path / "repo"), "pw"), snap, str(out)).errors
    _same(b, out)


def test_a_match_on_the_key_alone_is_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker takes a blob whose 8-byte key is in the index for known; the main process finds
    the full id missing and stores the file itself."""
    monkeypatch.setenv("KEEPWELL_FILE_PROCESSES", "2")
    src = tmp_path / "src"
    _tree(src, READERS_AFTER + 50)
    target = b"a file whose key collides " * 40
    (src / "collides").write_bytes(target)
    repo = _open(tmp_path)
    blob_id = keyed_id(repo.id_key, target)
    real = MasterIndex.key_array

    def with_collision(self: MasterIndex) -> np.ndarray:
        keys = np.append(real(self), np.uint64(int.from_bytes(blob_id[:8], "big")))
        return np.sort(keys)

    monkeypatch.setattr(MasterIndex, "key_array", with_collision)
    snap = backup_paths(repo, [str(src)]).snapshot
    assert snap.summary["reader_processes"] == 2
    assert repo.index.has(blob_id)
    out = tmp_path / "out"
    assert not restore_snapshot(repo, snap, str(out)).errors
    assert (out / str(src).lstrip("/") / "collides").read_bytes() == target
    _same(src, out)


def test_few_files_start_no_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPWELL_FILE_PROCESSES", "2")
    src = tmp_path / "src"
    _tree(src, 20)
    snap = backup_paths(_open(tmp_path), [str(src)]).snapshot
    assert snap.summary["reader_processes"] == 0


def test_a_file_gone_before_its_read_is_reported(tmp_path: Path) -> None:
    from keepwell.sources.files.readers import Done, ReaderPool

    repo = _open(tmp_path)
    (tmp_path / "here").write_bytes(b"present")
    os.setxattr(tmp_path / "here", "user.origin", b"reader")
    got: dict[str, tuple[list[bytes], int, str | None]] = {}
    attrs: dict[str, Xattrs] = {}
    errors: list[BaseException] = []
    pool = ReaderPool(repo, 1, "files", errors.append)
    def keep(name: str) -> Done:
        def done(ids: list[bytes], size: int, err: str | None, assumed: list[bytes],
                 xattrs: Xattrs) -> None:
            got[name] = (ids, size, err)
            attrs[name] = xattrs
        return done

    for name in ("here", "gone"):
        pool.submit(str(tmp_path / name), 7, keep(name))
    totals = pool.close()
    assert not errors
    assert got["gone"] == ([], 0, "No such file or directory")
    ids, size, err = got["here"]
    assert size == 7 and err is None and len(ids) == 1
    assert attrs["here"] == ((b"user.origin", b"reader"),)  # read through the same descriptor
    assert totals["blobs_new"] == 1
    repo.refresh_index()
    assert repo.index.has(ids[0])


def test_restore_reports_the_file_of_a_damaged_blob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPWELL_FILE_PROCESSES", "2")
    src = tmp_path / "src"
    _tree(src, READERS_AFTER + 400)
    repo = _open(tmp_path)
    snap = backup_paths(repo, [str(src)]).snapshot
    victim = src / "d3" / "f10.txt"
    node = repo.find_node(snap, str(victim))
    assert len(node.content) == 1
    loc = repo.index.lookup(node.content[0])
    assert loc is not None
    pack = next((tmp_path / "repo").glob(f"data/**/{loc.pack.hex()}"))
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + loc.length // 2] ^= 0xFF
    pack.chmod(0o644)
    pack.write_bytes(bytes(raw))
    out = tmp_path / "out"
    res = restore_snapshot(open_repository(str(tmp_path / "repo"), "pw"), snap, str(out))
    assert res.processes == 2
    restored = out / str(src).lstrip("/")
    assert [p for p, _ in res.errors] == [str(restored / "d3" / "f10.txt")]
    assert "corrupt" in res.errors[0][1]
    victim.unlink()
    (restored / "d3" / "f10.txt").unlink(missing_ok=True)
    _same(src, out)  # everything else came back


def test_a_killed_worker_fails_the_run_clearly_and_the_next_run_completes(tmp_path: Path) -> None:
    import random
    import signal
    import sys
    import time

    src = tmp_path / "src"
    rnd = random.Random(7)
    for i in range(3000):
        d = src / f"d{i % 20}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(rnd.randbytes(rnd.randint(1000, 40_000)))
    env = {**os.environ, "KEEPWELL_PASSWORD": "pw", "KEEPWELL_REPOSITORY": str(tmp_path / "repo"),
           "KEEPWELL_TESTONLY_WEAK_KDF": "1", "KEEPWELL_FILE_PROCESSES": "2"}
    kw = [sys.executable, "-m", "keepwell.cli.main"]
    subprocess.run(kw + ["init"], env=env, check=True, capture_output=True)
    p = subprocess.Popen(kw + ["backup", str(src)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    killed = False
    deadline = time.monotonic() + 30
    while not killed and p.poll() is None and time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
                stat = open(f"/proc/{pid}/stat").read()
            except OSError:
                continue
            if b"keepwell.sources.files.workers" in cmd and int(stat.rsplit(")", 1)[1].split()[1]) == p.pid:
                os.kill(int(pid), signal.SIGKILL)
                killed = True
                break
        time.sleep(0.005)
    out, err = p.communicate(timeout=60)
    assert killed, "no worker process seen"
    assert p.returncode == 1, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["keepwell: a file reader process ended unexpectedly (killed by signal 9) "
                     "(what it stored stays usable; run the command again)"], (out, err)
    r = subprocess.run(kw + ["backup", str(src)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(kw + ["check", "--read-data"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    out_dir = tmp_path / "out"
    r = subprocess.run(kw + ["restore", "latest", "--target", str(out_dir)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _same(src, out_dir)


def test_a_reader_stores_files_without_loading_numpy(tmp_path: Path) -> None:
    """A reader process, as a worker runs it (its module, the repository opened again, the
    index's keys from a file), stores a batch, recognises a blob the repository already held,
    and writes its index, all without NumPy (10 MiB and a tenth of a second per process)."""
    import pickle
    import sys

    from keepwell.sources.files.workers import repository_init

    repo = _open(tmp_path)
    with repo.new_snapshot("files", ["/x"]) as w:
        w.add_bytes("/x/known", b"held before the run " * 100)
    keys = tmp_path / "keys"
    keys.write_bytes(repo.index.key_array().tobytes())
    (tmp_path / "known").write_bytes(b"held before the run " * 100)
    (tmp_path / "new").write_bytes(os.urandom(70_000))
    init = {**repository_init(repo), "kind": "files", "keys": str(keys), "handler": "x"}
    (tmp_path / "init").write_bytes(pickle.dumps(init))
    code = (
        "import pickle, sys\n"
        "from keepwell.sources.files.readers import Reader\n"
        f"r = Reader(pickle.loads(open({str(tmp_path / 'init')!r}, 'rb').read()))\n"
        f"(k_ids, _, _, assumed, _), (n_ids, _, _, _, _) = r.handle([({str(tmp_path / 'known')!r}, 2000),"
        f" ({str(tmp_path / 'new')!r}, 70000)])\n"
        "assert assumed == k_ids and len(n_ids) == 1, (assumed, k_ids)\n"
        "totals = r.finish()\n"
        "assert totals['blobs_new'] == 1, totals\n"
        "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    repo.refresh_index()
    assert repo.index.has(keyed_id(repo.id_key, (tmp_path / "new").read_bytes()))


def test_worker_count_follows_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default one worker per core of the process's CPU affinity (not of the machine: a
    container or taskset gives fewer), less the cores a caller reserves, at most eight; the
    variable overrides all of it."""
    from keepwell import cpus
    from keepwell.sources.files.workers import worker_count

    monkeypatch.delenv("KEEPWELL_FILE_PROCESSES", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda proc="": None)
    for cores, reserved, other in ((64, 8, 8), (8, 7, 8), (2, 1, 2), (1, 1, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, c=cores: set(range(c)))
        assert cpus.usable_cores() == cores
        assert worker_count("KEEPWELL_FILE_PROCESSES", reserve=1) == reserved
        assert worker_count("KEEPWELL_FILE_PROCESSES") == other
    monkeypatch.setenv("KEEPWELL_FILE_PROCESSES", "3")
    assert worker_count("KEEPWELL_FILE_PROCESSES", reserve=1) == 3
