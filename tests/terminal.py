"""Running the keepwell command with a terminal as its standard error (progress is shown only
on a terminal)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

KW = [sys.executable, "-m", "keepwell.cli.main"]


def run_on_tty(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``keepwell ARGS``; return its exit code and what it wrote to the terminal."""
    master, slave = pty.openpty()
    p = subprocess.Popen(KW + args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=slave)
    os.close(slave)
    out = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO once the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return p.wait(), out.decode(errors="replace")
