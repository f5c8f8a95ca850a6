"""Finding PostgreSQL's own programs (pg_dump, pg_restore, pg_basebackup, pg_receivewal...).

`find_program` locates a program of the right major version; `pg_tool` runs one through
keepwell's one runner (`keepwell.sources.tools`), a failure being one `ToolError` line that
quotes what the program said.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Sequence
from typing import Any

from keepwell.sources.postgres.errors import ToolError
from keepwell.sources.tools import ToolProcess

_LIB_ROOT = "/usr/lib/postgresql"


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


def pg_tool(argv: Sequence[str], **options: Any) -> ToolProcess:
    """A PostgreSQL program run by keepwell's one runner; it fails as a `ToolError`."""
    return ToolProcess(argv, error=ToolError, **options)

