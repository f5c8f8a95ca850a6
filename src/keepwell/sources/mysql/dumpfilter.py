"""Cutting databases or tables out of a ``mariadb-dump`` stream, line by line, and listing what
a dump holds.

A dump is a preamble (session settings), then per database a ``-- Current Database: `db```
section holding ``-- Table structure for table `t```, ``-- Dumping data for table `t```,
view, event and routine sections, and a postamble that restores the session settings. The
filter keeps the preamble and postamble, the chosen databases' sections and, for tables, only
those tables' (or views') structure, data and triggers (their database is created if missing
but never dropped). A name that matches nothing is an error: the filter holds back what it
would send until the first chosen section appears, so a dump without it sends nothing at all.

`DumpInventory` reads the section comments of a dump as it passes (at backup) and lists the
databases and the tables and views of each, so a restore can check the names it is given
before it touches the target.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

from keepwell.errors import SourceError

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


class DumpInventory:
    """The databases of a dump and the tables and views of each, from its section comments."""

    LONGEST = 4096  # a section comment line is short; a longer unfinished line is data

    def __init__(self) -> None:
        self.databases: dict[str, list[str]] = {}
        self._db: str | None = None
        self._rest = b"\n"  # the dump starts at a line start

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        buf = self._rest + bytes(data)
        i = buf.find(b"\n-- ")
        while i >= 0:
            end = buf.find(b"\n", i + 1)
            if end < 0:
                break
            self._line(buf[i + 1:end + 1])
            i = buf.find(b"\n-- ", end)
        last = buf.rfind(b"\n")
        tail = buf[last:] if last >= 0 else b""
        self._rest = tail if len(tail) <= self.LONGEST else b""

    def _line(self, line: bytes) -> None:
        m = _DB.match(line)
        if m:
            self._db = _name(m.group(1))
            self.databases.setdefault(self._db, [])
            return
        m = _SECTION.match(line)
        if m and self._db is not None:
            names = self.databases[self._db]
            name = _name(m.group(1))
            if name not in names:
                names.append(name)


def _names(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def filter_dump(lines: Iterable[bytes], database: str | Sequence[str],
                table: str | Sequence[str] | None = None) -> Iterator[bytes]:
    """Yield the lines of the dump that restore the databases (or only the tables of one);
    raise `SourceError` when a name matches nothing (see the module)."""
    databases, tables = set(_names(database)), set(_names(table))
    seen_dbs: set[str] = set()
    seen_tables: set[str] = set()
    held: list[bytes] | None = []  # None once a chosen section has begun
    for line in _filter(lines, databases, tables, seen_dbs, seen_tables):
        if held is None:
            yield line
        elif (seen_tables if tables else seen_dbs):
            yield from held
            held = None
            yield line
        else:
            held.append(line)
    missing = sorted(tables - seen_tables) if tables else sorted(databases - seen_dbs)
    if missing:
        what = "table" if tables else "database"
        where = f" of database {', '.join(sorted(databases))}" if tables else ""
        done = (f" ({', '.join(sorted(seen_tables or seen_dbs))} restored)"
                if held is None else "")
        raise SourceError(f"{what} {', '.join(missing)}{where} is not in the dump{done}")


def _filter(lines: Iterable[bytes], databases: set[str], tables: set[str],
            seen_dbs: set[str], seen_tables: set[str]) -> Iterator[bytes]:
    in_db: bool | None = None  # None: preamble
    in_table = not tables
    for line in lines:
        if line.startswith(b"-- "):
            m = _DB.match(line)
            if m:
                name = _name(m.group(1))
                in_db = name in databases
                in_table = not tables
                if in_db:
                    seen_dbs.add(name)
                    yield line
                continue
            m = _SECTION.match(line)
            if m and in_db:
                name = _name(m.group(1))
                in_table = not tables or name in tables
                if tables and in_table:
                    seen_tables.add(name)
            elif _DB_LEVEL.match(line) and in_db:
                in_table = not tables
        if in_db is None or _POSTAMBLE.match(line):
            yield line
            continue
        if not in_db:
            continue
        if tables and (line.startswith((b"CREATE DATABASE", b"USE "))):
            yield line
            continue
        if tables and line.startswith(b"/*!40000 DROP DATABASE"):
            continue
        if in_table:
            yield line
