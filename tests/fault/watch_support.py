"""Running ``keepwell watch`` as a real process on a real tree, for the tests of the watcher
(tests/integration/test_watch.py, tests/fault/test_watch_kills.py): the process and its JSON
lines, listings of the tree and of the latest snapshot, waits until they match, a byte-for-byte
comparison of a restore, and a writer that changes the tree without pause."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from tests.fault.cli import KW, PASSWORD, kw, ok
from tests.waiting import wait_for


class Watch:
    def __init__(self, repo: Path, cache: Path, root: Path, *args: str) -> None:
        self.repo = repo
        self.log = root.parent / f"watch-{os.urandom(4).hex()}.log"
        env = {**os.environ, "KEEPWELL_PASSWORD": PASSWORD, "KEEPWELL_REPOSITORY": str(repo),
               "KEEPWELL_TESTONLY_WEAK_KDF": "1", "KEEPWELL_CACHE_DIR": str(cache)}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                KW + ["watch", str(root), "--json", "--quiet-time", "100ms", "--max-delay",
                      "500ms", *args], env=env, stdout=out, stderr=subprocess.PIPE, text=True)

    def lines(self) -> list[dict[str, Any]]:
        """Every JSON line: the commits, and the events (``"event"``: ``commit_failed``,
        ``caught_up``)."""
        out = []
        with open(self.log) as f:
            for line in f:
                with contextlib.suppress(ValueError):  # a line cut short by a kill
                    out.append(json.loads(line))
        return out

    def commits(self) -> list[dict[str, Any]]:
        return [c for c in self.lines() if "event" not in c]

    def started(self) -> None:
        """Wait for the start scan's commit (a snapshot, or nothing new to record)."""
        wait_for(lambda: self.commits() or self.proc.poll() is not None, "the start scan")
        assert self.proc.poll() is None, self.proc.communicate()

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        _out, err = self.proc.communicate(timeout=120)
        return self.proc.returncode, err


def snapshot_listing(repo: Path, root: Path) -> dict[str, tuple[str, int, int]] | None:
    r = kw(repo, "ls", "latest", "--json")
    if r.returncode != 0:
        return None
    prefix = str(root) + "/"
    return {row["path"][len(prefix):]: (row["type"], row["size"] if row["type"] == "file" else 0,
                                        row["mtime_ns"])
            for row in json.loads(r.stdout) if row["path"].startswith(prefix)}


def tree_listing(root: Path) -> dict[str, tuple[str, int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            kind = "dir" if p.is_dir() and not p.is_symlink() else "symlink" if p.is_symlink() else "file"
            out[str(p.relative_to(root))] = (kind, st.st_size if kind == "file" else 0, st.st_mtime_ns)
    return out


def wait_until_held(repo: Path, root: Path, what: str) -> None:
    """Wait until the latest snapshot lists the tree as it is (names, kinds, sizes, mtimes)."""
    wait_for(lambda: snapshot_listing(repo, root) == tree_listing(root), what, timeout=120,
             interval=0.1)


def assert_same_bytes(repo: Path, root: Path, target: Path) -> None:
    """Restore the latest snapshot and compare it with the tree, byte for byte."""
    ok(kw(repo, "restore", "latest", "--target", str(target)))
    restored = target / str(root).lstrip("/")
    assert tree_listing(restored).keys() == tree_listing(root).keys()
    for rel, (kind, _size, _mtime) in tree_listing(root).items():
        if kind == "file":
            assert (restored / rel).read_bytes() == (root / rel).read_bytes(), rel
        elif kind == "symlink":
            assert os.readlink(restored / rel) == os.readlink(root / rel), rel


def snapshots(repo: Path) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(ok(kw(repo, "snapshots", "--json")))
    return found


def writer_loop(root: Path, stop: threading.Event, seed: int, count: list[int]) -> None:
    """Creates, rewrites, deletes and renames files and directories until ``stop``."""
    rng = random.Random(seed)
    while not stop.is_set():
        d = root / f"w{rng.randrange(8)}"
        d.mkdir(exist_ok=True)
        op = rng.random()
        names = sorted(os.listdir(d))
        if op < 0.6 or not names:
            (d / f"f{rng.randrange(400)}").write_bytes(rng.randbytes(rng.randint(0, 5000)))
        elif op < 0.75:
            victim = d / rng.choice(names)
            if victim.is_dir():
                shutil.rmtree(victim)
            else:
                victim.unlink()
        elif op < 0.9:
            if (d / (name := rng.choice(names))).is_file():  # onto a file or a new name
                (d / name).rename(d / f"f{rng.randrange(400)}")
        else:
            sub = d / f"sub{rng.randrange(5)}"
            sub.mkdir(exist_ok=True)
            (sub / f"s{rng.randrange(20)}").write_bytes(rng.randbytes(100))
        count[0] += 1
