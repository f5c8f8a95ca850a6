"""The metadata read-ahead of a backup: started per directory, stopped after the walk, and never
left running by a process that ends early."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from keepwell.sources.files.prefetch import Prefetch

# "/" takes the read-ahead seconds to walk: long enough to see it running
BIG = "/"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_one_process_per_directory_stopped_by_stop(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    ahead = Prefetch([BIG, str(tmp_path / "file"), str(tmp_path / "missing")], one_file_system=True)
    procs = list(ahead._processes)
    assert len(procs) == 1  # a file and a missing path get none
    assert procs[0].poll() is None
    ahead.stop()
    assert procs[0].returncode == -9
    ahead.stop()  # again: nothing left to do


def test_a_process_that_exits_without_stopping_it_leaves_nothing_running() -> None:
    code = ("import sys; from keepwell.sources.files.prefetch import Prefetch; "
            f"a = Prefetch([{BIG!r}], one_file_system=True); "
            "print(a._processes[0].pid, flush=True); raise SystemExit(3)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    pid = int(proc.stdout)
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)
