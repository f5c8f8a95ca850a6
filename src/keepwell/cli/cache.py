"""``keepwell cache``: list the local caches of remote repositories, and remove those not used
for a while (``--cleanup``). Parsing and rendering only: keepwell.backends.cachedir knows the
layout."""

from __future__ import annotations

import os
import time
from datetime import datetime
from typing import Annotated

import typer

from keepwell.backends.cachedir import RepositoryCache, default_base, list_caches, remove_unused
from keepwell.cli.common import GLOBALS, JsonOption, human_bytes, print_json
from keepwell.errors import UsageError


def cache(cleanup: Annotated[bool, typer.Option(
              "--cleanup", help="Remove the caches of repositories not used for --max-unused.")] = False,
          max_unused: Annotated[str | None, typer.Option(
              "--max-unused", metavar="AGE",
              help="With --cleanup: how long a cache may go unused (30d, 2w, 6mo...; "
                   "default: 30d).")] = None,
          json_: JsonOption = False) -> None:
    """List the caches of remote repositories with their size and last use; with --cleanup,
    remove those not used for AGE (default 30d)."""
    from keepwell.units import parse_seconds

    if max_unused is not None and not cleanup:
        raise UsageError("--max-unused is for --cleanup")
    age = parse_seconds("30d" if max_unused is None else max_unused, "--max-unused")
    base = (os.path.abspath(os.path.expanduser(GLOBALS.cache_dir)) if GLOBALS.cache_dir
            else default_base())
    now = time.time()
    removed = remove_unused(base, age, now) if cleanup else []
    caches = list_caches(base)

    def row(c: RepositoryCache) -> dict[str, object]:
        return {"path": c.path, "repository_id": c.repository_id, "location": c.location,
                "size": c.size,
                "last_used": datetime.fromtimestamp(c.last_used).astimezone().isoformat(),
                "unused_days": round((now - c.last_used) / 86400, 1)}

    if json_:
        print_json({"base": base, "caches": [row(c) for c in caches],
                    **({"removed": [row(c) for c in removed]} if cleanup else {})})
        return
    for c in removed:
        print(f"removed {c.path} ({human_bytes(c.size)}, {c.location}, unused for "
              f"{(now - c.last_used) / 86400:.0f} days)")
    if not caches:
        print(f"no caches in {base}")
        return
    print(f"{'Repository ID':14}  {'Last used':19}  {'Size':>11}  Location")
    for c in caches:
        used = datetime.fromtimestamp(c.last_used).astimezone().strftime("%Y-%m-%d %H:%M:%S")
        print(f"{c.repository_id[:12]:14}  {used:19}  {human_bytes(c.size):>11}  {c.location}")
    print(f"{len(caches)} caches in {base}, {human_bytes(sum(c.size for c in caches))}")


def register(app: typer.Typer) -> None:
    app.command()(cache)
