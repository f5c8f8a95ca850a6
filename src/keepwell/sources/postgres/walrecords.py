"""Finding and rewriting the ``CREATE TABLESPACE`` records of WAL that a restore replays.

PostgreSQL replays ``CREATE TABLESPACE ... LOCATION '/abs/path'`` at the absolute path written in
the record: it creates (and in some versions first empties) ``/abs/path/PG_<version>_<catalog>``
and points ``pg_tblspc/<oid>`` at it, whatever the restore did with ``pg_tblspc`` before. On the
host of the live cluster that path is the live tablespace. The only way to keep replay out of it
is to change the record before the server reads it: `rewrite_location` replaces the path in the
record's bytes (a path of at most the old length, padded with NULs, since the record's length
cannot change; the empty path makes the tablespace an *in-place* one, a directory
``pg_tblspc/<oid>`` inside the data directory) and recomputes the record's CRC-32C.

Words: a *record* starts at an LSN with a 24-byte header (total length, xid, previous LSN, info,
resource manager, CRC) followed by block and data headers and the data; its bytes run on across
page boundaries, skipping each page's header (40 bytes at the start of a segment, 24 elsewhere),
and may run on into the next segment. `scan_creates` lists the records with ``pg_waldump`` of
the cluster's own major version (another version cannot read the WAL, and a scan that read
nothing would let the record through unseen).
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import google_crc32c

from keepwell.sources.postgres.errors import ToolError
from keepwell.sources.postgres.tools import find_program
from keepwell.sources.postgres.walnames import Lsn, segment_name

RM_TBLSPC_ID = 5
XLOG_TBLSPC_CREATE = 0x00
XLR_INFO_MASK = 0x0F
XLR_BLOCK_ID_DATA_SHORT = 255
XLR_BLOCK_ID_DATA_LONG = 254
XLR_BLOCK_ID_ORIGIN = 253
XLR_BLOCK_ID_TOPLEVEL_XID = 252
RECORD_HEADER = struct.Struct("<IIQBBxxI")  # tot_len, xid, prev, info, rmid, (pad), crc
LONG_PAGE_HEADER = 40
SHORT_PAGE_HEADER = 24
# XLOG_PAGE_MAGIC of each major version: the WAL of one cannot be read by another's tools
PAGE_MAGIC = {0xD106: 13, 0xD10D: 14, 0xD110: 15, 0xD113: 16, 0xD116: 17, 0xD118: 18}
_CREATE_RE = re.compile(
    r"rmgr: Tablespace .*lsn: ([0-9A-F]+/[0-9A-F]+),.*desc: CREATE (\d+) \"(.*)\"\s*$")


@dataclass(frozen=True)
class TablespaceCreate:
    """A ``CREATE TABLESPACE`` record: where it starts and the location it holds."""

    lsn: Lsn
    oid: str
    location: str


class WalLayout:
    """Where the bytes of the WAL stream lie in segment files of one timeline."""

    def __init__(self, timeline: int, segment_size: int, page_size: int,
                 path_of: Callable[[str], str | None]) -> None:
        self.timeline = timeline
        self.segment_size = segment_size
        self.page_size = page_size
        self.path_of = path_of  # segment name -> its file, or None when it is not at hand

    def positions(self, lsn: Lsn, length: int) -> list[tuple[str, int, int]]:
        """(file, offset, count) runs holding `length` record bytes from `lsn` on."""
        runs: list[tuple[str, int, int]] = []
        pos = lsn.value
        while length > 0:
            offset = pos % self.segment_size
            page_offset = offset % self.page_size
            if page_offset == 0:  # a page header lies between the record's pieces
                skip = LONG_PAGE_HEADER if offset == 0 else SHORT_PAGE_HEADER
                pos += skip
                continue
            name = segment_name(self.timeline, pos // self.segment_size, self.segment_size)
            path = self.path_of(name)
            if path is None:
                raise ToolError(f"WAL segment {name} is needed to read the record at {lsn}")
            count = min(length, self.page_size - page_offset)
            runs.append((path, offset, count))
            pos += count
            length -= count
        return runs

    def read(self, lsn: Lsn, length: int) -> bytearray:
        out = bytearray()
        for path, offset, count in self.positions(lsn, length):
            with open(path, "rb") as f:
                f.seek(offset)
                piece = f.read(count)
            if len(piece) != count:
                raise ToolError(f"WAL file {path} ends inside the record at {lsn}")
            out += piece
        return out

    def write(self, lsn: Lsn, data: bytes | bytearray) -> None:
        done = 0
        for path, offset, count in self.positions(lsn, len(data)):
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(data[done:done + count])
                f.flush()
                os.fsync(f.fileno())
            done += count


def record_crc(record: bytes | bytearray) -> int:
    """A record's CRC-32C as PostgreSQL computes it: its body, then its header up to the CRC."""
    crc = google_crc32c.Checksum()
    crc.update(bytes(record[RECORD_HEADER.size:]))
    crc.update(bytes(record[:20]))
    return int.from_bytes(crc.digest(), "big")


