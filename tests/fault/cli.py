"""Running the ``keepwell`` command as a real process, for the fault tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

KW = [sys.executable, "-m", "keepwell.cli.main"]
PASSWORD = "pw"


def kw(repo: Path | str, *args: str, env: dict[str, str] | None = None,
       timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``keepwell ARGS`` on ``repo`` (password ``pw``, fast key derivation)."""
    full = {**os.environ, "KEEPWELL_PASSWORD": PASSWORD, "KEEPWELL_REPOSITORY": str(repo),
            "KEEPWELL_FROM_PASSWORD": PASSWORD, "KEEPWELL_TESTONLY_WEAK_KDF": "1", **(env or {})}
    return subprocess.run(KW + list(args), env=full, capture_output=True, text=True,
                          timeout=timeout)


def ok(r: subprocess.CompletedProcess[str]) -> str:
    """The output of a command that must succeed."""
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout
