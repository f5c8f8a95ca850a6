"""``keepwell mount``: the repository as a read-only filesystem (docs/files.md, "Mount").
Parsing and rendering only; keepwell.sources.files.mount builds the view, .fuse serves it."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from keepwell.cli.common import (
    GLOBALS,
    HostFilterOption,
    KindFilterOption,
    PasswordFileOption,
    PathFilterOption,
    RepoOption,
    TagFilterOption,
    open_repo,
    snapshot_filter,
)


def mount(
    mountpoint: Annotated[str, typer.Argument(metavar="MOUNTPOINT",
                                              help="An existing, empty directory.")],
    allow_other: Annotated[bool, typer.Option(
        "--allow-other", help="Let other users access the mount (the kernel still checks each "
                              "file's mode and owner; needs user_allow_other in /etc/fuse.conf "
                              "unless run by root).")] = False,
    host: HostFilterOption = None, tag: TagFilterOption = None,
    path: PathFilterOption = None, kind: KindFilterOption = None,
    repo: RepoOption = None, password_file: PasswordFileOption = None,
) -> None:
    """Mount the repository to a local directory, read-only.

    Snapshots appear under snapshots/ by time (with a 'latest' link), hosts/HOST/,
    tags/TAG/ and ids/ID/. Files are read on demand and verified as a restore verifies them;
    a damaged file fails to read (EIO) rather than give wrong bytes. The command serves the
    mount in the foreground until Ctrl-C, SIGTERM, or 'fusermount3 -u MOUNTPOINT'.
    """
    from keepwell.sources.files.fuseload import load_fuse
    from keepwell.sources.files.mount import RepositoryView, check_mountpoint

    r = open_repo(repo, password_file)
    where = check_mountpoint(mountpoint)
    serve = load_fuse()
    view = RepositoryView(r, snapshot_filter(host, tag, path, kind))

    def mounted() -> None:
        if not GLOBALS.quiet:
            sys.stderr.write(f"serving {len(view.snapshots)} snapshots at {where}; stop with "
                             f"Ctrl-C or 'fusermount3 -u {where}'\n")

    try:
        serve(view, where, allow_other=allow_other, on_mounted=mounted)
    finally:
        view.close()


def register(app: typer.Typer) -> None:
    app.command()(mount)
