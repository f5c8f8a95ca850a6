"""Drivers for PostgreSQL's own programs (pg_dump, pg_restore, pg_basebackup, pg_receivewal...).

`find_program` locates a program of the right major version; `ToolProcess` runs one with its
stderr drained in the background (so a chatty program never blocks on a full pipe) and turns a
failure into one `ToolError` line that quotes what the program said.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import IO, Any

from keepwell.sources.postgres.errors import ToolError
from keepwell.sources.streams import widen_pipe

_LIB_ROOT = "/usr/lib/postgresql"
PIPE_BYTES = 1024 * 1024  # a program streaming to us (pg_basebackup) blocks less often


def find_program(name: str, major: int | None = None) -> str:
    """Path of PostgreSQL program `name`, preferring the binaries of server version `major`."""
    candidates: list[str] = []
    env_dir = os.environ.get("KEEPWELL_PG_BINDIR")
    if env_dir:
        candidates.append(os.path.join(env_dir, name))
    if major is not None:
        candidates.append(os.path.join(_LIB_ROOT, str(major), "bin", name))
    on_path = shutil.which(name)
    if on_path:
        candidates.append(on_path)
    versions = sorted(
        glob.glob(os.path.join(_LIB_ROOT, "*", "bin", name)),
        key=lambda p: int(p.split(os.sep)[-3]) if p.split(os.sep)[-3].isdigit() else 0,
        reverse=True,
    )
    candidates.extend(versions)
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    raise ToolError(f"{name} not found (looked in KEEPWELL_PG_BINDIR, {_LIB_ROOT}/*/bin, PATH)")


class ToolProcess:
    """One running PostgreSQL program; use as a context manager, then `check()`."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        stdin: int | IO[bytes] | None = subprocess.DEVNULL,
        stdout: int | IO[bytes] | None = subprocess.PIPE,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        on_stderr_line: Callable[[str], None] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.name = os.path.basename(self.argv[0])
        self._on_line = on_stderr_line
        self.stderr_lines: list[str] = []
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                self.argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                env=env, cwd=cwd,
            )
        except OSError as exc:
            raise ToolError(f"cannot run {self.name}: {exc.strerror}") from None
        if stdout == subprocess.PIPE and self.proc.stdout is not None:
            widen_pipe(self.proc.stdout, PIPE_BYTES)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            self.stderr_lines.append(line)
            del self.stderr_lines[:-200]
            if self._on_line is not None:
                self._on_line(line)

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    @property
    def stdin(self) -> IO[bytes]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    def wait(self, timeout: float | None = None) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def failure_text(self) -> str:
        errors = [ln for ln in self.stderr_lines if "error" in ln.lower() or "fatal" in ln.lower()]
        text = (errors or self.stderr_lines or ["no message"])[-1]
        prefix = self.name + ": "
        return text[len(prefix):] if text.startswith(prefix) else text

    def check(self, what: str, timeout: float | None = None) -> None:
        rc = self.wait(timeout)
        if rc != 0:
            raise ToolError(f"{what} failed: {self.name} exited with {rc}: {self.failure_text()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)

    def __enter__(self) -> ToolProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc.poll() is None and exc[0] is not None:
            self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def run_program(argv: Sequence[str], what: str, *, env: dict[str, str] | None = None,
                timeout: float | None = None, input_data: bytes | None = None) -> str:
    """Run a program to completion and return its stdout; a failure raises one `ToolError`."""
    try:
        res = subprocess.run(
            list(argv), input=input_data, capture_output=True, env=env, timeout=timeout,
        )
    except OSError as exc:
        raise ToolError(f"cannot run {os.path.basename(argv[0])}: {exc.strerror}") from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"{what} timed out after {timeout} s") from None
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
        msg = lines[-1] if lines else f"exit status {res.returncode}"
        raise ToolError(f"{what} failed: {msg}")
    return res.stdout.decode("utf-8", "replace")
