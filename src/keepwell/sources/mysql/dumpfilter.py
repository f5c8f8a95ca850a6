"""Cutting one database or one table out of a ``mariadb-dump`` stream, line by line.

A dump is a preamble (session settings), then per database a ``-- Current Database: `db```
section holding ``-- Table structure for table `t```, ``-- Dumping data for table `t```,
view, event and routine sections, and a postamble that restores the session settings. The
filter keeps the preamble and postamble, the chosen database's sections and, for one table,
only that table's structure, data and triggers (its database is created if missing but never
dropped).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

_DB = re.compile(rb"^-- Current Database: `((?:[^`]|``)+)`")
_SECTION = re.compile(
    rb"^-- (?:Table structure for table|Dumping data for table|Temporary table structure for "
    rb"view|Final view structure for view|Temporary view structure for view) `((?:[^`]|``)+)`")
_DB_LEVEL = re.compile(rb"^-- Dumping (?:events|routines) for database")
_POSTAMBLE = re.compile(rb"^/\*!40\d{3} SET [A-Z_]+=@OLD_|^-- Dump completed")


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").replace("``", "`")


def lines_of(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Split a byte stream into lines (keeping the newline)."""
    rest = b""
    for chunk in chunks:
        data = rest + bytes(chunk)
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            yield data[start:nl + 1]
            start = nl + 1
        rest = data[start:]
    if rest:
        yield rest


def filter_dump(lines: Iterable[bytes], database: str, table: str | None = None) -> Iterator[bytes]:
    """Yield the lines of the dump that restore ``database`` (or only ``database.table``)."""
    in_db: bool | None = None  # None: preamble
    in_table = table is None
    for line in lines:
        if line.startswith(b"-- "):
            m = _DB.match(line)
            if m:
                in_db = _name(m.group(1)) == database
                in_table = table is None
                if in_db:
                    yield line
                continue
            m = _SECTION.match(line)
            if m and in_db:
                in_table = table is None or _name(m.group(1)) == table
            elif _DB_LEVEL.match(line) and in_db:
                in_table = table is None
        if in_db is None or _POSTAMBLE.match(line):
            yield line
            continue
        if not in_db:
            continue
        if table is not None and (line.startswith((b"CREATE DATABASE", b"USE "))):
            yield line
            continue
        if table is not None and line.startswith(b"/*!40000 DROP DATABASE"):
            continue
        if in_table:
            yield line
