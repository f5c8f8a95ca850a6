"""Backing up one stream as one file of a snapshot: standard input, or a command's output.

A snapshot must only say "saved" for data that is whole. Standard input cannot say whether the
program that fed it succeeded, so `backup_stdin` refuses the one failure it can see (nothing at
all arrived, as when that program failed before writing) and the docs point to
`backup_command`: it runs the program itself, stores its standard output and commits the
snapshot only if the program exits with status 0; otherwise nothing is recorded (what was
uploaded stays for a later run to reuse, as after any interrupted backup).

Both record a snapshot of kind ``stdin`` whose one path is the file name, counted as one new
file in the summary.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from typing import IO

from keepwell.errors import SourceError, UsageError
from keepwell.repository import Repository, Snapshot
from keepwell.sources.streams import ReadAhead

KIND_STDIN = "stdin"


def _check_name(filename: str) -> str:
    name = filename.strip("/")
    if not name or any(part in ("", ".", "..") for part in name.split("/")) or "\0" in name:
        raise UsageError(f"--stdin-filename {filename!r} is not a usable file name",
                         hint="give a relative name such as db.sql")
    return name


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def backup_stdin(repo: Repository, stream: IO[bytes], filename: str = "stdin", *,
                 host: str | None = None, tags: Sequence[str] = ()) -> Snapshot:
    """Store standard input (or any readable stream) as ``filename``; refuse empty input."""
    name = _check_name(filename)
    with repo.new_snapshot(KIND_STDIN, [name], host=host, tags=tags) as w:
        size = w.add_stream(name, stream)
        if size == 0:
            raise SourceError("standard input was empty: no snapshot saved",
                              hint="if a program feeds it, it may have failed; "
                                   "use --stdin-from-command to see its exit status")
        w.summary.update(files_new=1, bytes_processed=size)
        snap: Snapshot = w.commit()
    return snap


def backup_command(repo: Repository, argv: Sequence[str], filename: str = "stdin", *,
                   host: str | None = None, tags: Sequence[str] = ()) -> Snapshot:
    """Run ``argv``, store its standard output as ``filename``, and commit the snapshot only if
    it exits with status 0. Its standard input and error are keepwell's."""
    if not argv:
        raise UsageError("--stdin-from-command needs a command", hint="e.g. -- pg_dump mydb")
    name = _check_name(filename)
    what = os.path.basename(argv[0])
    try:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE)
    except OSError as exc:
        raise SourceError(f"cannot run {argv[0]}: {exc.strerror}") from None
    assert proc.stdout is not None
    ahead = ReadAhead(proc.stdout)
    try:
        with repo.new_snapshot(KIND_STDIN, [name], host=host, tags=tags) as w:
            try:
                size = w.add_stream(name, ahead)  # type: ignore[arg-type]
            finally:
                ahead.close()
            proc.stdout.close()
            rc = proc.wait()
            if rc != 0:
                why = f"was killed by signal {_signal_name(-rc)}" if rc < 0 else f"exited with status {rc}"
                raise SourceError(f"{what} {why}: no snapshot saved",
                                  hint="fix the command; its output was not recorded")
            w.summary.update(files_new=1, bytes_processed=size)
            snap: Snapshot = w.commit()
    finally:
        if proc.poll() is None:  # storing failed while it still ran
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return snap
