"""Running the native programs sources drive (pg_dump, mariabackup, keepwell's own commands...).

`ToolProcess` is the one runner: it starts a program with its standard error captured to an
unnamed temporary file (so a chatty program never blocks on a full pipe, and a long log such as
mariabackup's can be read whole afterwards), optionally as another OS user (`as_user`, as root)
or in a session of its own, waits for it, optionally checking a job's stop points while it runs
(`wait(check=...)`: a job past its deadline kills the program), and turns a failure into one
line of the source's error class that quotes what the program said (`failure_line`: its last
line that says error, fatal, failed, or can't; else its last line).

`run_program` runs one to completion and returns its standard output; `run_tool` returns its
standard error (for tools whose log is their answer); `keepwell_program` is how keepwell calls
its own command line from a job.
"""

from __future__ import annotations

import contextlib
import math
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from keepwell.errors import KeepwellError, SourceError
from keepwell.sources.streams import widen_pipe

PIPE_BYTES = 1024 * 1024  # a program streaming to us (pg_basebackup) blocks less often
POLL_SECONDS = 0.2  # how often a running program's job is asked whether it must stop
TAIL_BYTES = 64 * 1024  # how much of standard error a failure line is looked for in
_FAILURE_WORDS = ("error", "fatal", "failed", "couldn't", "can't")


# the longest path a Unix socket may have: sun_path holds 108 bytes with the terminating NUL
SOCKET_PATH_MAX = 107


