"""The ``key`` commands: list, add, remove and change the passwords of a repository.

A new password comes from ``--new-password-file``, ``KEEPWELL_NEW_PASSWORD`` or a prompt; the
repository is opened with the password as every command opens it (keepwell.cli.common).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from keepwell.cli.common import JsonOption, PasswordFileOption, RepoOption, open_repo, print_json
from keepwell.errors import UsageError

app = typer.Typer(help="Manage the passwords of a repository.", no_args_is_help=True)


@app.command("list")
def key_list(repo: RepoOption = None, password_file: PasswordFileOption = None,
             json_: JsonOption = False) -> None:
    """List the keys (passwords) of the repository."""
    from keepwell.repository.keys import list_keys

    r = open_repo(repo, password_file)
    ks = list_keys(r.backend)
    if json_:
        print_json([{**k.__dict__, "current": k.id == r.key_id} for k in ks])
        return
    for k in ks:
        who = "DAMAGED (its bytes do not match its name)" if k.damaged else f"{k.username}@{k.host}"
        print(f"{'*' if k.id == r.key_id else ' '} {k.id[:10]}  {k.created[:19]:19}  {who}")


@app.command("add")
def key_add(new_password_file: Annotated[str | None, typer.Option(help="File with the new password.")] = None,
            repo: RepoOption = None, password_file: PasswordFileOption = None) -> None:
    """Add a password."""
    from keepwell.repository.keys import add_key

    r = open_repo(repo, password_file)
    new = _new_password(new_password_file)
    print(f"added key {add_key(r.backend, r.master, new)[:10]}")


@app.command("remove")
def key_remove(key_id: str, repo: RepoOption = None, password_file: PasswordFileOption = None) -> None:
    """Remove a password (not the one in use)."""
    from keepwell.repository.keys import remove_key

    r = open_repo(repo, password_file)
    remove_key(r.backend, key_id, r.key_id)
    print(f"removed key {key_id}")


@app.command("passwd")
def key_passwd(new_password_file: Annotated[str | None, typer.Option()] = None,
               repo: RepoOption = None, password_file: PasswordFileOption = None) -> None:
    """Change the password in use."""
    from keepwell.repository.keys import add_key

    r = open_repo(repo, password_file)
    new_id = add_key(r.backend, r.master, _new_password(new_password_file))
    r.backend.delete(f"keys/{r.key_id}")
    print(f"password changed (key {new_id[:10]})")


def _new_password(path: str | None) -> str:
    from keepwell.repository.keys import read_password_file

    if path:
        pw = read_password_file(path, "new password file")
    elif os.environ.get("KEEPWELL_NEW_PASSWORD"):
        pw = os.environ["KEEPWELL_NEW_PASSWORD"]
    elif sys.stdin.isatty():
        pw = typer.prompt("new password", hide_input=True, confirmation_prompt=True)
    else:
        raise UsageError("no new password", hint="pass --new-password-file or set KEEPWELL_NEW_PASSWORD")
    if not pw:
        raise UsageError("empty new password")
    return str(pw)
