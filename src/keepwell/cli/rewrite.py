"""``keepwell rewrite``: drop files from existing snapshots (docs/operations.md, "Changing
snapshots"). Parsing and rendering only: keepwell.sources.files.rewrite filters the trees,
keepwell.repository.snapshot_edit stores the new snapshots."""

from __future__ import annotations

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
from keepwell.cli.tag import SnapshotIdsArgument
from keepwell.errors import UsageError

REWRITE_TAG = "rewrite"
DEFAULT_KINDS = ("files", "stdin", "sqlite")


def rewrite(
    snapshot_ids: SnapshotIdsArgument = None,
    exclude: Annotated[list[str] | None, typer.Option(
        "--exclude", "-e", metavar="PATTERN",
        help="Remove what this pattern matches (repeatable; the patterns of backup --exclude).")] = None,
    iexclude: Annotated[list[str] | None, typer.Option(
        "--iexclude", metavar="PATTERN",
        help="As --exclude, ignoring the case of letters.")] = None,
    exclude_file: Annotated[list[str] | None, typer.Option(
        "--exclude-file", metavar="FILE", help="File of exclude patterns, one a line "
                                               "(repeatable).")] = None,
    forget: Annotated[bool, typer.Option(
        "--forget", help="Remove the original snapshots once their new ones are stored.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", "-n", help="Say what would be removed; store and remove nothing.")] = False,
    host: HostFilterOption = None, tag: TagFilterOption = None,
    path: PathFilterOption = None,
    kind: Annotated[list[str] | None, typer.Option(
        "--kind", help="Only snapshots of this kind (repeatable; default: files, stdin and "
                       "sqlite, as a database's snapshots are restored whole).")] = None,
    repo: RepoOption = None, password_file: PasswordFileOption = None, json_: JsonOption = False,
) -> None:
    """Rewrite snapshots to exclude unwanted files.

    Each snapshot that holds something the exclude patterns match gets a new snapshot without
    it (same time, host and tags, plus the tag 'rewrite', and the original id recorded).
    Originals stay unless --forget is given; 'keepwell prune' then frees the data no snapshot
    uses any more.
    """
    from keepwell.crypto import keyed_id
    from keepwell.repository.copy import select_snapshots
    from keepwell.repository.snapshot_edit import SnapshotEditor
    from keepwell.repository.tree import encode_tree
    from keepwell.sources.files.rewrite import TreeFilter
    from keepwell.sources.files.select import Matcher, read_pattern_file

    refuse_empty("--exclude", exclude, "give a pattern, or no --exclude")
    refuse_empty("--iexclude", iexclude, "give a pattern, or no --iexclude")
    patterns = list(exclude or [])
    for f in exclude_file or []:
        patterns += read_pattern_file(f)
    exact, folded = Matcher(patterns), Matcher(iexclude or [], ignore_case=True)
    if not exact and not folded:
        raise UsageError("nothing to remove: give --exclude, --iexclude or --exclude-file")
    r = open_repo(repo, password_file)
    snaps = [s for s in select_snapshots(r, snapshot_ids or [],
                                         snapshot_filter(host, tag, path, kind))
             if kind or snapshot_ids or s.kind in DEFAULT_KINDS]
    rows: list[dict[str, Any]] = []

    def excluded(p: str) -> bool:
        return exact.matches(p) or folded.matches(p)

    with SnapshotEditor(r, "rewrite") as editor:
        save = ((lambda nodes: keyed_id(r.id_key, encode_tree(nodes))) if dry_run
                else editor.save_tree)
        trees = TreeFilter(r, excluded, save)
        for old in snaps:
            tree, removed = trees.snapshot(old)
            if not removed.paths:
                continue
            row: dict[str, Any] = {"old": old.id, "new": None, "removed": removed.paths,
                                   "files_removed": removed.files,
                                   "bytes_removed": removed.bytes, "forgotten": False}
            if not dry_run:
                new = editor.replace(old, tree=tree, tags=[*old.tags, REWRITE_TAG], summary={
                    "rewritten": {"files_removed": removed.files,
                                  "bytes_removed": removed.bytes}})
                row["new"] = new.id
                if forget:
                    r.forget([old.id])  # only now: the new object is stored
                    row["forgotten"] = True
            rows.append(row)
            if not json_:
                _render(old.short_id, row, dry_run)
    if json_:
        print_json({"rewritten": rows, "unchanged": len(snaps) - len(rows), "dry_run": dry_run})
    else:
        would = "would rewrite" if dry_run else "rewrote"
        print(f"{would} {len(rows)} of {len(snaps)} snapshots"
              + ("; run 'keepwell prune' to free the data they no longer use"
                 if forget and rows and not dry_run else ""))


def _render(short_id: str, row: dict[str, Any], dry_run: bool) -> None:
    for p in row["removed"]:
        print(f"{'would remove' if dry_run else 'removed'} {p}")
    done = "" if dry_run else f" -> {row['new'][:8]}" + (" (original forgotten)"
                                                         if row["forgotten"] else "")
    print(f"snapshot {short_id}{done}: {row['files_removed']} files, "
          f"{human_bytes(row['bytes_removed'])} removed")


def register(app: typer.Typer) -> None:
    app.command()(rewrite)
