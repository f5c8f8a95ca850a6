"""``keepwell log PATH``: the versions of one file or directory across snapshots (docs/files.md,
"The versions of a file"). Parsing and rendering only; keepwell.sources.files.versions looks
them up."""

from __future__ import annotations

import os
import re
from typing import Annotated, Any

import typer

from keepwell.cli.common import (
    HostFilterOption,
    JsonOption,
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
from keepwell.cli.find import iso_time, local_time, mode_string
from keepwell.errors import UsageError


def _when(snap: Any) -> str:
    return f"{snap.time.astimezone():%Y-%m-%d %H:%M:%S}"


def _span(run: Any) -> str:
    first, last = run.snapshots[0], run.snapshots[-1]
    n = len(run.snapshots)
    if n == 1:
        return f"in 1 snapshot ({first.short_id})"
    return f"in {n} snapshots ({first.short_id} .. {last.short_id})"


def _pattern(path: str) -> str:
    """``path`` as an --include pattern that matches it alone (glob characters escaped)."""
    return re.sub(r"([*?\[\\])", r"\\\1", path)


def _ids(run: Any) -> dict[str, Any]:
    first, last = run.snapshots[0], run.snapshots[-1]
    return {"count": len(run.snapshots), "snapshots": [s.id for s in run.snapshots],
            "first": {"id": first.id, "time": first.time.isoformat()},
            "last": {"id": last.id, "time": last.time.isoformat()}}


def log(
    path: Annotated[str, typer.Argument(
        help="The file or directory, as backed up (a relative path is taken from the current "
             "directory).")],
    host: HostFilterOption = None, tag: TagFilterOption = None, path_filter: PathFilterOption = None,
    repo: RepoOption = None, password_file: PasswordFileOption = None, json_: JsonOption = False,
) -> None:
    """Show the versions of one file or directory across snapshots, oldest first.

    Consecutive snapshots that hold the same version are one line; a run of snapshots without
    the path after it was first seen (deleted, maybe recreated later) is shown as a gap.
    """
    from keepwell.repository.copy import select_snapshots
    from keepwell.sources.files.versions import PathHistory

    refuse_empty("PATH", path, "give the file or directory, as backed up; '.' is the current "
                               "directory")
    full = os.path.normpath(os.path.join(os.getcwd(), os.path.expanduser(path)))
    r = open_repo(repo, password_file)
    history = PathHistory(r, full)
    runs, searched = history.runs(select_snapshots(r, [], snapshot_filter(host, tag, path_filter)))
    if not runs:
        why = (f"in none of the {searched} snapshots that back it up" if searched
               else "in no snapshot: none backs it up")
        raise UsageError(f"{history.path} is {why}",
                         hint="check the path (absolute, as backed up) and the filters; "
                              "'keepwell find NAME' searches by name")
    versions = sum(1 for run in runs if run.present)
    if json_:
        out = []
        for run in runs:
            entry: dict[str, Any] = {"present": run.present, **_ids(run)}
            if run.node is not None:
                n = run.node
                entry.update({"type": n.type, "size": n.size, "mode": oct(n.mode),
                              "mtime": iso_time(n.mtime_ns), "mtime_ns": n.mtime_ns,
                              "content_id": run.content})
                if n.target is not None:
                    entry["target"] = n.target
            out.append(entry)
        print_json({"path": history.path, "snapshots_searched": searched, "versions": versions,
                    "history": out})
        return
    print(f"{history.path}: {versions} version(s) in {searched} snapshot(s)")
    for run in runs:
        first = run.snapshots[0]
        if run.node is None:
            print(f"{'':8}  {'':19}  absent {_span(run)}")
            continue
        n = run.node
        size = human_bytes(n.size) if n.type == "file" else n.type
        print(f"{first.short_id}  {_when(first)}  {size:>10}  {local_time(n.mtime_ns)}  {mode_string(n)}  "
              f"{run.content}  {_span(run)}")
    last = next(run for run in reversed(runs) if run.present).snapshots[-1]
    print(f"To restore a version: keepwell restore SNAPSHOT --include '{_pattern(history.path)}' "
          f"--target DIR (SNAPSHOT: one of the ids above, e.g. {last.short_id})")


def register(app: typer.Typer) -> None:
    app.command()(log)
