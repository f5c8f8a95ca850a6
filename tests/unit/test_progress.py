"""Progress on a terminal: counts, totals, percentage and ETA; nothing when not a terminal."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

from tests.terminal import KW, run_on_tty


def _tree(root: Path, files: int) -> int:
    rng = random.Random(3)
    total = 0
    for i in range(files):
        d = root / f"d{i % 40}"
        d.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(0, 20_000))
        (d / f"f{i}").write_bytes(data)
        total += len(data)
    return total


def test_backup_and_restore_show_totals_percentage_and_eta(tmp_path: Path) -> None:
    _tree(tmp_path / "src", 1500)
    env = dict(os.environ, KEEPWELL_PASSWORD="pw", KEEPWELL_REPOSITORY=str(tmp_path / "repo"))
    subprocess.run(KW + ["init"], env=env, check=True, capture_output=True)
    rc, out = run_on_tty(["backup", str(tmp_path / "src")], env)
    assert rc == 0, out
    final = [line for line in out.split("\r") if line.startswith("backup:")][-1]
    assert "1500/1500 files" in final and "(100%)" in final and "ETA" in final, final

    rc, out = run_on_tty(["restore", "latest", "--target", str(tmp_path / "out")], env)
    assert rc == 0, out
    final = [line for line in out.split("\r") if line.startswith("restore:")][-1]
    assert "/1500 files" in final and "(100%)" in final, final


def test_no_progress_in_pipes(tmp_path: Path) -> None:
    _tree(tmp_path / "src", 50)
    env = dict(os.environ, KEEPWELL_PASSWORD="pw", KEEPWELL_REPOSITORY=str(tmp_path / "repo"))
    subprocess.run(KW + ["init"], env=env, check=True, capture_output=True)
    r = subprocess.run(KW + ["backup", str(tmp_path / "src")], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "backup:" not in r.stderr and "\r" not in r.stderr
