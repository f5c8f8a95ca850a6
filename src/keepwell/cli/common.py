"""What every command shares: repository and password options, opening the repository, output.

Commands take the repository from ``-r/--repo`` or ``KEEPWELL_REPOSITORY`` and the password from
``KEEPWELL_PASSWORD``, ``--password-file``/``KEEPWELL_PASSWORD_FILE``, or a prompt on a terminal.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from keepwell.errors import UsageError

RepoOption = Annotated[
    str | None,
    typer.Option("--repo", "-r", envvar="KEEPWELL_REPOSITORY", help="Repository location."),
]
PasswordFileOption = Annotated[
    str | None,
    typer.Option(
        "--password-file", envvar="KEEPWELL_PASSWORD_FILE", help="Read the password from a file."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


@dataclass
class GlobalOptions:
    repo: str | None = None
    password_file: str | None = None
    debug: bool = False
    quiet: bool = False
    limit_upload: int | None = None
    limit_download: int | None = None


GLOBALS = GlobalOptions()


def read_password_file(path: str, what: str) -> str:
    """The first line of a password file; a clear error if it cannot be read or is empty."""
    try:
        with open(path, encoding="utf-8") as f:
            pw = f.readline().rstrip("\r\n")
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not pw:
        raise UsageError(f"{what} {path} is empty")
    return pw


def resolve_password(password_file: str | None, *, confirm: bool = False) -> str:
    env = os.environ.get("KEEPWELL_PASSWORD")
    if env is not None:
        return env
    path = password_file or GLOBALS.password_file or os.environ.get("KEEPWELL_PASSWORD_FILE")
    if path:
        return read_password_file(path, "password file")
    if not sys.stdin.isatty():
        raise UsageError(
            "no password given",
            hint="set KEEPWELL_PASSWORD or KEEPWELL_PASSWORD_FILE, or pass --password-file",
        )
    pw = typer.prompt("repository password", hide_input=True, confirmation_prompt=confirm)
    if not pw:
        raise UsageError("empty password")
    return str(pw)


def resolve_repo(repo: str | None) -> str:
    location = repo or GLOBALS.repo or os.environ.get("KEEPWELL_REPOSITORY")
    if not location:
        raise UsageError("no repository given", hint="pass -r/--repo or set KEEPWELL_REPOSITORY")
    return location


def open_repo(repo: str | None = None, password_file: str | None = None) -> Any:
    """Open the repository named by the options/environment (the usual first step of a command)."""
    from keepwell.repository import open_repository

    location = resolve_repo(repo)
    opened = open_repository(
        location,
        resolve_password(password_file),
        limit_upload=GLOBALS.limit_upload,
        limit_download=GLOBALS.limit_download,
    )
    opened.events.subscribe(print_warning)
    return opened


def print_warning(name: str, fields: dict[str, Any]) -> None:
    """Renders the repository's ``warning`` events (a damaged snapshot skipped, say)."""
    if name == "warning":
        sys.stderr.write(f"keepwell: warning: {fields['message']}\n")


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def run_app(app: Any, *, debug: bool = False) -> int:
    """Run a Typer app; every KeepwellError becomes one line and its exit code."""
    from keepwell.errors import EXIT_FAILURE, KeepwellError

    try:
        rc = app(standalone_mode=False)  # returns the code of a typer.Exit raised inside
    except KeepwellError as exc:
        if debug:
            raise
        sys.stderr.write(f"keepwell: {exc.line()}\n")
        return exc.exit_code
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        sys.stderr.write("keepwell: aborted\n")
        return EXIT_FAILURE
    except typer.TyperException as exc:
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            sys.stderr.write(f"keepwell: {exc}\n")
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        sys.stderr.write("keepwell: interrupted\n")
        return 130
    except Exception as exc:
        if debug:
            raise
        sys.stderr.write(f"keepwell: internal error: {type(exc).__name__}: {exc} "
                         "(rerun with --debug and report it)\n")
        return EXIT_FAILURE
    return rc if isinstance(rc, int) else 0
