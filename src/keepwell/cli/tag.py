"""``keepwell tag``: add, remove or set the tags of existing snapshots (docs/operations.md,
"Changing snapshots"). Parsing and rendering only; keepwell.repository.snapshot_edit does it."""

from __future__ import annotations

from typing import Annotated

import typer

from keepwell.cli.common import (
    HostFilterOption,
    JsonOption,
    KindFilterOption,
    PasswordFileOption,
    PathFilterOption,
    RepoOption,
    TagFilterOption,
    open_repo,
    print_json,
    snapshot_filter,
    tags_given,
)
from keepwell.errors import UsageError

SnapshotIdsArgument = Annotated[list[str] | None, typer.Argument(
    metavar="[ID]...",
    help="Snapshots (ids or 'latest'); default: every snapshot that matches the filters.")]


def split_tags(values: list[str] | None) -> list[str]:
    """Tags of a repeatable option whose values may hold several (``a,b``)."""
    return [t for group in values or [] for t in group.split(",") if t]


def tag(
    snapshot_ids: SnapshotIdsArgument = None,
    add: Annotated[list[str] | None, typer.Option(
        "--add", metavar="TAG", help="Tags to add (repeatable; 'a,b' adds both).")] = None,
    remove: Annotated[list[str] | None, typer.Option(
        "--remove", metavar="TAG", help="Tags to remove (repeatable; 'a,b' removes both).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="TAG", help="Tags to set, replacing all others (repeatable; 'a,b' sets "
                                     "both; --set '' removes every tag).")] = None,
    host: HostFilterOption = None, tag_filter: TagFilterOption = None,
    path: PathFilterOption = None, kind: KindFilterOption = None,
    repo: RepoOption = None, password_file: PasswordFileOption = None, json_: JsonOption = False,
) -> None:
    """Modify tags on snapshots.

    The command line takes the ids of snapshots, or filters that select them. Each snapshot
    whose tags change is replaced by a new snapshot with the new tags (same time, host and
    contents, and the original id recorded); the old one is removed only after the new one is
    stored, so an interruption leaves both, never neither.
    """
    from keepwell.repository.copy import select_snapshots
    from keepwell.repository.snapshot_edit import SnapshotEditor, changed_tags

    if set_ is not None and (add or remove):
        raise UsageError("--set replaces every tag: give it, or --add/--remove, not both")
    if set_ is None and not add and not remove:
        raise UsageError("nothing to do: give --add, --remove or --set")
    added, removed = tags_given("--add", add), tags_given("--remove", remove)
    r = open_repo(repo, password_file)
    snaps = select_snapshots(r, snapshot_ids or [], snapshot_filter(host, tag_filter, path, kind))
    changed: list[dict[str, object]] = []
    with SnapshotEditor(r, "tag") as editor:
        for old in snaps:
            tags = changed_tags(old.tags, add=added, remove=removed,
                                set_=None if set_ is None else split_tags(set_))
            if tags == sorted(set(old.tags)):
                continue
            new = editor.replace(old, tags=tags)
            r.forget([old.id])  # only now: the new object is stored
            changed.append({"old": old.id, "new": new.id, "tags": tags})
            if not json_:
                print(f"snapshot {old.short_id} -> {new.short_id}: tags "
                      f"{','.join(tags) or '(none)'}")
    if json_:
        print_json({"changed": changed, "unchanged": len(snaps) - len(changed)})
    else:
        print(f"modified tags on {len(changed)} snapshots"
              + (f" ({len(snaps) - len(changed)} unchanged)" if len(snaps) > len(changed) else ""))


def register(app: typer.Typer) -> None:
    app.command()(tag)
