"""Temporary database servers: start one on a restored data directory, wait until it is ready,
stop it.

Drills and point-in-time restores start PostgreSQL and MariaDB/MySQL servers of their own on
data directories in scratch space. The kinds differ only in the program's arguments, in how
they tell that their server is ready and why it died, and in the signal that shuts it down;
`TempServer` does the rest the same way for both: it runs the server program through
keepwell's one runner (`keepwell.sources.tools.ToolProcess`: its standard error captured, its
own session, so a Ctrl-C meant for keepwell does not reach it), optionally as another OS user,
waits until the kind's ``ready`` test passes, the program ends (the kind's ``why`` says why,
from the server's log), the time runs out or the job must stop, and `stop` asks it to shut down
and kills its whole process group after a grace period. As a context manager it is stopped
whatever happens.

Words. The *run-as user* is the OS user a server runs as: PostgreSQL refuses to run as root,
so keepwell running as root starts it as an unprivileged user, after handing that user the
files it needs (`hand_over`); the user must be able to enter every directory above them
(`unreachable` names the first one it cannot).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from keepwell.errors import SourceError
from keepwell.sources.tools import POLL_SECONDS, ToolProcess


def free_port() -> int:
    """A TCP port of the loopback address that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hand_over(path: str, user: str | None) -> None:
    """Give a tree to the server's user (only needed, and only possible, as root)."""
    if user is None or os.geteuid() != 0:
        return
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    for root, dirs, files in os.walk(path):
        for n in (*dirs, *files):
            os.lchown(os.path.join(root, n), pw.pw_uid, pw.pw_gid)


def unreachable(path: str | Path, user: str) -> str | None:
    """The first directory above ``path`` that ``user`` cannot enter (with its mode and owner),
    or None when it can reach ``path`` (root reaches everything)."""
    pw = pwd.getpwnam(user)
    if pw.pw_uid == 0:
        return None
    groups = set(os.getgrouplist(user, pw.pw_gid))
    for parent in reversed(Path(path).resolve().parents):
        try:
            st = parent.stat()
        except OSError:
            break
        bit = (stat.S_IXUSR if st.st_uid == pw.pw_uid else
               stat.S_IXGRP if st.st_gid in groups else stat.S_IXOTH)
        if not st.st_mode & bit:
            return f"{parent} (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid})"
    return None


class TempServer:
    """One database server program run by keepwell until `stop`."""

    def __init__(self, argv: Sequence[str], *, ready: Callable[[], bool],
                 why: Callable[[], str | None], user: str | None = None,
                 stop_signal: int = signal.SIGTERM, what: str = "the restored server",
                 env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.ready = ready
        self.why = why
        self.user = user
        self.stop_signal = stop_signal
        self.what = what
        self.env = env
        self.proc: ToolProcess | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.running()

    def output(self) -> str:
        """What the program wrote on its standard error (PostgreSQL's log, when it logs there)."""
        return self.proc.stderr_text() if self.proc is not None else ""

    def start(self, timeout: float, stop: Callable[[], None] | None = None) -> None:
        """Start the program and wait until it is ready; on any failure it is stopped again."""
        self.proc = ToolProcess(self.argv, what=self.what, stdout=subprocess.DEVNULL,
                                env=self.env, user=self.user, new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if not self.proc.running():
                    raise SourceError(f"{self.what} did not start: {self.why() or 'no message'}")
                if self.ready():
                    return
                if time.monotonic() > deadline:
                    said = self.why()
                    raise SourceError(f"{self.what} was not ready within {timeout:.0f} s"
                                      + (f" (its log: {said})" if said else ""))
                if stop is not None:
                    stop()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.proc.wait(POLL_SECONDS)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 120) -> None:
        """Ask the server to shut down; past ``timeout``, kill it and everything it started."""
        proc = self.proc
        if proc is None:
            return
        if not proc.running():
            proc.kill()  # reaped
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.proc.pid, self.stop_signal)
        try:
            proc.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # still alive, so its group is still its own: kill the children with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.proc.pid, signal.SIGKILL)
            proc.kill()

    def __enter__(self) -> TempServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
