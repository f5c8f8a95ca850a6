"""What the fault tests share: running the CLI, describing a tree, and the audit that decides
whether a repository survived (``check --read-data`` clean, every snapshot restores byte for
byte, with the bytes that did not come back counted)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

KW = [sys.executable, "-m", "keepwell.cli.main"]
PASSWORD = "pw"
SMALL_DISK_MIB = 40


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A small ext4 made in a file and mounted through a loop device (the tests run as root):
    a disk that really fills up."""
    image, mount = tmp_path / "disk.img", tmp_path / "disk"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(SMALL_DISK_MIB << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    r = subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a loop filesystem here (these tests need root): {r.stderr}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def kw_env(repo: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "KEEPWELL_PASSWORD": PASSWORD, "KEEPWELL_REPOSITORY": str(repo),
            "KEEPWELL_TESTONLY_WEAK_KDF": "1", **extra}


def kw(env: dict[str, str], *args: str, check: bool = True,
       timeout: float = 300) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(KW + list(args), env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"keepwell {' '.join(args)}: {r.stderr}{r.stdout}"
    return r


Manifest = dict[str, tuple[str, int]]  # file (relative path) -> (sha256, size)


def manifest(root: Path) -> Manifest:
    """Every file under ``root`` (a file itself: under the name ".")."""
    if root.is_file():
        data = root.read_bytes()
        return {".": (hashlib.sha256(data).hexdigest(), len(data))}
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            out[str(p.relative_to(root))] = (hashlib.sha256(data).hexdigest(), len(data))
    return out


def assert_one_line_error(r: subprocess.CompletedProcess[str]) -> None:
    """A failed command said what went wrong in one line of its own, not with a traceback."""
    lines = [line for line in r.stderr.splitlines() if line.startswith("keepwell: ")
             and "warning:" not in line]
    assert lines, f"no error line: {r.stderr!r}"
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr


@dataclass
class Audit:
    errors: list[str] = field(default_factory=list)
    snapshots: int = 0
    bytes_checked: int = 0
    bytes_lost: int = 0  # of files that did not restore, or not byte for byte

    @property
    def ok(self) -> bool:
        return not self.errors


def audit(repo_path: Path, made: dict[str, Manifest], out: Path) -> Audit:
    """`check --read-data`, then a restore of every snapshot compared with what was backed up
    (``made``: snapshot id -> manifest of its one path). A snapshot the caller does not know is
    an error: no command that failed may leave one."""
    from keepwell.errors import KeepwellError
    from keepwell.repository import open_repository
    from keepwell.repository.check import check
    from keepwell.sources.files import restore_snapshot

    result = Audit()
    with open_repository(str(repo_path), PASSWORD) as repo:
        report = check(repo, read_data_fraction=1.0)
        result.errors += [f"check: {e}" for e in report.errors]
        for snap in repo.list_snapshots():
            result.snapshots += 1
            want = made.get(snap.id)
            if want is None:
                result.errors.append(f"snapshot {snap.short_id} was not reported saved")
                continue
            target = out / f"{snap.short_id}-{time.monotonic_ns()}"
            try:
                res = restore_snapshot(repo, snap, str(target))
                errors = res.errors
            except KeepwellError as exc:
                errors = [("(all)", str(exc))]
            root = target / snap.paths[0].lstrip("/")
            got = manifest(root) if root.exists() else {}
            bad = [rel for rel, entry in want.items() if got.get(rel) != entry]
            result.bytes_checked += sum(size for _digest, size in want.values())
            result.bytes_lost += sum(want[rel][1] for rel in bad)
            extra = sorted(set(got) - set(want))
            if errors or bad or extra:
                result.errors.append(f"snapshot {snap.short_id}: {len(bad)} file(s) differ, "
                                     f"{len(extra)} unexpected, restore errors {errors[:3]}")
    return result
