"""Lists of paths to back up, read as restic reads its ``--files-from*`` options.

Words:
    patterns  ``--files-from``: one entry a line; surrounding white space is dropped, empty
              lines and lines starting with ``#`` are skipped, and each entry is a glob
              (``*``, ``?``, ``[...]``, dot files included) expanded in sorted order; an entry
              that matches nothing is kept as it is written, so the backup reports it as a
              missing path
    verbatim  ``--files-from-verbatim``: one path a line, taken literally (only empty lines
              are skipped, and the ``\\r`` of a ``\\r\\n`` line end)
    raw       ``--files-from-raw``: paths separated by NUL bytes (``find -print0``), taken
              literally

``-`` names standard input, at most once per run. Bytes that are not UTF-8 stand for themselves
(`os.fsdecode`), so any name the file system holds can be listed.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Callable
from typing import BinaryIO

from keepwell.errors import UsageError

PATTERNS, VERBATIM, RAW = "patterns", "verbatim", "raw"
OPTION = {PATTERNS: "--files-from", VERBATIM: "--files-from-verbatim", RAW: "--files-from-raw"}


def _expand(entry: str) -> list[str]:
    if not glob.has_magic(entry):
        return [entry]
    found = sorted(glob.glob(entry, include_hidden=True))
    return found or [entry]


def _entries(data: bytes, form: str) -> list[str]:
    if form == RAW:
        return [os.fsdecode(p) for p in data.split(b"\0") if p]
    out = []
    for raw_line in data.split(b"\n"):
        line = os.fsdecode(raw_line.removesuffix(b"\r"))
        if form == PATTERNS:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            out += _expand(line)
        elif line:
            out.append(line)
    return out


def read_path_lists(lists: list[tuple[str, str]],
                    stdin: Callable[[], BinaryIO] = lambda: sys.stdin.buffer) -> list[str]:
    """The paths the lists name, in order: ``lists`` holds ``(form, file)`` pairs (form:
    `PATTERNS`, `VERBATIM` or `RAW`; file ``-``: standard input)."""
    out: list[str] = []
    from_stdin = ""
    for form, name in lists:
        option = OPTION[form]
        if name == "-":
            if from_stdin:
                raise UsageError(f"{from_stdin} - and {option} - both read standard input",
                                 hint="give standard input to one of them")
            from_stdin = option
            data = stdin().read()
        else:
            try:
                with open(name, "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise UsageError(f"{option} {name}: {exc.strerror}") from None
        out += _entries(data, form)
    return out
