"""The ``copy`` command: copy snapshots from another repository into this one. Parsing and
rendering only; the work is done by keepwell.repository.copy.

The source is given by ``--from-repo`` (or ``KEEPWELL_FROM_REPOSITORY``); its password comes
from ``--from-password-file``, ``KEEPWELL_FROM_PASSWORD``, ``KEEPWELL_FROM_PASSWORD_FILE``, or a
prompt on a terminal, exactly as the destination's does from ``--password-file`` and the
``KEEPWELL_PASSWORD*`` set. The destination is the repository of ``-r``, before or after ``copy``.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from keepwell.cli.common import (
    GLOBALS,
    HostFilterOption,
    JsonOption,
    KindFilterOption,
    PasswordFileOption,
    PathFilterOption,
    RepoOption,
    TagFilterOption,
    human_bytes,
    open_repo,
    print_json,
    read_password,
    repository_options,
    snapshot_filter,
)
from keepwell.errors import RepositoryNotFoundError, UsageError, WrongPasswordError

if TYPE_CHECKING:
    from keepwell.repository import Repository

FromRepoOption = Annotated[
    str | None,
    typer.Option("--from-repo", envvar="KEEPWELL_FROM_REPOSITORY",
                 help="Source repository location (path, s3://, sftp://)."),
]
FromPasswordFileOption = Annotated[
    str | None,
    typer.Option("--from-password-file",
                 help="Read the source repository's password from a file (default: "
                      "$KEEPWELL_FROM_PASSWORD, then $KEEPWELL_FROM_PASSWORD_FILE)."),
]


def open_source(location: str | None, password_file: str | None) -> Repository:
    """Open the source repository of a copy, with errors that name it as the source."""
    from keepwell.repository import open_repository

    if not location:
        raise UsageError("no source repository given",
                         hint="pass --from-repo or set KEEPWELL_FROM_REPOSITORY")
    password = read_password(password_file, prefix="KEEPWELL_FROM",
                             what="source repository password", flag="--from-password-file")
    try:
        return open_repository(location, password, **repository_options())
    except WrongPasswordError:
        raise WrongPasswordError(f"wrong password for the source repository {location}",
                                 hint="check KEEPWELL_FROM_PASSWORD / --from-password-file") from None
    except RepositoryNotFoundError:
        raise RepositoryNotFoundError(f"no repository at {location} (the source of the copy)",
                                      hint="check --from-repo / KEEPWELL_FROM_REPOSITORY") from None


class CopyProgress:
    """Renders copy events on a terminal (bytes read, blobs, snapshots); silent in pipes."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty() and not GLOBALS.quiet
        self.bytes = 0
        self.blobs = 0
        self.done_snapshots = 0
        self.total_snapshots = 0
        self.start = time.monotonic()
        self._last = 0.0

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        if name == "copy_read":
            self.bytes += fields["n"]
            self.blobs += fields["blobs"]
        elif name == "copy_plan":
            self.total_snapshots = fields["snapshots"]
        elif name == "copy_snapshot":
            self.done_snapshots += 1
        else:
            return
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.2 and name == "copy_read":
            return
        self._last = now
        el = now - self.start
        rate = self.bytes / el if el > 0 else 0
        sys.stderr.write(f"\rcopy: {self.done_snapshots}/{self.total_snapshots} snapshots, "
                         f"{self.blobs} blobs, {human_bytes(self.bytes)} read, "
                         f"{human_bytes(rate)}/s   ")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def copy(
    snapshot_ids: Annotated[list[str] | None, typer.Argument(
        help="Source snapshot ids (prefixes) or 'latest'; default: every snapshot that matches "
             "the filters.")] = None,
    from_repo: FromRepoOption = None,
    from_password_file: FromPasswordFileOption = None,
    host: HostFilterOption = None, tag: TagFilterOption = None,
    path: PathFilterOption = None, kind: KindFilterOption = None,
    repo: RepoOption = None, password_file: PasswordFileOption = None, json_: JsonOption = False,
) -> None:
    """Copy snapshots from another repository (--from-repo) into this one (-r)."""
    from keepwell.repository.copy import copy_snapshots, select_snapshots

    flt = snapshot_filter(host, tag, path, kind)
    with open_source(from_repo, from_password_file) as src, open_repo(repo, password_file) as dst:
        if src.id == dst.id:
            raise UsageError("the source and the destination are the same repository")
        snaps = select_snapshots(src, snapshot_ids or (), flt)
        progress = CopyProgress()
        dst.events.subscribe(progress)
        try:
            report = copy_snapshots(src, dst, snaps)
        finally:
            progress.done()
    if json_:
        print_json(report.to_json())
        return
    for pair in report.copied:
        print(f"copied {pair['source'][:8]} to {pair['copy'][:8]}")
    print(f"{len(report.copied)} snapshot(s) copied, {len(report.skipped)} already present; "
          f"{report.blobs_new} new blobs in {report.packs} packs, "
          f"{human_bytes(report.bytes_read)} read, {human_bytes(report.bytes_stored)} stored, "
          f"{'same chunker parameters: blobs copied as they are' if report.mode == 'fast' else 're-chunked'}, "
          f"{report.duration:.1f}s")


def register(app: typer.Typer) -> None:
    app.command("copy")(copy)