def _main_data_offset(record: bytes | bytearray) -> tuple[int, int]:
    """(offset, length) of the main data of a record without block references."""
    pos = RECORD_HEADER.size
    while True:
        block_id = record[pos]
        if block_id == XLR_BLOCK_ID_DATA_SHORT:
            length, pos = record[pos + 1], pos + 2
            break
        if block_id == XLR_BLOCK_ID_DATA_LONG:
            length = struct.unpack_from("<I", record, pos + 1)[0]
            pos += 5
            break
        if block_id == XLR_BLOCK_ID_ORIGIN:
            pos += 3
        elif block_id == XLR_BLOCK_ID_TOPLEVEL_XID:
            pos += 5
        else:
            raise ToolError("a CREATE TABLESPACE record with block references: not understood")
    return pos, length


def rewrite_location(layout: WalLayout, create: TablespaceCreate, new_location: str) -> None:
    """Make the record at ``create.lsn`` hold `new_location` ('' = in-place) instead."""
    head = layout.read(create.lsn, RECORD_HEADER.size)
    tot_len, _xid, _prev, info, rmid, crc = RECORD_HEADER.unpack_from(head)
    record = layout.read(create.lsn, tot_len)
    if rmid != RM_TBLSPC_ID or info & ~XLR_INFO_MASK != XLOG_TBLSPC_CREATE:
        raise ToolError(f"the record at {create.lsn} is not a CREATE TABLESPACE record")
    if record_crc(record) != crc:
        raise ToolError(f"the CREATE TABLESPACE record at {create.lsn} fails its CRC check")
    start, length = _main_data_offset(record)
    data = record[start:start + length]
    if struct.unpack_from("<I", data, 0)[0] != int(create.oid):
        raise ToolError(f"the record at {create.lsn} is not the one of tablespace {create.oid}")
    new = new_location.encode()
    if len(new) > length - 5:  # the record's path bytes, with their terminating NUL
        raise ToolError(f"tablespace location {new_location} is longer than the one in the WAL")
    record[start + 4:start + length] = new + b"\0" * (length - 4 - len(new))
    struct.pack_into("<I", record, 20, record_crc(record))
    layout.write(create.lsn, record)


def segment_major(path: str) -> int | None:
    """The PostgreSQL major version whose WAL page format a segment file has."""
    with open(path, "rb") as f:
        head = f.read(2)
    return PAGE_MAGIC.get(struct.unpack("<H", head)[0]) if len(head) == 2 else None


def waldump_for(major: int) -> str:
    """pg_waldump of exactly this major version."""
    path = find_program("pg_waldump", major)
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except OSError as exc:
        raise ToolError(f"cannot run {path}: {exc.strerror}") from None
    m = re.search(r"(\d+)(?:\.\d+)?", out)
    if not m or int(m.group(1)) != major:
        raise ToolError(f"pg_waldump of PostgreSQL {major} is needed to check the WAL a restore"
                        f" replays ({path} is {out.strip() or 'another version'})")
    return path


def scan_creates(directory: str, first: str, last: str, major: int) -> list[TablespaceCreate]:
    """The CREATE TABLESPACE records that start in segments `first`..`last` of `directory`.

    pg_waldump stops at the first record it cannot read, as recovery does; what lies after that
    point is never replayed from these files, so it needs no look."""
    argv = [waldump_for(major), "-p", directory, "--rmgr=Tablespace", first, last]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    except OSError as exc:
        raise ToolError(f"cannot run pg_waldump: {exc.strerror}") from None
    found = []
    for line in res.stdout.splitlines():
        m = _CREATE_RE.search(line)
        if m:
            found.append(TablespaceCreate(Lsn.parse(m.group(1)), m.group(2), m.group(3)))
    problem = _access_problem(res.stderr) if res.returncode != 0 else None
    if problem:
        raise ToolError(f"pg_waldump cannot read the WAL to be replayed: {problem}")
    return found


def _access_problem(stderr: str) -> str | None:
    """pg_waldump's complaint when it could not get at a file (not the end of readable WAL,
    where it stops on a record it cannot decode, as recovery does)."""
    for line in stderr.splitlines():
        if re.search(r"could not (open|read|find|seek)|Permission denied|No such file",
                     line) and "could not find a valid record" not in line:
            return line.removeprefix("pg_waldump: error: ").strip()
    return None
