"""``keepwell watch``: continuous protection of directories (docs/continuous.md). Parsing and
rendering only; keepwell.sources.files.watch captures the changes and commits the snapshots."""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from typing import Annotated, Any

import typer

from keepwell.cli.common import (
    GLOBALS,
    JsonOption,
    PasswordFileOption,
    RepoOption,
    open_repo,
    refuse_empty,
    tags_given,
)
from keepwell.cli.repo_commands import selection_of
from keepwell.errors import KeepwellError, UsageError
from keepwell.units import parse_seconds


class WatchReport:
    """Renders the watcher's events: one line each on stderr, or JSON lines on stdout."""

    def __init__(self, json_: bool, quiet: bool) -> None:
        self.json = json_
        self.quiet = quiet

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        if name == "watch_committed":
            self._committed(fields)
        elif name == "watch_started":
            self._started(fields)
        elif name == "watch_limit":
            self._limit(fields)
        elif name == "watch_polling":
            self._line(f"scanning every {fields['interval']:g}s instead of watching "
                       f"({fields['reason']})")
        elif name == "watch_commit_failed":
            self._commit_failed(fields)
        elif name == "watch_recovered":
            self._line(f"committing again after {fields['failures']} failed attempt(s) over "
                       f"{fields['seconds']:.0f}s")
        elif name == "watch_caught_up":
            if self.json:
                print(json.dumps({"event": "caught_up", **fields}), flush=True)
        elif name == "watch_overflow":
            self._line("the kernel's event queue overflowed: the whole tree is scanned again")
        elif name == "warning":
            sys.stderr.write(f"keepwell: warning: {fields['message']}\n")
        elif name == "error":
            sys.stderr.write(f"keepwell: {fields['path']}: {fields['message']}\n")

    def _line(self, text: str) -> None:
        if not self.quiet:
            sys.stderr.write(f"keepwell: {text}\n")
            sys.stderr.flush()

    def _started(self, f: dict[str, Any]) -> None:
        if f["polling"]:
            self._line(f"scanning instead of watching ({f['polling']}): changes are found by "
                       "periodic scans, not as they happen")
        parent = f["parent"]
        what = (f"{f['watches']} filesystem(s) marked with fanotify"
                if f.get("notify") == "fanotify" else f"{f['watches']} directories")
        self._line(f"watching {', '.join(f['roots'])}: {what}"
                   + (f", {f['pending']} change(s) left pending by the last run" if f["pending"] else "")
                   + (f"; comparing with snapshot {parent.short_id}" if parent is not None else ""))

    def _limit(self, f: dict[str, Any]) -> None:
        limit = f["limit"]
        of = f" of fs.inotify.max_user_watches={limit}" if limit is not None else ""
        if f["near"]:
            sys.stderr.write(
                f"keepwell: warning: {f['watches']} inotify watches in use{of}: raise it, e.g. "
                f"'sysctl fs.inotify.max_user_watches={f['suggest']}' (and in /etc/sysctl.d/ to "
                "keep it after a reboot)\n")
        else:
            self._line(f"{f['watches']} inotify watches in use{of}")

    def _commit_failed(self, f: dict[str, Any]) -> None:
        exc = f["error"]
        error = exc.line(retrying=True) if isinstance(exc, KeepwellError) else f"{type(exc).__name__}: {exc}"
        if GLOBALS.debug:
            traceback.print_exception(exc)
        if self.json:  # the lag goes on growing in the lines a supervisor reads
            print(json.dumps({"event": "commit_failed", "error": error,
                              **{k: v for k, v in f.items() if k != "error"}}), flush=True)
        sys.stderr.write(f"keepwell: commit failed: {error}; {f['pending']} change(s) kept in "
                         f"the journal, oldest {f['lag_seconds']:.0f}s ago; retrying in "
                         f"{f['retry_in']:g}s\n")
        sys.stderr.flush()

    def _committed(self, f: dict[str, Any]) -> None:
        snap = f["snapshot"]
        if self.json:
            out = {k: v for k, v in f.items() if k != "snapshot"}
            out["snapshot"] = snap.id if snap is not None else None
            print(json.dumps(out), flush=True)  # one line per snapshot
            return
        if self.quiet:
            return
        if snap is None:
            self._line(f"{f['changes']} change(s): nothing new to record")
        else:
            print(f"snapshot {snap.short_id} saved: {f['changes']} changed path(s), "
                  f"{f['files_read']} file(s) read, {f['trees_written']} tree(s) written, "
                  f"{f['seconds']:.2f}s", flush=True)


