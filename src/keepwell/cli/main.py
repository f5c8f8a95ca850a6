"""The ``keepwell`` command: the root app, its groups, and the one top-level error handler.

Every `KeepwellError` becomes one line on stderr and its exit code; a traceback only with
``--debug``. Command groups are listed in `COMMAND_GROUPS` and imported only when present. The
root options that every command shares (``-r``, ``--password-file``, ``-q``, ``--json``,
``--debug``) work before or after the command: see `keepwell.cli.common`.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from keepwell import __version__
from keepwell.cli import repo_commands
from keepwell.cli.common import GLOBALS, KeepwellGroup, PasswordFileOption, RepoOption, run_app
from keepwell.memory import tune_malloc

app = typer.Typer(
    cls=KeepwellGroup,
    help="keepwell: deduplicated, encrypted, verifiable backups of files and databases.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

COMMAND_GROUPS = {
    "postgres": "keepwell.cli.postgres",
    "mysql": "keepwell.cli.mysql",
}


def _version(value: bool) -> None:
    if value:
        print(f"keepwell {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
    limit_upload: Annotated[int | None, typer.Option(
        min=0, help="Upload limit in KiB/s (0: none).")] = None,
    limit_download: Annotated[int | None, typer.Option(
        min=0, help="Download limit in KiB/s (0: none).")] = None,
    no_adaptive: Annotated[bool, typer.Option(
        "--no-adaptive", help="Upload to remote repositories with a fixed number of uploads at "
                              "once, not adapted to the link (also KEEPWELL_ADAPTIVE=0).")] = False,
    cache_dir: Annotated[str | None, typer.Option(
        "--cache-dir", metavar="DIR",
        help="Set the cache directory (default: $KEEPWELL_CACHE_DIR, then "
             "$XDG_CACHE_HOME/keepwell, then ~/.cache/keepwell).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    _show_version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_version, help="Print the version and exit.")] = False,
) -> None:
    GLOBALS.repo = repo
    GLOBALS.password_file = password_file
    GLOBALS.limit_upload = limit_upload
    GLOBALS.limit_download = limit_download
    GLOBALS.cache_dir = cache_dir
    GLOBALS.no_adaptive = no_adaptive
    GLOBALS.quiet = quiet
    GLOBALS.json = json_
    GLOBALS.debug = debug or os.environ.get("KEEPWELL_DEBUG") == "1"


@app.command()
def version() -> None:
    """Print the version."""
    print(f"keepwell {__version__}")


repo_commands.register(app)
importlib.import_module("keepwell.cli.copy").register(app)
importlib.import_module("keepwell.cli.repair").register(app)
importlib.import_module("keepwell.cli.maintenance").register(app)
importlib.import_module("keepwell.cli.find").register(app)
importlib.import_module("keepwell.cli.log").register(app)
importlib.import_module("keepwell.cli.tag").register(app)
importlib.import_module("keepwell.cli.rewrite").register(app)
importlib.import_module("keepwell.cli.cache").register(app)
importlib.import_module("keepwell.cli.mount").register(app)
importlib.import_module("keepwell.cli.watch").register(app)
try:
    from keepwell.cli import sqlite as _sqlite

    app.add_typer(_sqlite.app, name="sqlite")
except ImportError:  # pragma: no cover
    pass
for _name, _module in COMMAND_GROUPS.items():
    try:
        app.add_typer(importlib.import_module(_module).app, name=_name)
    except ImportError:  # an optional extra that is not installed
        pass
importlib.import_module("keepwell.cli.fleet").register(app)
try:
    from keepwell.cli import control as _control

    _control.register(app)
except ImportError:  # pragma: no cover
    pass


# the root options that take a value, as a command line may give them before the command
_VALUED = frozenset({"-r", "--repo", "--password-file", "--limit-upload", "--limit-download",
                     "--cache-dir"})


def named_command(argv: list[str]) -> str | None:
    """The command (or group) a command line names: its first word that is neither an option
    nor the value of a root option; None if there is none."""
    at = _named_at(argv)
    return None if at is None else argv[at]


def _named_at(argv: list[str]) -> int | None:
    value = False
    for i, arg in enumerate(argv):
        if value:
            value = False
        elif arg == "--":
            return None
        elif arg.startswith("-"):
            value = arg in _VALUED
        else:
            return i
    return None


@contextmanager
def only_named(root: typer.Typer, argv: list[str]) -> Iterator[None]:
    """While a command line runs, the root holds only the command or group it names, and a
    group only the command named right after it: the command line is built from every
    command's annotations when it starts (about 0.15 s for all of them, against a few
    milliseconds for one). A name that is no command (a typo, ``--help``, no command at all)
    leaves every command of its level in place, for the help and the suggestions."""
    saved: list[tuple[typer.Typer, list[Any], list[Any]]] = []
    level, at = root, _named_at(argv)
    try:
        while at is not None:
            name = argv[at]
            commands = [c for c in level.registered_commands if name == (
                c.name or typer.main.get_command_name(getattr(c.callback, "__name__", "")))]
            groups = [g for g in level.registered_groups if g.name == name]
            if not commands and not groups:
                break
            saved.append((level, level.registered_commands, level.registered_groups))
            level.registered_commands, level.registered_groups = commands, groups
            if not groups or groups[0].typer_instance is None:
                break
            # a group's own options may take values: only a command right after its name
            level, at = groups[0].typer_instance, at + 1
            if at >= len(argv) or argv[at].startswith("-"):
                break
        yield
    finally:
        for level, commands_, groups_ in reversed(saved):
            level.registered_commands, level.registered_groups = commands_, groups_


def run() -> None:
    debug = "--debug" in sys.argv or os.environ.get("KEEPWELL_DEBUG") == "1"
    tune_malloc()
    with only_named(app, sys.argv[1:]):
        rc = run_app(app, debug=debug)
    if GLOBALS.hard_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    run()
