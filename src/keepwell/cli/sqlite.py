"""``keepwell sqlite``: consistent online backups of SQLite databases, and safe restores."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from keepwell.cli.common import (
    JsonOption,
    PasswordFileOption,
    RepoOption,
    human_bytes,
    open_repo,
    print_json,
    refuse_empty,
    tags_given,
)
from keepwell.cli.repo_commands import Progress

app = typer.Typer(help="Back up and restore SQLite databases.", no_args_is_help=True)

BusyTimeoutOption = Annotated[float, typer.Option(
    "--busy-timeout", metavar="SECONDS", min=0,
    help="How long to wait for a lock on the database before giving up (docs/sqlite.md).")]


class CopyThenStore:
    """Renders a backup's two phases: the local copy (``sqlite_copy`` events), then storing."""

    def __init__(self) -> None:
        self.copying = Progress("copy")
        self.storing = Progress("backup")
        self._stored = False

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        if name == "sqlite_copy":
            self.copying.set_total(1, fields["total"], True)
            self.copying("bytes", {"n": fields["n"]})
            return
        if not self._stored:
            self._stored = True
            self.copying("file", {})
            self.copying.done()
        self.storing(name, fields)

    def done(self) -> None:
        self.storing.done()


@app.command()
def backup(path: str,
           tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag the snapshot.")] = None,
           host: Annotated[str | None, typer.Option(help="Host name to record.")] = None,
           busy_timeout: BusyTimeoutOption = 60.0,
           repo: RepoOption = None, password_file: PasswordFileOption = None,
           json_: JsonOption = False) -> None:
    """Copy a live database consistently (one read transaction) into a snapshot."""
    from keepwell.sources.sqlite import backup_database

    refuse_empty("--host", host, "give a host name, or leave the option out for this machine's")
    tags = tags_given("--tag", tag)
    r = open_repo(repo, password_file)
    progress = CopyThenStore()
    r.events.subscribe(progress)
    res = backup_database(r, path, tags=tags, host=host, busy_timeout=busy_timeout)
    progress.done()
    snap = res.snapshot
    if json_:
        print_json(snap.to_json())
    else:
        print(f"snapshot {snap.short_id} saved: {snap.source.get('database')}, "
              f"{human_bytes(snap.source.get('size', 0))} "
              f"({snap.source.get('journal_mode')} journal mode), "
              f"{human_bytes(snap.summary.get('bytes_added', 0))} new")


@app.command()
def restore(target: Annotated[str, typer.Option("--target", "-t",
                                            help="Database file to create or replace.")],
            snapshot: Annotated[str, typer.Argument(
                help="Snapshot id, or 'latest' (of the database --path names, else of the one "
                     "at --target, else of the only one in the repository).")] = "latest",
            overwrite: Annotated[bool, typer.Option(
                help="Replace an existing database at --target, with its -wal/-shm/-journal "
                     "files.")] = False,
            path: Annotated[str | None, typer.Option(
                help="Only snapshots of the database backed up from this path.")] = None,
            host: Annotated[str | None, typer.Option(help="Only snapshots from this host.")] = None,
            busy_timeout: BusyTimeoutOption = 60.0,
            repo: RepoOption = None, password_file: PasswordFileOption = None,
            json_: JsonOption = False) -> None:
    """Restore a database file; it is checked with PRAGMA integrity_check where it lands."""
    from keepwell.sources.sqlite import restore_database, select_snapshot

    refuse_empty("--path", path, "give the database's path as backed up, or leave the option out")
    refuse_empty("--host", host, "give a host name, or leave the option out")
    r = open_repo(repo, password_file)
    snap = select_snapshot(r, snapshot, target=target, path=path, host=host)
    progress = Progress("restore")
    r.events.subscribe(progress)
    res = restore_database(r, snap, target, overwrite=overwrite, busy_timeout=busy_timeout)
    progress.done()
    if json_:
        print_json({"snapshot": snap.id, "database": snap.source.get("database"),
                    "target": res.target, "bytes": res.size, "mode": oct(res.mode),
                    "replaced": res.replaced, "integrity_check": "ok"})
    else:
        print(f"restored {res.target} from snapshot {snap.short_id} of {snap.host}:"
              f"{snap.source.get('database') or snap.paths[0]} "
              f"({human_bytes(res.size)}; integrity_check ok)")
