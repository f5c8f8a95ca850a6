"""Which history of a server name a new snapshot joins, or why it is refused.

Every backup, ``binlog-push`` and ``binlog-stream`` is admitted before it stores anything
(`admit`), against the name's current history (`catalog.ServerArchive.current`):

- the name holds nothing yet: history 0;
- the server is the current history's (`identity.same_server`) and its binary log continues
  what that history archived: that history;
- otherwise the snapshot is refused, unless ``--new-server`` says the name now belongs to this
  server (another server, or this one after its binary log was reset or it was rebuilt from a
  backup): then it starts the next history. ``--new-server`` given to the server the name
  already holds, whose binary log continues, changes nothing, so a script may always pass it.

*Continues* (`discontinuity`) is judged from what the server lists (``SHOW BINARY LOGS``) and,
where keepwell reads the files itself, their heads (`binlog.BinlogHead`): the binlog base name
is the same, the server's newest file is not older than the furthest position the history
records, a file both hold is not shorter on the server, and has the same head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from keepwell.errors import SourceError
from keepwell.sources.mysql.binlog import BinlogHead, binlog_seq, split_name
from keepwell.sources.mysql.catalog import Catalog, ServerArchive
from keepwell.sources.mysql.connection import ServerInfo
from keepwell.sources.mysql.identity import describe_server, differences, same_server

Heads = Callable[[str], BinlogHead | None]  # the head of a binlog file keepwell can read


@dataclass(frozen=True)
class Admission:
    """The history a snapshot joins; ``declared`` when ``--new-server`` started it."""

    history: int
    declared: bool = False
    notes: tuple[str, ...] = ()

    def source(self, info: ServerInfo) -> dict[str, Any]:
        """The fields every snapshot of this admission records in its ``source``."""
        out: dict[str, Any] = {"server": {**info.identity(), "history": self.history}}
        if self.declared:
            out["new_server"] = True
        return out


def discontinuity(cat: Catalog, on_server: Sequence[tuple[str, int]],
                  heads: Heads | None = None) -> str | None:
    """Why the server's binary log does not continue ``cat``, or None if it does (or nothing
    can be compared: no binary log, or nothing archived)."""
    high = cat.high_water()
    if high is None or not on_server:
        return None
    newest = on_server[-1][0]
    theirs, mine = split_name(high.file)[0], split_name(newest)[0]
    if theirs != mine:
        return f"its binary log is named {mine}.*, the archived one {theirs}.*"
    if binlog_seq(newest) < high.seq:
        return f"its newest binary log is {newest}, but the archive reaches {high}"
    sizes = dict(on_server)
    for name, f in sorted(cat.files.items()):
        size = sizes.get(name)
        if size is not None and size < f.size:
            return f"{name} holds {size} bytes on the server but {f.size} in the archive"
        head = heads(name) if heads is not None and size is not None else None
        if head is not None and head.differs(f.head):
            return (f"{name} on the server ({head.describe()}) is not the archived "
                    f"{name} ({f.head.describe()})")
    return None


def admit(archive: ServerArchive, info: ServerInfo, name: str,
          on_server: Sequence[tuple[str, int]], *, heads: Heads | None = None,
          new_server: bool = False) -> Admission:
    """The history a snapshot of this server joins under ``name`` (see the module)."""
    current = archive.current
    if current is None:
        return Admission(0, notes=(f"--new-server: nothing is archived under {name} yet",)
                         if new_server else ())
    mine = info.identity()
    following = max(c.history for c in archive.catalogs) + 1
    if not same_server(current.identity, mine):
        if not new_server:
            raise SourceError(
                f"{name} holds the backups of {describe_server(current.identity)}; this server "
                f"is {describe_server(mine)} ({'; '.join(differences(current.identity, mine))}):"
                " refusing to file another server's data under the same name",
                hint="if this server replaces that one, pass --new-server; otherwise choose "
                     "another --server-name")
        return Admission(following, True, (
            f"new server under {name}: history {following} begins (history "
            f"{current.history} was {describe_server(current.identity)})",))
    why = discontinuity(current, on_server, heads)
    if why is None:
        return Admission(current.history, notes=(
            f"--new-server ignored: this is the server already archived under {name}, and "
            "its binary log continues the archived one",) if new_server else ())
    if not new_server:
        raise SourceError(
            f"the binary log of this server no longer continues what is archived under "
            f"{name}: {why}",
            hint="if its binary log was reset (RESET MASTER) or the server was rebuilt, pass "
                 "--new-server to start a new history under this name")
    return Admission(following, True, (
        f"new history {following} under {name}: {why}",))
