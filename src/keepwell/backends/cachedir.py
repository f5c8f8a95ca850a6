"""Where the local cache of remote repositories lives, and what it holds (``keepwell cache``).

Words:
    base        the directory every cache is under: ``--cache-dir``, else
                ``$KEEPWELL_CACHE_DIR``, else ``$XDG_CACHE_HOME/keepwell``, else
                ``~/.cache/keepwell``
    repository  the cache of one repository (keepwell.backends.wrappers.CachedBackend):
    cache       ``base/<hash of the location>/<repository id>/``, recognised by its `MARKER`
                file, which holds the repository id and location
    last use    the modification time of a repository cache's directory: set each time a
                command opens the repository (`touch`)

Only directories that carry a marker are ever removed, so a base shared with other files loses
nothing else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass

MARKER = ".repository"


def default_base() -> str:
    """The base directory when ``--cache-dir`` is not given (see the module doc)."""
    env = os.environ.get("KEEPWELL_CACHE_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                        "keepwell")


def touch(directory: str) -> None:
    """Record a use of the repository cache in ``directory``."""
    with contextlib.suppress(OSError):
        os.utime(directory)


@dataclass(frozen=True)
class RepositoryCache:
    path: str
    repository_id: str
    location: str
    size: int
    last_used: float  # seconds since the epoch


def _size(directory: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def list_caches(base: str) -> list[RepositoryCache]:
    """Every repository cache under ``base``, least recently used first."""
    out = []
    try:
        groups = sorted(os.scandir(base), key=lambda e: e.name)
    except OSError:
        return []
    for group in groups:
        if not group.is_dir(follow_symlinks=False):
            continue
        try:
            entries = sorted(os.scandir(group.path), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            marker = os.path.join(entry.path, MARKER)
            try:
                with open(marker, encoding="utf-8") as f:
                    repository_id, _, location = f.read().partition("\n")
                used = os.stat(entry.path).st_mtime
            except (OSError, UnicodeDecodeError):
                continue
            out.append(RepositoryCache(entry.path, repository_id, location.rstrip("\n"),
                                       _size(entry.path), used))
    return sorted(out, key=lambda c: c.last_used)


def remove_unused(base: str, max_unused: float, now: float) -> list[RepositoryCache]:
    """Remove the repository caches under ``base`` not used for more than ``max_unused``
    seconds before ``now`` (and the location directories they leave empty); the removed."""
    removed = []
    for cache in list_caches(base):
        if now - cache.last_used > max_unused:
            shutil.rmtree(cache.path, ignore_errors=True)
            removed.append(cache)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(cache.path))  # only if nothing else is left in it
    return removed
