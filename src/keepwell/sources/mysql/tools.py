"""The native programs keepwell drives, found by their MariaDB or MySQL names.

`find_tool` maps a role (``dump``, ``client``, ``binlog``, ``backup``, ``extract``, ``server``,
``install``) to the first program present: MariaDB's name first (``mariadb-dump``), then MySQL's
(``mysqldump``). ``KEEPWELL_MYSQL_BINDIR`` points at a directory to search first.

`ToolProcess` runs one program with its standard error captured to a temporary file (so a
chatty tool can never block on a full pipe) and turns a failure into one `SourceError` line that
quotes the tool's own last error line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from typing import IO, Any

from keepwell.errors import SourceError

NAMES: dict[str, tuple[str, ...]] = {
    "dump": ("mariadb-dump", "mysqldump"),
    "client": ("mariadb", "mysql"),
    "binlog": ("mariadb-binlog", "mysqlbinlog"),
    "backup": ("mariabackup", "mariadb-backup", "xtrabackup"),
    "extract": ("mbstream", "xbstream"),
    "server": ("mariadbd", "mysqld"),
    "install": ("mariadb-install-db", "mysql_install_db"),
}
PACKAGES = {
    "dump": "mariadb-client", "client": "mariadb-client", "binlog": "mariadb-client",
    "backup": "mariadb-backup", "extract": "mariadb-backup", "server": "mariadb-server",
    "install": "mariadb-server",
}


def find_tool(role: str) -> str:
    dirs = [d for d in (os.environ.get("KEEPWELL_MYSQL_BINDIR"),) if d]
    for name in NAMES[role]:
        for d in dirs:
            path = os.path.join(d, name)
            if os.access(path, os.X_OK):
                return path
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
        if found:
            return found
    raise SourceError(f"{NAMES[role][0]} is not installed",
                      hint=f"install {PACKAGES[role]} (or set KEEPWELL_MYSQL_BINDIR)")


def last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        low = ln.lower()
        if "error" in low or "failed" in low or "couldn't" in low or "can't" in low:
            return ln
    return lines[-1] if lines else "no message"


class ToolProcess:
    """One running native program; `finish` waits and raises on failure."""

    def __init__(self, argv: Sequence[str], *, stdin: Any = None, stdout: Any = subprocess.PIPE,
                 env: dict[str, str] | None = None, what: str | None = None,
                 cwd: str | None = None) -> None:
        self.argv = list(argv)
        self.what = what or os.path.basename(self.argv[0])
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in finish()
        try:
            self.proc = subprocess.Popen(self.argv, stdin=stdin, stdout=stdout, stderr=self._err,
                                         env=env, cwd=cwd)
        except OSError as exc:
            self._err.close()
            raise SourceError(f"cannot run {self.what}: {exc.strerror}") from None

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    def stderr_text(self) -> str:
        self._err.seek(0)
        return self._err.read().decode("utf-8", "replace")

    def finish(self, *, timeout: float | None = None) -> str:
        """Wait; return standard error; raise `SourceError` if the program failed."""
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        rc = self.proc.wait(timeout)
        err = self.stderr_text()
        self._err.close()
        if rc != 0:
            raise SourceError(f"{self.what} failed (exit {rc}): {last_error_line(err)}")
        return err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if not self._err.closed:
            self._err.close()


def run_tool(argv: Sequence[str], *, what: str | None = None, stdin: Any = None,
             env: dict[str, str] | None = None, cwd: str | None = None) -> str:
    """Run to completion; return standard output and error together (for parsing logs)."""
    p = ToolProcess(argv, stdin=stdin, stdout=subprocess.DEVNULL, env=env, what=what, cwd=cwd)
    return p.finish()


class ReadAhead:
    """Reads a tool's output in a thread, a bounded number of blocks ahead.

    Without it the tool stalls on a full pipe whenever keepwell is busy chunking and
    compressing, and the two run one after the other instead of side by side.
    """

    def __init__(self, raw: IO[bytes], *, block: int = 4 << 20, depth: int = 16) -> None:
        import queue
        import threading

        self.raw = raw
        self.block = block
        self._q: queue.Queue[bytes | BaseException | None] = queue.Queue(depth)
        self._buf = memoryview(b"")
        self._eof = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="kw-readahead", daemon=True)
        self._thread.start()

    def _put(self, item: bytes | BaseException | None) -> bool:
        import queue

        while not self._stop:
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self._stop:
                data = self.raw.read(self.block)
                if not data:
                    break
                if not self._put(data):
                    return
        except BaseException as exc:  # handed to the reader
            self._put(exc)
            return
        self._put(None)

    def readinto(self, b: memoryview | bytearray) -> int:
        view = memoryview(b).cast("B")
        got = 0
        while got < len(view):
            if not self._buf:
                if self._eof:
                    break
                item = self._q.get()
                if item is None:
                    self._eof = True
                    break
                if isinstance(item, BaseException):
                    raise item
                self._buf = memoryview(item)
            n = min(len(view) - got, len(self._buf))
            view[got:got + n] = self._buf[:n]
            self._buf = self._buf[n:]
            got += n
        return got

    def read(self, n: int = -1) -> bytes:
        out = bytearray(n if n >= 0 else self.block)
        got = self.readinto(out)
        return bytes(out[:got])

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        """Stop reading ahead. The thread ends at its next block, or when the tool's pipe is
        closed by its owner; nothing here waits for the tool."""
        self._stop = True
