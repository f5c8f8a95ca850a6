"""``keepwell sqlite``: consistent online backups of SQLite databases."""

from __future__ import annotations

from typing import Annotated

import typer

from keepwell.cli.common import JsonOption, PasswordFileOption, RepoOption, open_repo, print_json

app = typer.Typer(help="Back up and restore SQLite databases.", no_args_is_help=True)


@app.command()
def backup(path: str, tag: Annotated[list[str] | None, typer.Option("--tag")] = None,
           repo: RepoOption = None, password_file: PasswordFileOption = None,
           json_: JsonOption = False) -> None:
    """Copy a live database through SQLite's backup API into a snapshot."""
    from keepwell.sources.sqlite import backup_database

    res = backup_database(open_repo(repo, password_file), path, tags=tag or [])
    if json_:
        print_json(res.snapshot.to_json())
    else:
        print(f"snapshot {res.snapshot.short_id} saved ({res.snapshot.summary.get('bytes_read', 0)} bytes)")


@app.command()
def restore(snapshot: str, target: Annotated[str, typer.Option("--target")],
            repo: RepoOption = None, password_file: PasswordFileOption = None) -> None:
    """Restore a database file; it is checked with PRAGMA integrity_check."""
    from keepwell.sources.sqlite import restore_database

    r = open_repo(repo, password_file)
    restore_database(r, r.find_snapshot(snapshot, kind="sqlite"), target)
    print(f"restored {target} (integrity_check ok)")
