"""``keepwell find``: which snapshots hold paths that match patterns (docs/operations.md,
"Finding files"). Parsing and rendering only; keepwell.sources.files.find searches."""

from __future__ import annotations

import stat
from typing import Annotated, Any

import typer

from keepwell.cli.common import (
    HostFilterOption,
    JsonOption,
    KindFilterOption,
    PasswordFileOption,
    PathFilterOption,
    RepoOption,
    TagFilterOption,
    human_bytes,
    open_repo,
    print_json,
    refuse_empty,
    snapshot_filter,
)
from keepwell.errors import UsageError

_TYPE_CHAR = {"dir": "d", "symlink": "l", "fifo": "p", "chardev": "c", "blockdev": "b",
              "socket": "s"}


def mode_string(node: Any) -> str:
    """``-rw-r--r--`` for a node."""
    return _TYPE_CHAR.get(node.type, "-") + stat.filemode(node.mode)[1:]


def find(
    patterns: Annotated[list[str], typer.Argument(
        metavar="PATTERN...", help="Patterns of paths to find (docs/operations.md, Patterns).")],
    snapshot: Annotated[list[str] | None, typer.Option(
        "--snapshot", "-s", metavar="ID",
        help="Only this snapshot (repeatable; an id or 'latest'; default: every snapshot that "
             "matches the filters).")] = None,
    oldest: Annotated[str | None, typer.Option(
        "--oldest", "-O", metavar="TIME",
        help="Oldest modification time of a match (2026-11-24, '2026-11-24 17:05', 7d).")] = None,
    newest: Annotated[str | None, typer.Option(
        "--newest", "-N", metavar="TIME", help="Newest modification time of a match.")] = None,
    ignore_case: Annotated[bool, typer.Option(
        "--ignore-case", "-i", help="Ignore the case of letters in the patterns.")] = False,
    host: HostFilterOption = None, tag: TagFilterOption = None,
    path: PathFilterOption = None, kind: KindFilterOption = None,
    repo: RepoOption = None, password_file: PasswordFileOption = None, json_: JsonOption = False,
) -> None:
    """Find a file, a directory or a pattern in snapshots.

    A pattern ends at the path it matches: '*.txt' finds the files named so anywhere,
    '/home/alice/notes' that one path, 'alice/*.pdf' the PDFs directly in any directory named
    alice. Each snapshot with matches is listed, oldest first, with the mode, size and
    modification time of each match.
    """
    from keepwell.repository.copy import select_snapshots
    from keepwell.sources.files.find import Finder
    from keepwell.units import parse_time

    refuse_empty("PATTERN", patterns, "give a pattern such as '*.txt' or a path")
    lo = parse_time(oldest, "--oldest") if oldest is not None else None
    hi = parse_time(newest, "--newest") if newest is not None else None
    if lo and hi and lo > hi:
        raise UsageError(f"--oldest {oldest} is after --newest {newest}: nothing can match")
    r = open_repo(repo, password_file)
    snaps = select_snapshots(r, snapshot or [], snapshot_filter(host, tag, path, kind))
    finder = Finder(r, patterns, ignore_case=ignore_case,
                    oldest_ns=int(lo.timestamp() * 1e9) if lo else None,
                    newest_ns=int(hi.timestamp() * 1e9) if hi else None)
    out: list[dict[str, Any]] = []
    for snap in snaps:
        matches = finder.in_snapshot(snap)
        if not matches:
            continue
        if json_:
            out.append({"snapshot": snap.id, "time": snap.time.isoformat(), "hits": len(matches),
                        "matches": [{"path": m.path, **m.node.to_json(),
                                     "mtime": iso_time(m.node.mtime_ns)} for m in matches]})
            continue
        print(f"Found matching entries in snapshot {snap.short_id} from "
              f"{snap.time.astimezone():%Y-%m-%d %H:%M:%S}")
        for m in matches:
            n = m.node
            size = human_bytes(n.size) if n.type == "file" else "-"
            print(f"{mode_string(n)}  {size:>10}  {local_time(n.mtime_ns)}  {m.path}"
                  + (f" -> {n.target}" if n.target is not None else ""))
        print()
    if json_:
        print_json(out)
    elif not out and not snaps:
        print("no snapshots to search")


def iso_time(mtime_ns: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(mtime_ns / 1e9, UTC).isoformat()


def local_time(mtime_ns: int) -> str:
    from datetime import datetime

    return f"{datetime.fromtimestamp(mtime_ns / 1e9):%Y-%m-%d %H:%M:%S}"


def register(app: typer.Typer) -> None:
    app.command()(find)
