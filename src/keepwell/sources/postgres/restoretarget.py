"""Where a physical restore may write, decided and checked before anything is written.

A restore writes only into directories it creates or that it was given: the data directory
(``--target-dir``) and, for each tablespace of the base backup, either ``pg_tblspc/<oid>``
inside the data directory (an *in-place* tablespace: the default, so a restore on the live
cluster's host never goes near the live tablespaces) or a directory the user named
(``--tablespace-map OID_OR_NAME=DIR``, ``--tablespace-map-all DIR``: then ``DIR/<oid>``).
Tablespaces created by WAL replayed after the backup follow the same rules at fetch time
(`walguard`).

Refused, with one line and before the first byte: a target that is, holds or lies inside a path
a running server uses (`liveservers`), a non-empty directory without ``--delta``, a data
directory whose ``postmaster.pid`` names a running process, and a mapping that names a
tablespace the backup does not have by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from keepwell.errors import IntegrityError, RestoreTargetError, UsageError
from keepwell.sources.postgres.catalog import BaseBackup
from keepwell.sources.postgres.liveservers import LivePaths


@dataclass(frozen=True)
class TablespacePlace:
    oid: str
    name: str
    directory: str | None  # None: in place, pg_tblspc/<oid> inside the data directory

    def path(self, root: str) -> str:
        return self.directory or os.path.join(root, "pg_tblspc", self.oid)


@dataclass(frozen=True)
class TargetLayout:
    root: str
    tablespaces: list[TablespacePlace]

    def map_lines(self) -> list[str]:
        """``tablespace_map`` lines: only the tablespaces placed outside the data directory."""
        return [f"{t.oid} {t.directory}\n" for t in self.tablespaces if t.directory]

    def roots(self) -> list[str]:
        return [self.root, *(t.directory for t in self.tablespaces if t.directory)]


def _is_oid(key: str) -> bool:
    return key.isdigit()


def plan_layout(target_dir: str, backup: BaseBackup, *, delta: bool,
                tablespace_map: dict[str, str] | None = None,
                tablespace_map_all: str | None = None,
                live: LivePaths | None = None) -> TargetLayout:
    """Every destination of the restore, checked; raises `RestoreTargetError` on any refusal."""
    live = live if live is not None else LivePaths()
    root = os.path.abspath(target_dir)
    mapping = dict(tablespace_map or {})
    names = {str(meta.get("name")): oid for oid, meta in backup.tablespaces.items()}
    for key in mapping:
        if not _is_oid(key) and key not in names:
            raise UsageError(
                f"backup {backup.short_id} has no tablespace named {key!r}"
                + (f" (it has {', '.join(sorted(names))})" if names else ""),
                hint="a tablespace created after the backup is known by its OID only:"
                     " --tablespace-map OID=DIR")
    _check_directory(root, "the target directory", delta=delta, live=live)
    places = []
    for oid, meta in sorted(backup.tablespaces.items()):
        if not _is_oid(oid):  # joined to paths below: never a name of more than one directory
            raise IntegrityError(f"backup {backup.short_id} records a tablespace {oid!r} that"
                                 " is not an OID: not restored")
        name = str(meta.get("name"))
        chosen = mapping.get(oid) or mapping.get(name)
        if chosen is None and tablespace_map_all:
            chosen = os.path.join(tablespace_map_all, oid)
        if chosen is None:
            places.append(TablespacePlace(oid, name, None))
            continue
        directory = os.path.abspath(chosen)
        if _overlap(directory, root):
            raise RestoreTargetError(
                f"tablespace {name} cannot be placed at {directory}: inside the target directory"
                f" {root}", hint="leave it unmapped to keep it inside the data directory")
        _check_directory(directory, f"the location of tablespace {name}", delta=delta,
                         live=live)
        other = next((p for p in places if p.directory and _overlap(p.directory, directory)),
                     None)
        if other is not None:  # one directory, one tablespace, as PostgreSQL itself demands
            raise RestoreTargetError(
                f"tablespaces {other.name} and {name} cannot share a directory"
                f" ({other.directory}, {directory}): their files have the same names, and one"
                " would overwrite the other's", hint="map each tablespace to a directory of its"
                " own")
        places.append(TablespacePlace(oid, name, directory))
    for extra in {os.path.abspath(d) for d in mapping.values()} | (
            {os.path.abspath(tablespace_map_all)} if tablespace_map_all else set()):
        conflict = live.conflict(extra)  # also mappings for tablespaces the WAL creates
        if conflict:
            raise RestoreTargetError(f"refusing to restore a tablespace to {extra}: {conflict}",
                                     hint="map it to a directory no running server uses")
    by_oid = {(k if _is_oid(k) else names[k]): os.path.abspath(d) for k, d in mapping.items()}
    for oid, directory in by_oid.items():  # also the tablespaces the WAL creates
        for first, there in by_oid.items():
            if first < oid and _overlap(there, directory):
                raise RestoreTargetError(
                    f"tablespaces {first} and {oid} cannot share a directory ({there},"
                    f" {directory}): their files have the same names, and one would overwrite"
                    " the other's", hint="map each tablespace to a directory of its own")
        if _overlap(directory, root):
            raise RestoreTargetError(
                f"tablespace {oid} cannot be placed at {directory}: inside the target directory"
                f" {root}", hint="leave it unmapped to keep it inside the data directory")
    return TargetLayout(root, places)


def _overlap(a: str, b: str) -> bool:
    a, b = a.rstrip(os.sep), b.rstrip(os.sep)
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


def _check_directory(path: str, what: str, *, delta: bool, live: LivePaths) -> None:
    conflict = live.conflict(path)
    if conflict:
        raise RestoreTargetError(f"refusing to restore into {what}: {conflict}",
                                 hint="choose a directory no running server uses")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise RestoreTargetError(f"{what} {path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not delta:
        raise RestoreTargetError(
            f"{what} {path} is not empty",
            hint="restore into an empty directory, or pass --delta to rewrite it (with its"
                 " server stopped)")
    for link in _links_in(path):  # a delta writes through the links it finds (pg_wal, ...)
        conflict = live.conflict(link)
        if conflict:
            raise RestoreTargetError(f"refusing to restore into {what}: its link to {conflict}",
                                     hint="remove the link, or restore elsewhere")


def _links_in(path: str) -> list[str]:
    """Symbolic links at the top of a directory and in its pg_tblspc."""
    out = []
    for d in (path, os.path.join(path, "pg_tblspc")):
        try:
            with os.scandir(d) as it:
                out += [e.path for e in it if e.is_symlink()]
        except (FileNotFoundError, NotADirectoryError):
            continue
    return out
