"""Failing writes at the boundary between keepwell and the kernel, the way a disk does.

`install` is the local backend's test hook (``KEEPWELL_TESTONLY_WRITE_HOOK``; see
keepwell.backends.local): it replaces the spool module's ``_os_write`` and ``_fdatasync``
(keepwell.backends.spool, through which the local backend writes everything) with ones that
count every call, over every process of a run (the main process and its worker processes share
one counter file), and fail the chosen one as a plan says. Nothing above the system call is
touched: keepwell's own code meets the failure exactly where a full or failing disk puts it.

A plan is ``KEEPWELL_TESTONLY_WRITE_FAULT=<counter file>,<n>,<kind>``:

    count         fail nothing; the counter tells how many writes (and syncs) a run makes
    enospc        the n-th write and every one after it fail with ENOSPC (the disk is full)
    short-enospc  the n-th write stores half its bytes and says so; every later one fails with
                  ENOSPC (how a disk usually fills up)
    edquot        as enospc, with EDQUOT (a quota)
    eio           the n-th write fails with EIO; later ones work (a bad sector)
    short         the n-th write stores half its bytes and says so; later ones work
    sync-eio      the n-th data sync fails with EIO
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

HOOK = "tests.fault.write_faults:install"
KINDS = ("enospc", "short-enospc", "edquot", "eio", "short", "sync-eio")
_COUNTS = struct.Struct("<QQ")  # writes, syncs


def plan_env(counter: Path, n: int, kind: str) -> dict[str, str]:
    """The environment that makes a keepwell process (and its workers) follow a plan."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {"KEEPWELL_TESTONLY_WRITE_HOOK": HOOK,
            "KEEPWELL_TESTONLY_WRITE_FAULT": f"{counter},{n},{kind}",
            "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}


def counts(counter: Path) -> tuple[int, int]:
    """(writes, syncs) counted so far."""
    data = counter.read_bytes() if counter.exists() else b""
    return _COUNTS.unpack(data) if len(data) == _COUNTS.size else (0, 0)


def _bump(counter: str, which: int) -> int:
    """Count one more write (which=0) or sync (1) in the shared file; the new count."""
    fd = os.open(counter, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = os.pread(fd, _COUNTS.size, 0)
        values = list(_COUNTS.unpack(data)) if len(data) == _COUNTS.size else [0, 0]
        values[which] += 1
        os.pwrite(fd, _COUNTS.pack(*values), 0)
        return values[which]
    finally:
        os.close(fd)


def install(local: ModuleType) -> None:
    module = sys.modules["keepwell.backends.spool"]  # imported by the local backend's module
    counter, n_text, kind = os.environ["KEEPWELL_TESTONLY_WRITE_FAULT"].split(",")
    n = int(n_text)
    real_write, real_sync = module._os_write, module._fdatasync

    def write(fd: int, data: Any) -> int:
        i = _bump(counter, 0)
        if kind in ("enospc", "edquot", "short-enospc") and i > n:
            code = errno.EDQUOT if kind == "edquot" else errno.ENOSPC
            raise OSError(code, os.strerror(code))
        if i == n:
            if kind in ("enospc", "edquot"):
                code = errno.EDQUOT if kind == "edquot" else errno.ENOSPC
                raise OSError(code, os.strerror(code))
            if kind == "eio":
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            if kind in ("short", "short-enospc") and len(data) > 1:
                return int(real_write(fd, memoryview(data)[: len(data) // 2]))
        return int(real_write(fd, data))

    def sync(fd: int) -> None:
        if _bump(counter, 1) == n and kind == "sync-eio":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_sync(fd)

    module._os_write = write
    module._fdatasync = sync