def socket_directory(preferred: str, name: str, prefix: str) -> str:
    """Where a temporary server's Unix socket ``name`` goes: ``preferred`` if the socket's path
    fits in sun_path, else a new private directory (mode 700) under the system's temporary
    directory, or /tmp if that is long too; its caller removes such a directory (its base name
    starts with ``prefix``) when the server has stopped. Scratch and data directories can be
    deep (a job's scratch space, a restore target): a server refuses a socket path that does
    not fit, and so would its clients."""
    if len(os.fsencode(os.path.join(preferred, name))) <= SOCKET_PATH_MAX:
        return preferred
    base = tempfile.gettempdir()
    if len(os.fsencode(os.path.join(base, prefix + "x" * 8, name))) > SOCKET_PATH_MAX:
        base = "/tmp"
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def failure_line(text: str, name: str = "") -> str:
    """The line of a program's output that says why it failed (without its ``name:`` prefix)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    said = [ln for ln in lines if any(w in ln.lower() for w in _FAILURE_WORDS)]
    line = (said or lines or ["no message"])[-1]
    prefix = name + ": "
    return line[len(prefix):] if name and line.startswith(prefix) else line


class ToolProcess:
    """One running native program. Use it as a context manager (a program still running when
    the block fails is killed), then `check` it (or `finish`, which also returns its log)."""

    def __init__(self, argv: Sequence[str], *, what: str | None = None,
                 stdin: int | IO[bytes] | None = subprocess.DEVNULL,
                 stdout: int | IO[bytes] | None = subprocess.PIPE,
                 env: dict[str, str] | None = None, cwd: str | None = None,
                 error: type[KeepwellError] = SourceError, new_session: bool = False,
                 user: str | None = None) -> None:
        self.argv = [str(a) for a in argv]
        self.name = os.path.basename(self.argv[0])
        self.what = what or self.name
        self.error = error
        self.new_session = new_session
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                self.argv, stdin=stdin, stdout=stdout, stderr=self._err, cwd=cwd,
                start_new_session=new_session, **as_user(user, env))
        except OSError as exc:
            self._err.close()
            raise error(f"cannot run {self.name}: {exc.strerror}") from None
        if stdout == subprocess.PIPE and self.proc.stdout is not None:
            widen_pipe(self.proc.stdout, PIPE_BYTES)

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    @property
    def stdin(self) -> IO[bytes]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None, *,
             check: Callable[[], None] | None = None) -> int:
        """The exit status. With ``check``, it is called while the program runs; whatever it
        raises kills the program and propagates."""
        if check is None:
            return self.proc.wait(timeout)
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self.proc.wait(max(0.0, min(POLL_SECONDS, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    raise
            try:
                check()
            except BaseException:
                self.kill()
                raise

    def stderr_text(self, limit: int | None = None) -> str:
        """What the program wrote on standard error (its last ``limit`` bytes)."""
        if self._err.closed:
            return ""
        end = self._err.seek(0, os.SEEK_END)
        self._err.seek(max(0, end - limit) if limit else 0)
        return self._err.read().decode("utf-8", "replace")

    def failure_text(self) -> str:
        return failure_line(self.stderr_text(TAIL_BYTES), self.name)

    def check(self, what: str | None = None, timeout: float | None = None, *,
              stop: Callable[[], None] | None = None) -> None:
        """Wait; a non-zero exit raises one line of the source's error class."""
        rc = self.wait(timeout, check=stop)
        if rc != 0:
            raise self.error(f"{what or self.what} failed: {self.name} exited with {rc}: "
                             f"{self.failure_text()}")

    def finish(self, *, timeout: float | None = None,
               stop: Callable[[], None] | None = None) -> str:
        """Close our end of its output, wait, and return its standard error; raise on failure."""
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.check(timeout=timeout, stop=stop)
        text = self.stderr_text()
        self.close()
        return text

    def kill(self) -> None:
        """Kill the program; one started in a session of its own is killed with everything it
        started (its process group: a script's children would outlive it otherwise)."""
        if self.new_session and self.proc.returncode is None:
            # not reaped yet, so its pid (the group's id) cannot have been reused
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """Release the pipes and the captured standard error (the program must have ended)."""
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if not self._err.closed:
            self._err.close()

    def __enter__(self) -> ToolProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def as_user(user: str | None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`subprocess.Popen` options that run a program as ``user`` (its uid, gid and groups, and
    its HOME, USER and LOGNAME), as ``runuser -u`` would; none when it is keepwell's own user.
    Switching needs root."""
    if user is None:
        return {"env": env}
    pw = pwd.getpwnam(user)
    if pw.pw_uid == os.geteuid():
        return {"env": env}
    return {"user": pw.pw_uid, "group": pw.pw_gid,
            "extra_groups": os.getgrouplist(user, pw.pw_gid),
            "env": {**(os.environ if env is None else env), "HOME": pw.pw_dir, "USER": user,
                    "LOGNAME": user}}


def run_tool(argv: Sequence[str], *, what: str | None = None,
             stdin: int | IO[bytes] | None = subprocess.DEVNULL,
             env: dict[str, str] | None = None, cwd: str | None = None,
             error: type[KeepwellError] = SourceError, timeout: float | None = None,
             stop: Callable[[], None] | None = None, new_session: bool = False,
             user: str | None = None) -> str:
    """Run to completion; return its standard error (for tools whose log is their answer)."""
    with ToolProcess(argv, what=what, stdin=stdin, stdout=subprocess.DEVNULL, env=env, cwd=cwd,
                     error=error, new_session=new_session, user=user) as proc:
        return proc.finish(timeout=timeout, stop=stop)


def run_program(argv: Sequence[str], what: str, *, env: dict[str, str] | None = None,
                timeout: float | None = None, input_data: bytes | None = None,
                error: type[KeepwellError] = SourceError) -> str:
    """Run to completion and return its standard output (``input_data`` on its standard
    input); a failure, or running past ``timeout``, raises one line of ``error``."""
    with ToolProcess(argv, what=what, stdin=subprocess.PIPE if input_data is not None
                     else subprocess.DEVNULL, env=env, error=error) as proc:
        try:
            out, _ = proc.proc.communicate(input_data, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise error(f"{what} timed out after {timeout} s") from None
        proc.check(what)
        proc.close()
    return out.decode("utf-8", "replace")


def keepwell_program() -> list[str]:
    """How to run keepwell's own command line: the entry point beside this interpreter, else
    the one on PATH, else this interpreter with the module."""
    exe = os.path.join(os.path.dirname(sys.executable), "keepwell")
    if os.path.exists(exe):
        return [exe]
    found = shutil.which("keepwell")
    return [found] if found else [sys.executable, "-m", "keepwell.cli.main"]