def watch(
    paths: Annotated[list[str], typer.Argument(help="Directories to protect.")],
    max_delay: Annotated[str, typer.Option(
        "--max-delay", metavar="DURATION",
        help="Commit a snapshot at the latest this long after the oldest uncommitted change.")] = "1s",
    quiet_time: Annotated[str, typer.Option(
        "--quiet-time", metavar="DURATION",
        help="Commit a snapshot once changes have stopped for this long.")] = "200ms",
    poll: Annotated[str | None, typer.Option(
        "--poll", metavar="DURATION",
        help="Scan the trees this often instead of watching them (remote filesystems fall back "
             "to this by themselves, every 60s unless given).")] = None,
    tag: Annotated[list[str] | None, typer.Option(
        "--tag", help="Tag the snapshots (repeatable; 'a,b' gives both).")] = None,
    host: Annotated[str | None, typer.Option(help="Host name to record.")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        "--exclude", "-e", metavar="PATTERN",
        help="Exclude a pattern (repeatable; docs/operations.md).")] = None,
    exclude_file: Annotated[list[str] | None, typer.Option(
        "--exclude-file", metavar="FILE", help="Read exclude patterns from a file.")] = None,
    iexclude: Annotated[list[str] | None, typer.Option(
        "--iexclude", metavar="PATTERN", help="--exclude ignoring the casing of names.")] = None,
    iexclude_file: Annotated[list[str] | None, typer.Option(
        "--iexclude-file", metavar="FILE", help="--exclude-file ignoring the casing of names.")] = None,
    exclude_larger_than: Annotated[str | None, typer.Option(
        "--exclude-larger-than", metavar="SIZE", help="Exclude files larger than SIZE.")] = None,
    one_file_system: Annotated[bool, typer.Option("--one-file-system", "-x")] = False,
    notify: Annotated[str, typer.Option(
        "--notify", metavar="auto|inotify|fanotify",
        help="How changes are captured: inotify watches each directory; fanotify marks each "
             "filesystem once (needs root); auto takes fanotify where every path is a mount "
             "point or inotify runs out of watches.")] = "auto",
    repo: RepoOption = None, password_file: PasswordFileOption = None, json_: JsonOption = False,
) -> None:
    """Protect directories continuously: every change is captured as it happens and committed
    into a snapshot within --max-delay. Runs until Ctrl-C or SIGTERM, then commits what is
    pending. Each snapshot re-reads only what changed (docs/continuous.md)."""
    from keepwell.backends.cachedir import default_base
    from keepwell.sources.files.journal import Journal, journal_path
    from keepwell.sources.files.watch import Watcher, WatchOptions, watched_roots

    roots = watched_roots(paths)
    refuse_empty("--host", host, "give a host name, or leave the option out for this machine's")
    refuse_empty("--exclude", exclude, "give a pattern, or no --exclude")
    refuse_empty("--iexclude", iexclude, "give a pattern, or no --iexclude")
    options = WatchOptions(
        max_delay=parse_seconds(max_delay, "--max-delay"),
        quiet_time=parse_seconds(quiet_time, "--quiet-time"),
        poll_interval=parse_seconds(poll, "--poll") if poll is not None else None,
        one_file_system=one_file_system, host=host, notify=notify,
        tags=tags_given("--tag", tag))
    if notify not in ("auto", "inotify", "fanotify"):
        raise UsageError(f"--notify {notify!r}: give auto, inotify or fanotify")
    if options.poll_interval is not None and options.poll_interval <= 0:
        raise UsageError("--poll needs a duration above zero")
    r = open_repo(repo, password_file)
    base = (os.path.abspath(os.path.expanduser(GLOBALS.cache_dir)) if GLOBALS.cache_dir
            else default_base())
    where = journal_path(base, r.id, roots)
    # the repository and keepwell's cache (the watcher's journal is in it) are never watched:
    # each commit writes to them, and watching them would commit again, without end
    own = _own_paths(r.opened_as[0] if r.opened_as else None, base, roots)
    for path, what in own:
        if not GLOBALS.quiet:
            print(f"keepwell: note: {path} ({what}) lies inside the watched paths: not watched",
                  file=sys.stderr)
    selection = selection_of([*(exclude or []), *(p for p, _ in own)], exclude_file, iexclude,
                             iexclude_file, None, False, exclude_larger_than)
    journal = Journal(where)
    r.events.subscribe(WatchReport(json_, GLOBALS.quiet))
    watcher = Watcher(r, roots, journal, selection, options)

    def stop(_sig: int, _frame: object) -> None:
        watcher.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        watcher.run()
    finally:
        journal.close()


def _own_paths(location: str | None, cache: str,
               roots: list[str]) -> list[tuple[str, str]]:
    """The repository (when it is a local directory) and keepwell's cache directory, those of
    them that lie inside a watched root."""
    mine: list[tuple[str, str]] = []
    if location and ("://" not in location or location.startswith("file://")):
        mine.append((os.path.realpath(location.removeprefix("file://")), "the repository"))
    mine.append((os.path.realpath(cache), "keepwell's cache, which holds the watch journal"))
    real_roots = [os.path.realpath(r) for r in roots]
    return [(path, what) for path, what in mine
            if any(path == r or path.startswith(r.rstrip("/") + "/") for r in real_roots)]


def register(app: typer.Typer) -> None:
    app.command()(watch)
