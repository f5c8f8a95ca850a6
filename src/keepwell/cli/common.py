"""What every command shares: repository and password options, opening the repository, snapshot
filters, output, and the options every command takes wherever they are placed.

Precedence, the same for every command: the command line, then the environment, then a prompt.
``-r/--repo`` and ``--password-file`` may stand before the command (``keepwell -r R backup``) or
after it (``keepwell backup -r R``); given in both places they must agree. The options declare no
environment variable themselves: `resolve_repo` and `resolve_password` read
``KEEPWELL_REPOSITORY``, ``KEEPWELL_PASSWORD`` and ``KEEPWELL_PASSWORD_FILE`` only when the
command line names nothing, so a variable can never beat what the user typed.

`KeepwellGroup` is the root group's class. When the command tree is built it gives every command
``-q/--quiet`` and ``--debug`` (so they work after the command too), lets a ``--json`` given
before the command reach the command, and refuses an option given twice where it takes one value
(click would keep the last one without a word).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from typer.core import TyperGroup, TyperOption

from keepwell.errors import UsageError
from keepwell.repository.keys import read_password_file
from keepwell.repository.retention import Policy
from keepwell.repository.snapshot import SnapshotFilter
from keepwell.units import human_bytes  # noqa: F401 - used by every command module

RepoOption = Annotated[
    str | None,
    typer.Option("--repo", "-r", help="Repository location (default: $KEEPWELL_REPOSITORY)."),
]
PasswordFileOption = Annotated[
    str | None,
    typer.Option("--password-file",
                 help="Read the password from the first line of this file (default: "
                      "$KEEPWELL_PASSWORD, then $KEEPWELL_PASSWORD_FILE)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]

# snapshot selection, as restic has it
HostFilterOption = Annotated[list[str] | None, typer.Option(
    "--host", help="Only snapshots of this host (repeat for any of several).")]
TagFilterOption = Annotated[list[str] | None, typer.Option(
    "--tag", help="Only snapshots with this tag; 'a,b' needs both, a repeated --tag any group.")]
PathFilterOption = Annotated[list[str] | None, typer.Option(
    "--path", help="Only snapshots of this path, exactly as backed up (repeat: all of them).")]
KindFilterOption = Annotated[list[str] | None, typer.Option(
    "--kind", help="Only snapshots of this kind (files, stdin, sqlite, postgres...; repeat for "
                   "any of several).")]

# the keep policy of every forget (keepwell.repository.retention); durations as keepwell.units
# reads them where they choose what to keep: 36h, 7d, 2w, 6mo, 1y6mo (never a bare m)
_EACH = "Keep the newest snapshot of each of the N newest {} that have one."
_WITHIN = "Keep the newest snapshot of each {} within DURATION of the newest snapshot."
KeepLastOption = Annotated[int, typer.Option(min=0, help="Keep the N newest snapshots.")]
KeepHourlyOption = Annotated[int, typer.Option(min=0, help=_EACH.format("hours"))]
KeepDailyOption = Annotated[int, typer.Option(min=0, help=_EACH.format("days"))]
KeepWeeklyOption = Annotated[int, typer.Option(min=0, help=_EACH.format("weeks"))]
KeepMonthlyOption = Annotated[int, typer.Option(min=0, help=_EACH.format("months"))]
KeepYearlyOption = Annotated[int, typer.Option(min=0, help=_EACH.format("years"))]
KeepWithinOption = Annotated[str | None, typer.Option(
    metavar="DURATION", help="Keep every snapshot within DURATION of the newest snapshot "
                             "(36h, 7d, 2w, 6mo, 1y6mo).")]
KeepWithinHourlyOption = Annotated[str | None, typer.Option(
    metavar="DURATION", help=_WITHIN.format("hour"))]
KeepWithinDailyOption = Annotated[str | None, typer.Option(
    metavar="DURATION", help=_WITHIN.format("day"))]
KeepWithinWeeklyOption = Annotated[str | None, typer.Option(
    metavar="DURATION", help=_WITHIN.format("week"))]
KeepWithinMonthlyOption = Annotated[str | None, typer.Option(
    metavar="DURATION", help=_WITHIN.format("month"))]
KeepWithinYearlyOption = Annotated[str | None, typer.Option(
    metavar="DURATION", help=_WITHIN.format("year"))]
KeepTagOption = Annotated[list[str] | None, typer.Option(
    help="Keep snapshots with this tag (repeat for any of several).")]


@dataclass
class GlobalOptions:
    """What the root command's options said (command line only: never the environment)."""

    repo: str | None = None
    password_file: str | None = None
    debug: bool = False
    quiet: bool = False
    json: bool = False
    limit_upload: int | None = None
    limit_download: int | None = None
    cache_dir: str | None = None
    no_adaptive: bool = False
    command: str = ""  # the command being run ("key add"), for messages
    # The command loaded a library that can crash at interpreter exit (the Temporal SDK's
    # native core): `keepwell.cli.main.run` flushes and leaves with os._exit.
    hard_exit: bool = False


