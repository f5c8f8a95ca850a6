"""Real servers that tests start on loopback (one module per server), and the port helpers
they share.

Each server module offers a class that starts one server in a directory of its own, on free
ports, and kills it at the end; the pytest fixtures that use them live in ``tests/integration``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def launch(argv: list[str], cwd: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start a server in a process group of its own, its output going to ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True)


def wait_ready(proc: subprocess.Popen[bytes], probe: Callable[[], tuple[int, bytes]], *,
               what: str, log_path: Path, timeout: float, pause: float = 0.1) -> None:
    """Call ``probe`` (a request returning status and body) until it answers 200."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early; see {log_path}")
        try:
            status, body = probe()
            if status == 200:
                return
            last = (status, body[:200])
        except OSError as exc:
            last = exc
        time.sleep(pause)
    raise TimeoutError(f"{what} not ready: {last!r}; see {log_path}")


def stop_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the server's process group, then SIGKILL it after ``grace`` seconds (at once
    when ``grace`` is 0)."""
    if grace > 0:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
