"""The console script ``keepwell-wal`` (``push``, ``fetch``, ``upload``): the command line of
`hooks`, the archive and restore commands PostgreSQL runs.

It parses its arguments by hand (argparse costs too much on every ``archive_command``) and
imports the fan-out and the uploader only for the commands that need them.
"""

from __future__ import annotations

import sys

from keepwell.errors import KeepwellError, UsageError
from keepwell.sources.postgres.errors import WalNotFoundError
from keepwell.sources.postgres.hooks import (
    DEFAULT_PREFETCH,
    FETCH_FAILED,
    IDLE_EXIT,
    HookSettings,
    fetch,
    push,
    take_uploader_lock,
)
from keepwell.sources.postgres.spool import WalSpool
from keepwell.units import parse_seconds

USAGE = """usage: keepwell-wal COMMAND [OPTIONS]

  push PATH [--async --spool DIR [--spool-max SIZE]]   archive one WAL file (archive_command)
  fetch NAME DEST [--prefetch N] [--tablespaces inside|as-recorded]
        [--tablespace-map OID=DIR]... [--tablespace-map-all DIR] [--timeline N]
        [--target end|point] [--allow-gap]
                                                        fetch one WAL file (restore_command)
  upload [--pg-wal DIR] [--daemon] [--idle-exit DURATION]
                                                        run the spool's uploader

common options: --repo/-r LOCATION (push: repeat to archive into each, with a --password-file
each or one for all; asynchronously each gets the spool DIR/repoN), --password-file FILE,
--cluster NAME, --spool DIR,
--spool-max SIZE (environment: KEEPWELL_REPOSITORY, KEEPWELL_PASSWORD[_FILE],
KEEPWELL_PG_CLUSTER, KEEPWELL_PG_SPOOL, KEEPWELL_PG_SPOOL_MAX)
"""
_FLAGS = {"--async", "--daemon", "--allow-gap"}
_VALUED = {"--repo", "-r", "--password-file", "--cluster", "--spool", "--spool-max",
           "--prefetch", "--prefetch-dir", "--pg-wal", "--idle-exit", "--tablespaces",
           "--tablespace-map", "--tablespace-map-all", "--timeline", "--target"}
# kept one per line; every other option is given once (--repo and --password-file more than
# once: a push into several repositories, `fanout`)
_REPEATED = {"--tablespace-map", "--repo", "--password-file"}
_POSITIONALS = {"push": 1, "fetch": 2, "upload": 0}


class HelpAsked(Exception):
    """``-h`` or ``--help``: the usage goes to stdout, and the exit code is 0."""


def parse_args(argv: list[str]) -> tuple[str, list[str], dict[str, str]]:
    """(command, positionals, options) of a hook command line; argparse costs too much here."""
    if argv and argv[0] in ("-h", "--help"):
        raise HelpAsked
    if not argv or argv[0] not in _POSITIONALS:
        raise UsageError(f"unknown command {argv[0]!r}\n{USAGE}" if argv else USAGE,
                         hint="")  # the usage says it all
    command, rest = argv[0], argv[1:]
    positionals: list[str] = []
    options: dict[str, str] = {}
    i = 0
    while i < len(rest):
        arg = rest[i]
        key, eq, value = arg.partition("=")
        if arg in ("-h", "--help"):
            raise HelpAsked
        if arg in _FLAGS:
            options[arg] = "1"
        elif key in _VALUED:
            if not eq:
                i += 1
                if i >= len(rest):
                    raise UsageError(f"{key} needs a value")
                value = rest[i]
            key = "--repo" if key == "-r" else key
            if key in options and key not in _REPEATED:
                raise UsageError(f"{key} is given twice")
            options[key] = f"{options[key]}\n{value}" if key in options else value
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown option {arg}")
        else:
            positionals.append(arg)
        i += 1
    if len(positionals) != _POSITIONALS[command]:
        raise UsageError(f"{command} takes {_POSITIONALS[command]} argument(s)\n{USAGE}")
    return command, positionals, options


def main(argv: list[str] | None = None) -> int:
    try:
        command, pos, opts = parse_args(sys.argv[1:] if argv is None else argv)
        repos = opts["--repo"].split("\n") if "--repo" in opts else []
        passwords = opts["--password-file"].split("\n") if "--password-file" in opts else []
        if command != "push" and (len(repos) > 1 or len(passwords) > 1):
            raise UsageError(f"{command} works on one repository: --repo is given twice")
        settings = HookSettings.resolve(repos[0] if repos else None,
                                        passwords[0] if passwords else None,
                                        opts.get("--cluster"), opts.get("--spool"),
                                        opts.get("--spool-max"))
        if command == "push" and len(repos) > 1:
            from keepwell.sources.postgres.fanout import push_to_all, settings_each

            push_to_all(pos[0], settings_each(repos, passwords, settings),
                        asynchronous="--async" in opts)
        elif command == "push":
            if len(passwords) > 1:
                raise UsageError("--password-file is given twice for one repository")
            push(pos[0], settings, asynchronous="--async" in opts)
        elif command == "fetch":
            fetch(pos[0], pos[1], settings,
                  prefetch=int(opts.get("--prefetch", DEFAULT_PREFETCH)),
                  prefetch_dir=opts.get("--prefetch-dir"), policy={
                      "tablespaces": opts.get("--tablespaces"),
                      "tablespace_map": opts["--tablespace-map"].split("\n")
                      if "--tablespace-map" in opts else None,
                      "tablespace_map_all": opts.get("--tablespace-map-all"),
                      "timeline": opts.get("--timeline"), "allow_gap": "--allow-gap" in opts,
                      "target": opts.get("--target")})
        else:
            idle_exit = parse_seconds(opts.get("--idle-exit", IDLE_EXIT), "--idle-exit")
            if not settings.spool:
                raise UsageError("the uploader needs a spool directory (--spool)")
            lock_fd = take_uploader_lock(WalSpool(settings.spool, settings.spool_max).ensure())
            if lock_fd is None:
                return 0  # another uploader serves this spool
            from keepwell.sources.postgres.uploader import run_uploader

            return run_uploader(settings, pg_wal=opts.get("--pg-wal"),
                                daemon="--daemon" in opts,
                                idle_exit=idle_exit,
                                lock_fd=lock_fd)
    except HelpAsked:
        sys.stdout.write(USAGE.lstrip("\n"))
        return 0
    except WalNotFoundError as exc:
        sys.stderr.write(f"keepwell: {exc.line()}\n")
        return 1
    except KeepwellError as exc:
        sys.stderr.write(f"keepwell: {exc.line()}\n")
        return _failure_status(argv, exc.exit_code)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"keepwell: {exc}\n")
        return _failure_status(argv, 1)
    return 0


def _failure_status(argv: list[str] | None, code: int) -> int:
    """A failed fetch other than "not archived" must not look like the end of the WAL (exit 1
    would make recovery end and the server promote short of its target)."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "fetch":
        return FETCH_FAILED
    return code if code < 126 else 1


if __name__ == "__main__":
    sys.exit(main())
