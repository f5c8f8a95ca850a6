"""Maintenance commands of a repository: ``unlock``. Parsing and rendering only; the rules are
in keepwell.repository.sessions."""

from __future__ import annotations

from typing import Annotated

import typer

from keepwell.cli.common import JsonOption, PasswordFileOption, RepoOption, open_repo, print_json


def unlock(
    remove_all: Annotated[bool, typer.Option(
        "--remove-all", help="Remove every lock and session, also of processes that may still "
                             "run: only when no keepwell process uses the repository.")] = False,
    repo: RepoOption = None, password_file: PasswordFileOption = None, json_: JsonOption = False,
) -> None:
    """Remove the prune lock and backup sessions of processes that have ended: at once for those
    of this host, once stale (silent past KEEPWELL_SESSION_STALE) for the others."""
    from keepwell.repository.sessions import unlock as do_unlock

    report = do_unlock(open_repo(repo, password_file), remove_all=remove_all)
    if json_:
        print_json({"removed": [{"object": n, "why": w} for n, w in report.removed],
                    "kept": [{"object": n, "why": w} for n, w in report.kept]})
        return
    for name, why in report.removed:
        print(f"removed {name}: {why}")
    for name, why in report.kept:
        print(f"kept {name}: {why}")
    print(f"{len(report.removed)} removed, {len(report.kept)} kept"
          + (" (running; 'keepwell unlock --remove-all' removes them too)" if report.kept else ""))


def register(app: typer.Typer) -> None:
    app.command("unlock")(unlock)
