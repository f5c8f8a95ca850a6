"""The paths running PostgreSQL servers on this host use, so that a restore can keep out of them.

A *live path* is the data directory of a running postmaster, its WAL directory when that lies
elsewhere (``pg_wal`` a symbolic link, as ``initdb --waldir`` makes it) or one of its
tablespaces (the targets of the symbolic links in its ``pg_tblspc``). Servers are found in ``/proc``: every
process whose program is ``postgres`` (or ``postmaster``) and whose parent is not, is a
postmaster; its working directory is its data directory (PostgreSQL changes into it at start),
else the ``-D`` of its command line. A data directory that holds ``postmaster.pid`` naming a
running process counts as live too, whoever runs it.

A path *conflicts* with a live path when it is the same directory, lies inside it, or holds it:
a restore that writes (or removes, with ``--delta``) anything there would touch the live server's
files. Paths are compared after resolving symbolic links. Processes of other users whose
directories this user cannot read are missed; a restore runs as the cluster's owner or root,
which can read them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

_PROGRAMS = ("postgres", "postmaster")


@dataclass(frozen=True)
class LiveServer:
    pid: int
    data_directory: str
    tablespaces: tuple[str, ...] = field(default_factory=tuple)
    wal_directory: str | None = None  # pg_wal, when it lies outside the data directory

    def paths(self) -> list[tuple[str, str]]:
        """(path, what it is) of everything this server uses."""
        out = [(self.data_directory, f"the data directory of the running server (pid {self.pid})")]
        if self.wal_directory:
            out.append((self.wal_directory, "the WAL directory of the running server in"
                                            f" {self.data_directory} (pid {self.pid})"))
        out += [(t, f"a tablespace of the running server in {self.data_directory} (pid {self.pid})")
                for t in self.tablespaces]
        return out


def _stat(pid: str) -> tuple[str, str] | None:
    """(program name, parent pid) of a process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()[1]


def _data_directory(pid: str) -> str | None:
    with contextlib.suppress(OSError):
        return os.path.realpath(os.readlink(f"/proc/{pid}/cwd"))
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    for i, arg in enumerate(argv):
        if arg == b"-D" and i + 1 < len(argv):
            return os.path.realpath(argv[i + 1].decode("utf-8", "surrogateescape"))
        if arg.startswith(b"-D") and len(arg) > 2:
            return os.path.realpath(arg[2:].decode("utf-8", "surrogateescape"))
    return None


def tablespaces_of(data_directory: str) -> tuple[str, ...]:
    """The resolved locations of the tablespaces of a data directory (its pg_tblspc links)."""
    out = []
    links = os.path.join(data_directory, "pg_tblspc")
    with contextlib.suppress(OSError):
        for entry in os.scandir(links):
            if entry.is_symlink():
                out.append(os.path.realpath(entry.path))
    return tuple(sorted(out))


def wal_directory_of(data_directory: str) -> str | None:
    """The resolved WAL directory of a data directory when its pg_wal is a link elsewhere."""
    path = os.path.join(data_directory, "pg_wal")
    return os.path.realpath(path) if os.path.islink(path) else None


def running_servers() -> list[LiveServer]:
    """Every postmaster running on this host that this user can see."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    stats = {p: _stat(p) for p in pids}
    programs = {p: st[0] for p, st in stats.items() if st is not None}
    out = []
    for pid, prog in programs.items():
        if prog not in _PROGRAMS:
            continue
        parent = stats[pid][1]  # type: ignore[index]
        if programs.get(parent) in _PROGRAMS:
            continue  # a backend or helper of a postmaster
        datadir = _data_directory(pid)
        if datadir:
            out.append(LiveServer(int(pid), datadir, tablespaces_of(datadir),
                                  wal_directory_of(datadir)))
    return out


def holds_running_server(data_directory: str) -> int | None:
    """The pid in `data_directory`'s postmaster.pid when that process is alive."""
    try:
        with open(os.path.join(data_directory, "postmaster.pid"), encoding="utf-8") as f:
            pid = int(f.readline().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def _overlaps(a: str, b: str) -> bool:
    a, b = a.rstrip(os.sep) or os.sep, b.rstrip(os.sep) or os.sep
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


class LivePaths:
    """The live paths of this host, looked up once."""

    def __init__(self, servers: list[LiveServer] | None = None, *,
                 ours: str | None = None) -> None:
        """`ours`: the data directory of the server doing the restore (its recovery runs the
        WAL fetch), which is not someone else's live server."""
        found = running_servers() if servers is None else servers
        mine = os.path.realpath(ours) if ours else None
        self.servers = [s for s in found if s.data_directory != mine]
        self.paths = [p for s in self.servers for p in s.paths()]
        self.ours = mine

    def conflict(self, path: str) -> str | None:
        """What live path `path` would touch, described; None when it touches none."""
        real = os.path.realpath(path)
        for live, what in self.paths:
            if real == live:
                return f"{path} is {what}"
            if _overlaps(real, live):
                where = "holds" if live.startswith(real.rstrip(os.sep) + os.sep) else "is inside"
                return f"{path} {where} {live}, {what}"
        pid = holds_running_server(real)
        if pid is not None and real != self.ours:
            return f"{path} holds a running server (postmaster.pid, pid {pid})"
        return None
