"""The ``key`` commands: list, add, remove and change the passwords of a repository.

Each key has a role (docs/security.md): ``full`` reads, writes and deletes; ``append`` only adds
backups. Every ``key`` command but ``list`` needs a full key.

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

app = typer.Typer(help="Manage the passwords (keys) of a repository and their roles.",
                  no_args_is_help=True)


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
        role = "" if k.damaged else k.role
        print(f"{'*' if k.id == r.key_id else ' '} {k.id[:10]}  {role:6}  {k.created[:19]:19}  {who}")


@app.command("add")
def key_add(new_password_file: Annotated[str | None, typer.Option(help="File with the new password.")] = None,
            role: Annotated[str, typer.Option(
                "--role", metavar="ROLE",
                help="full: reads, writes and deletes everything; append: only adds backups "
                     "(needs a repository made with 'init --append-keys'; docs/security.md).")] = "full",
            repo: RepoOption = None, password_file: PasswordFileOption = None) -> None:
    """Add a password (a key), with its role."""
    from keepwell.repository.keyring import ROLES, append_material
    from keepwell.repository.keys import add_key

    if role not in ROLES:
        raise UsageError(f"--role: {role!r} is not a role", hint="give full or append")
    r = open_repo(repo, password_file)
    master = r.master.master
    material = None
    if role == "append":
        if r.master.shared is None:
            raise UsageError(f"repository {r.id[:10]} cannot have append keys (format version "
                             f"{r.config.get('version', 1)})",
                             hint="make a repository with 'keepwell init --append-keys' and "
                                  "'keepwell copy' this one into it")
        material = append_material(r.config, r.master.shared)
    new = _new_password(new_password_file)
    print(f"added {role} key {add_key(r.backend, master, new, append_material=material)[:10]}")


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
    new_id = add_key(r.backend, r.master.master, _new_password(new_password_file))
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