GLOBALS = GlobalOptions()


def _one(option: str, here: str | None, before: str | None) -> str | None:
    """The value of an option that may stand before or after the command."""
    if here is not None and before is not None and here != before:
        raise UsageError(f"{option} is given twice, as {before!r} before the command and as "
                         f"{here!r} after it", hint="give it once")
    return here if here is not None else before


def repo_given(repo: str | None) -> str | None:
    """The repository the command line names (before or after the command), if any."""
    return _one("-r/--repo", repo, GLOBALS.repo)


def password_file_given(password_file: str | None) -> str | None:
    """The password file the command line names (before or after the command), if any."""
    return _one("--password-file", password_file, GLOBALS.password_file)


def resolve_repo(repo: str | None) -> str:
    location = repo_given(repo)
    if location is None:  # an empty -r "" is an empty location, not a reason to look elsewhere
        location = os.environ.get("KEEPWELL_REPOSITORY")
    if not location:
        raise UsageError("no repository given", hint="pass -r/--repo or set KEEPWELL_REPOSITORY")
    return location


def password_source(password_file: str | None, *, prefix: str = "KEEPWELL") -> tuple[str | None, str | None]:
    """Where the password comes from: ``(file, None)`` or ``(None, password)``, or
    ``(None, None)`` when nothing gives it. ``password_file`` is the command line's file; then
    ``{prefix}_PASSWORD``, then ``{prefix}_PASSWORD_FILE``."""
    if password_file is not None:
        return password_file, None
    env = os.environ.get(f"{prefix}_PASSWORD")
    if env is not None:
        return None, env
    return os.environ.get(f"{prefix}_PASSWORD_FILE") or None, None


def read_password(password_file: str | None, *, prefix: str = "KEEPWELL", what: str = "password",
                  flag: str = "--password-file", confirm: bool = False) -> str:
    """The password by `password_source`, or a prompt on a terminal."""
    path, password = password_source(password_file, prefix=prefix)
    if path is not None:
        return read_password_file(path, f"{what} file")
    if password is not None:
        return password
    if not sys.stdin.isatty():
        raise UsageError(f"no {what} given",
                         hint=f"pass {flag}, or set {prefix}_PASSWORD or {prefix}_PASSWORD_FILE")
    pw = typer.prompt(what, hide_input=True, confirmation_prompt=confirm)
    if not pw:
        raise UsageError(f"empty {what}")
    return str(pw)


def resolve_password(password_file: str | None, *, confirm: bool = False) -> str:
    return read_password(password_file_given(password_file), what="repository password",
                         confirm=confirm)


