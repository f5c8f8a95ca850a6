"""Scratch files: created locked, removed by the next run once their owner is gone (a real
SIGKILL), never while it lives; the same with and without O_TMPFILE."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from keepwell.sources.scratch import ScratchFile, sweep

OWNER = r"""
import sys
from keepwell.sources.scratch import ScratchFile
s = ScratchFile.create(sys.argv[1], "kw-t-", ".tmp")
print(s.path, flush=True)
sys.stdin.read()
"""


def _locked(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@pytest.mark.parametrize("named", [False, True])
def test_scratch_files_are_locked_and_cleaned(tmp_path: Path, named: bool) -> None:
    make = ScratchFile._create_named if named else ScratchFile.create
    s = make(str(tmp_path), "kw-t-", ".tmp", mode=0o600)
    assert s.path is not None and os.path.basename(s.path).startswith("kw-t-")
    assert _locked(s.path) and os.stat(s.path).st_mode & 0o777 == 0o600
    os.write(s.fd, b"data")
    assert sweep(str(tmp_path), "kw-t-", ".tmp") == 0  # its owner lives
    s.unlink()
    assert os.listdir(tmp_path) == [] and os.pread(s.fd, 4, 0) == b"data"
    s.close()


def test_the_next_run_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert owner.stdout is not None and owner.stdin is not None
    path = owner.stdout.readline().decode().strip()
    (tmp_path / "kw-t-unrelated.txt").write_bytes(b"x")  # another suffix: not a scratch file
    (tmp_path / "kw-t-dir.tmp").mkdir()  # not a regular file
    ScratchFile.create(str(tmp_path), "kw-t-", ".tmp").close()  # sweeps first
    assert os.path.exists(path)  # alive: kept
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    owner.stdin.close()
    owner.stdout.close()
    with ScratchFile.create(str(tmp_path), "kw-t-", ".tmp") as s:
        assert sorted(os.listdir(tmp_path)) == sorted(
            ["kw-t-unrelated.txt", "kw-t-dir.tmp", os.path.basename(s.path or "")])
    assert sorted(os.listdir(tmp_path)) == ["kw-t-dir.tmp", "kw-t-unrelated.txt"]
