"""Faults at the storage boundary for the snapshot edit tests (``KEEPWELL_TESTONLY_WRITE_HOOK``,
see keepwell.backends.local and tests/fault/write_faults.py): the local backend's writes of a
snapshot object fail, or the process dies the moment it deletes one (a kill between storing the
new snapshot and removing the old)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import ModuleType
from typing import Any


def hook_env(function: str, module: str = __name__) -> dict[str, str]:
    """The environment that installs one of this module's hooks (or another module's) in a
    keepwell process."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {"KEEPWELL_TESTONLY_WRITE_HOOK": f"{module}:{function}",
            "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}


def fail_snapshot_writes(module: ModuleType) -> None:
    real_put = module.LocalBackend.put

    def put(self: Any, name: str, data: Any, **kw: Any) -> None:
        if name.startswith("snapshots/"):  # what the backend makes of a disk's failed write
            raise module._classify(OSError(errno.EIO, os.strerror(errno.EIO)),
                                   f"writing in {self.location}")
        real_put(self, name, data, **kw)

    module.LocalBackend.put = put


def die_on_snapshot_delete(module: ModuleType) -> None:
    real_delete = module.LocalBackend.delete

    def delete(self: Any, name: str) -> None:
        if name.startswith("snapshots/"):
            os._exit(137)  # as SIGKILL leaves it: nothing after this point runs
        real_delete(self, name)

    module.LocalBackend.delete = delete