def repository_options() -> dict[str, Any]:
    """The options of the root command every repository is opened with: the rate limits,
    ``--no-adaptive`` and ``--cache-dir`` (which beats ``KEEPWELL_CACHE_DIR``: see keepwell.backends.cachedir)."""
    out: dict[str, Any] = {"limit_upload": GLOBALS.limit_upload,
                           "limit_download": GLOBALS.limit_download}
    if GLOBALS.no_adaptive:
        out["adaptive"] = False
    if GLOBALS.cache_dir is not None:
        out["cache_dir"] = os.path.abspath(os.path.expanduser(GLOBALS.cache_dir))
    return out


def open_repo(repo: str | None = None, password_file: str | None = None, *,
              dry_run: bool = False) -> Any:
    """Open the repository named by the options/environment (the usual first step of a command).
    ``dry_run``: on a backend that drops every write (keepwell.backends.dryrun)."""
    from keepwell.repository import open_repository

    location = resolve_repo(repo)
    extra: dict[str, Any] = {"dry_run": True} if dry_run else {}
    opened = open_repository(location, resolve_password(password_file), **repository_options(),
                             **extra)
    opened.events.subscribe(print_warning)
    if not opened.full:
        refuse_append_key()
    return opened


# what an append key may run (docs/security.md): everything else reads or deletes, and is
# refused before it starts
APPEND_COMMANDS = frozenset({"backup", "key list"})


def refuse_append_key() -> None:
    """Stop a command that an append key cannot run, with one line naming it."""
    from keepwell.errors import AppendOnlyError
    from keepwell.repository.keyring import NEEDS_FULL

    command = GLOBALS.command
    if command in APPEND_COMMANDS or command.endswith(" backup"):  # database backups too
        return
    raise AppendOnlyError(f"{NEEDS_FULL}: {command} needs a full key")


def print_warning(name: str, fields: dict[str, Any]) -> None:
    """Renders the repository's ``warning`` events (a damaged snapshot skipped, say) and its
    ``info`` events (an append key without its own earlier backup in its local cache)."""
    if name == "warning":
        sys.stderr.write(f"keepwell: warning: {fields['message']}\n")
    elif name == "info" and not GLOBALS.quiet:
        sys.stderr.write(f"keepwell: {fields['message']}\n")


def refuse_empty(option: str, values: str | list[str] | None, hint: str) -> None:
    """Refuse an option or argument given an empty value (an empty or unset variable), which
    would otherwise be read as its default or as "everything" (or match nothing) without a word."""
    if values is None:
        return
    if any(not v for v in ([values] if isinstance(values, str) else values)):
        raise UsageError(f"{option}: an empty value names nothing", hint=hint)


def tags_given(option: str, tag: list[str] | None) -> list[str]:
    """The tags a repeatable ``--tag a,b`` option gives to a new snapshot; an empty tag
    (``--tag ''``, ``--tag a,``) is refused."""
    groups = tag or []
    for group in groups:
        if not all(group.split(",")):
            raise UsageError(f"{option} {group!r}: an empty tag names nothing",
                             hint="give the tags, or no " + option)
    return [t for group in groups for t in group.split(",")]


def snapshot_filter(host: list[str] | None = None, tag: list[str] | None = None,
                    path: list[str] | None = None, kind: list[str] | None = None) -> SnapshotFilter:
    """The filter the --host/--tag/--path/--kind options describe (``--tag ''`` selects the
    snapshots without tags; an empty --host, --path or --kind is refused: it would match no
    snapshot)."""
    for option, values in (("--host", host), ("--path", path), ("--kind", kind)):
        refuse_empty(option, values, f"give the {option[2:]}, or no {option} to select "
                                     "snapshots of any")
    return SnapshotFilter.parse(hosts=host or (), tags=tag or (), paths=path or (),
                                kinds=kind or ())


def keep_policy(options: dict[str, Any]) -> Policy:
    """The `Policy` the ``--keep-*`` options among a command's ``options`` describe."""
    return Policy.from_options(**{k: v for k, v in options.items() if k.startswith("keep_")})


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# -- options every command takes ------------------------------------------------------------------
def _set_quiet(_ctx: Any, _param: Any, value: bool) -> bool:
    if value:
        GLOBALS.quiet = True
    return value


def _set_debug(_ctx: Any, _param: Any, value: bool) -> bool:
    if value:
        GLOBALS.debug = True
    return value


def _json_default() -> bool:
    return GLOBALS.json


def _refuse_repeats(cmd: Any) -> None:
    """Make ``cmd`` refuse a single-valued option given more than once (click keeps the last)."""
    parse_args = cmd.parse_args

    def strict_parse_args(ctx: Any, args: list[str]) -> list[str]:
        # the command as typed, without the program's name: the leaf's is parsed last
        words: list[str] = []
        at = ctx
        while at is not None and at.parent is not None:
            words.append(at.info_name or "")
            at = at.parent
        GLOBALS.command = " ".join(reversed(words))
        if not ctx.resilient_parsing:
            try:
                _opts, _rest, order = cmd.make_parser(ctx).parse_args(args=list(args))
            except Exception:  # the real parse below reports it
                order = []
            seen: set[str] = set()
            for param in order:
                if isinstance(param, TyperOption) and not param.multiple and not param.count:
                    if param.name in seen:
                        names = "/".join(sorted(param.opts, key=len))
                        raise UsageError(f"{names} is given more than once for "
                                         f"'{ctx.command_path}'",
                                         hint="it takes one value: give it once")
                    seen.add(param.name or "")
        rest: list[str] = parse_args(ctx, args)
        if GLOBALS.json and not any("--json" in p.opts for p in cmd.params
                                    if isinstance(p, TyperOption)):
            raise UsageError(f"'{ctx.command_path}' has no JSON output", hint="drop --json")
        return rest

    cmd.parse_args = strict_parse_args


def _adopt(cmd: Any) -> None:
    """Give one command (and every command of a group) the options of `KeepwellGroup`."""
    sub = getattr(cmd, "commands", None)
    if sub is not None:
        for child in sub.values():
            _adopt(child)
        return
    names = {o for p in cmd.params for o in getattr(p, "opts", ())}
    for p in cmd.params:
        if isinstance(p, TyperOption) and "--json" in p.opts:
            p.default = _json_default
    if "--quiet" not in names:
        cmd.params.append(TyperOption(param_decls=["--quiet", "-q"], is_flag=True, default=False,
                                      expose_value=False, callback=_set_quiet,
                                      help="No progress output."))
    if "--debug" not in names:
        cmd.params.append(TyperOption(param_decls=["--debug"], is_flag=True, default=False,
                                      expose_value=False, callback=_set_debug,
                                      help="Show tracebacks."))
    _refuse_repeats(cmd)


class KeepwellGroup(TyperGroup):
    """The root group: every command under it gets the shared options (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for cmd in self.commands.values():
            _adopt(cmd)
        _refuse_repeats(self)


def run_group(app: typer.Typer) -> int:
    """Run one command group on its own (``python -m keepwell.cli.mysql``), with the options and
    rules every command has under ``keepwell``."""
    group = typer.main.get_command(app)
    _adopt(group)
    return run_app(group)


def run_app(app: Any, *, debug: bool = False) -> int:
    """Run a Typer app; every KeepwellError becomes one line and its exit code."""
    from keepwell.errors import EXIT_FAILURE, KeepwellError
    from keepwell.extras import missing_extra

    try:
        rc = app(standalone_mode=False)  # returns the code of a typer.Exit raised inside
    except KeepwellError as exc:
        if debug or GLOBALS.debug:
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
        if debug or GLOBALS.debug:
            raise
        missing = missing_extra(exc) if isinstance(exc, ImportError) else None
        if missing is not None:  # an optional dependency imported where the command needs it
            sys.stderr.write(f"keepwell: {missing.line()}\n")
            return missing.exit_code
        sys.stderr.write(f"keepwell: internal error: {type(exc).__name__}: {exc} "
                         "(rerun with --debug and report it)\n")
        return EXIT_FAILURE
    return rc if isinstance(rc, int) else 0
