"""Reading binary log files: event headers, GTIDs, timestamps and transaction boundaries.

A *binlog* is a file of events (``binlog.000042``): a 4-byte magic, then events with a 19-byte
header (timestamp, type, server id, length, end position, flags). This module reads headers and
the few bodies it needs (format description, GTID, GTID list, rotate) without decoding rows, so
scanning is fast and needs no server. Words used here:

- *transaction start*: the position of the event that opens an event group (a MariaDB GTID event,
  a MySQL GTID or anonymous GTID event). Replaying up to such a position stops exactly between two
  transactions.
- *closed*: the file ends with a rotate or stop event; the server will not append to it again.
- `BinlogPosition`: a (file, offset) pair, ordered by file sequence number then offset.
- *head*: when the file was created (the timestamp of its format description event) and the
  GTID state it starts from (its GTID list event). Two files of the same name with different
  heads belong to different binlog histories (another server, or a reset binary log); the head
  is the same in the file on disk and in a copy streamed by ``mariadb-binlog --raw``.

MariaDB GTIDs are ``domain-server-seq``; MySQL GTIDs are ``uuid:gno``. Both are kept as strings.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import BinaryIO

from keepwell.errors import SourceError

MAGIC = b"\xfebin"
HEADER = struct.Struct("<IBIIIH")
HEADER_LEN = 19

STOP_EVENT = 3
ROTATE_EVENT = 4
FORMAT_DESCRIPTION_EVENT = 15
XID_EVENT = 16
MYSQL_GTID_EVENT = 33
MYSQL_ANONYMOUS_GTID_EVENT = 34
MYSQL_PREVIOUS_GTIDS_EVENT = 35
MARIADB_BINLOG_CHECKPOINT_EVENT = 161
MARIADB_GTID_EVENT = 162
MARIADB_GTID_LIST_EVENT = 163
MARIADB_START_ENCRYPTION_EVENT = 164
IN_USE_FLAG = 0x1
TRANSACTION_STARTS = (MARIADB_GTID_EVENT, MYSQL_GTID_EVENT, MYSQL_ANONYMOUS_GTID_EVENT)

_NAME = re.compile(r"(?P<base>.+)\.(?P<seq>\d{6,})")


def is_binlog_name(name: str) -> bool:
    """True for what can be the name of one binary log file in a directory, ``base.NNNNNN``:
    never a path (`split_name` reads the number of any name, to place it among others)."""
    return _NAME.fullmatch(name) is not None and "/" not in name and "\0" not in name


def split_name(name: str) -> tuple[str, int]:
    """``binlog.000042`` -> (``binlog``, 42)."""
    m = _NAME.fullmatch(name)
    if not m:
        raise SourceError(f"{name!r} is not a binary log file name (expected base.NNNNNN)")
    return m.group("base"), int(m.group("seq"))


def binlog_seq(name: str) -> int:
    return split_name(name)[1]


@dataclass(frozen=True, order=True)
class BinlogPosition:
    seq: int
    offset: int
    file: str = field(compare=False)

    @classmethod
    def of(cls, file: str, offset: int) -> BinlogPosition:
        return cls(binlog_seq(file), int(offset), file)

    @classmethod
    def parse(cls, text: str) -> BinlogPosition:
        """``binlog.000042:1234`` (the form ``--target-position`` takes)."""
        file, sep, off = text.rpartition(":")
        if not sep or not off.isdigit():
            raise SourceError(f"{text!r} is not a binlog position (expected FILE:OFFSET, "
                              "e.g. binlog.000042:1234)")
        return cls.of(file, int(off))

    def __str__(self) -> str:
        return f"{self.file}:{self.offset}"


@dataclass(frozen=True)
class Transaction:
    """One event group: where it starts, when it was written, its GTID (if any)."""

    pos: int
    time: int
    gtid: str | None


@dataclass
class BinlogScan:
    """What one scan of a binlog file found."""

    name: str
    size: int = 0
    end: int = 4
    closed: bool = False
    server_ids: set[int] = field(default_factory=set)
    first_time: int | None = None
    last_time: int | None = None
    gtid_list: list[str] = field(default_factory=list)
    gtids: dict[str, tuple[str, str]] = field(default_factory=dict)
    transactions: list[Transaction] = field(default_factory=list)
    next_file: str | None = None
    checksum: bool = False
    created: int | None = None
    head_read: bool = False  # the scan got past the GTID list (the head is complete)

    def head(self) -> BinlogHead:
        return BinlogHead(self.created, tuple(self.gtid_list))

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name,
            "size": self.end,
            "closed": self.closed,
            "created": self.created,
            "server_ids": sorted(self.server_ids),
            "first_time": _iso(self.first_time),
            "last_time": _iso(self.last_time),
            "gtid_list": self.gtid_list,
            "gtids": {k: list(v) for k, v in self.gtids.items()},
            "transactions": len(self.transactions),
        }


@dataclass(frozen=True)
class BinlogHead:
    """What identifies a binlog file within its history (see the module's *head*)."""

    created: int | None
    gtid_list: tuple[str, ...]

    @classmethod
    def of_summary(cls, summary: dict[str, object]) -> BinlogHead:
        created, gtids = summary.get("created"), summary.get("gtid_list")
        return cls(created if isinstance(created, int) else None,
                   tuple(str(g) for g in gtids) if isinstance(gtids, list) else ())

    def differs(self, other: BinlogHead) -> bool:
        """True when the two cannot be the same file (an unknown creation time is not
        compared: summaries written by older keepwell versions lack it)."""
        if self.gtid_list != other.gtid_list:
            return True
        return None not in (self.created, other.created) and self.created != other.created

    def describe(self) -> str:
        when = _iso(self.created) if self.created else "an unknown time"
        return f"created {when}, starting after [{', '.join(self.gtid_list)}]"


def _iso(ts: int | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _mariadb_gtid(domain: int, server: int, seq: int) -> str:
    return f"{domain}-{server}-{seq}"


def parse_gtid(text: str) -> tuple[int, int, int]:
    """``0-1-42`` -> (domain, server, seq) for MariaDB GTIDs."""
    parts = text.strip().split("-")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise SourceError(f"{text!r} is not a MariaDB GTID (expected domain-server-seq, "
                          "e.g. 0-1-42)")
    return int(parts[0]), int(parts[1]), int(parts[2])


_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_TAG = re.compile(r"^[a-z_][a-z0-9_]{0,31}$")


def gtid_key(gtid: str) -> tuple[str, int]:
    """The stream a GTID belongs to and its sequence number (MariaDB domain, MySQL uuid)."""
    text = gtid.strip()
    if ":" in text:
        uuid, _, gno = text.lower().rpartition(":")
        head, _, tag = uuid.partition(":")
        if not _UUID.match(head) or (tag and not _TAG.match(tag)) or not gno.isdigit():
            raise SourceError(f"{gtid!r} is not a MySQL GTID (expected server_uuid:number, "
                              "e.g. 3e11fa47-71ca-11e1-9e33-c80aa9429562:23)")
        return uuid, int(gno)
    domain, _server, seq = parse_gtid(text)
    return str(domain), seq


GtidSet = dict[str, list[tuple[int, int]]]


def parse_gtid_set(text: str) -> GtidSet:
    """A GTID position or set as {stream: [(first, last), ...]}, for either flavor.

    MariaDB writes the last GTID of each domain (``0-1-5,1-2-7``: domain 0 up to 5, domain 1 up
    to 7); MySQL writes intervals per server UUID, often over several lines
    (``3e11...:1-5:7-9,\n8b1c...:1-3``; 8.3+ adds tags: ``uuid:1-5:tag:1-2``).
    """
    out: GtidSet = {}
    for item in "".join(text.split()).split(","):
        if not item:
            continue
        if ":" not in item:
            domain, _server, seq = parse_gtid(item)
            out.setdefault(str(domain), []).append((1, seq))
            continue
        parts = item.lower().split(":")
        if not _UUID.match(parts[0]):
            raise SourceError(f"{item!r} is not a MySQL GTID set (expected uuid:1-5:7-9)")
        key = parts[0]
        for part in parts[1:]:
            if _TAG.match(part):
                key = f"{parts[0]}:{part}"
                continue
            first, _, last = part.partition("-")
            if not first.isdigit() or (last and not last.isdigit()):
                raise SourceError(f"{item!r} is not a MySQL GTID set (expected uuid:1-5:7-9)")
            out.setdefault(key, []).append((int(first), int(last or first)))
    return out


def normalize_gtid_set(text: str) -> str | None:
    """One line, lower-case UUIDs, no blanks; None when empty. Unparseable text is kept as it
    was written (minus blanks): it is informative, and positions never depend on it."""
    flat = "".join(text.split())
    if not flat:
        return None
    try:
        parse_gtid_set(flat)
    except SourceError:
        return flat
    return flat.lower()


def gtid_in_set(gtid: str, gtids: GtidSet) -> bool:
    key, seq = gtid_key(gtid)
    return any(a <= seq <= b for a, b in gtids.get(key, ()))


Header = tuple[int, int, int, int, int, int]


def iter_events(f: BinaryIO, *, start: int = 4) -> Iterator[tuple[int, Header, bytes]]:
    """Yield (position, header, body) for every complete event; stops at a torn tail."""
    magic = f.read(4)
    if magic != MAGIC:
        raise SourceError("not a binary log (bad magic)")
    pos = 4
    if start > 4:
        f.seek(start)
        pos = start
    while True:
        head = f.read(HEADER_LEN)
        if len(head) < HEADER_LEN:
            return
        hdr = HEADER.unpack(head)
        length = hdr[3]
        if length < HEADER_LEN:
            raise SourceError(f"corrupt binary log event at offset {pos} (length {length})")
        body = f.read(length - HEADER_LEN)
        if len(body) < length - HEADER_LEN:
            return
        yield pos, hdr, body
        pos += length


def scan(f: BinaryIO, name: str, *, keep_transactions: bool = False) -> BinlogScan:
    """Scan a binlog stream from its beginning."""
    out = BinlogScan(name=name)
    crc = 0
    for pos, (ts, etype, server_id, length, _next, _flags), body in iter_events(f):
        out.end = pos + length
        if etype == FORMAT_DESCRIPTION_EVENT:
            if out.created is None:
                out.created = ts
            # The in-use flag is not reliable (a server clears it in what it streams), so
            # only a rotate or stop event marks a file closed. The checksum algorithm byte
            # precedes the 4-byte checksum at the body's end.
            if len(body) >= 5 + 57:
                out.checksum = body[-5] == 1
                crc = 4 if out.checksum else 0
            continue
        if etype == MARIADB_START_ENCRYPTION_EVENT:
            raise _encrypted(name)
        if ts:
            if out.first_time is None and etype not in (ROTATE_EVENT,):
                out.first_time = ts
            out.last_time = ts if out.last_time is None else max(out.last_time, ts)
        if server_id:
            out.server_ids.add(server_id)
        payload = body[: len(body) - crc] if crc else body
        if etype in (MARIADB_GTID_LIST_EVENT, MYSQL_PREVIOUS_GTIDS_EVENT) or (
                etype in TRANSACTION_STARTS):
            out.head_read = True
        if etype == MARIADB_GTID_LIST_EVENT:
            out.gtid_list.extend(_gtid_list(payload))
        elif etype in TRANSACTION_STARTS:
            gtid: str | None = None
            if etype == MARIADB_GTID_EVENT:
                seq, domain = struct.unpack_from("<QI", payload, 0)
                gtid = _mariadb_gtid(domain, server_id, seq)
            elif etype == MYSQL_GTID_EVENT:
                sid = payload[1:17].hex()
                uuid = f"{sid[:8]}-{sid[8:12]}-{sid[12:16]}-{sid[16:20]}-{sid[20:]}"
                (gno,) = struct.unpack_from("<q", payload, 17)
                gtid = f"{uuid}:{gno}"
            if gtid is not None:
                key, _ = gtid_key(gtid)
                first = out.gtids.get(key, (gtid, gtid))[0]
                out.gtids[key] = (first, gtid)
            if keep_transactions:
                out.transactions.append(Transaction(pos, ts, gtid))
        elif etype == ROTATE_EVENT and ts:
            # a real rotate (timestamp set) closes the file; a fake one (ts 0) only names it
            (_p,) = struct.unpack_from("<Q", payload, 0)
            out.next_file = payload[8:].decode("utf-8", "replace")
            out.closed = True
        elif etype == STOP_EVENT:
            out.closed = True
            out.head_read = True
    f.seek(0, 2)
    out.size = f.tell()
    return out


def _encrypted(name: str) -> SourceError:
    return SourceError(f"{name} is encrypted; keepwell reads only unencrypted binlogs",
                       hint="turn off encrypt_binlog or use physical backups only")


def read_head(path: str) -> BinlogHead:
    """The head of a binlog file, reading only its first events."""
    created: int | None = None
    gtids: list[str] = []
    with open(path, "rb") as f:
        for _pos, (ts, etype, _sid, _len, _next, _flags), body in iter_events(f):
            if etype == FORMAT_DESCRIPTION_EVENT and created is None:
                created = ts
            elif etype == MARIADB_GTID_LIST_EVENT:
                gtids = _gtid_list(body)
                break
            elif etype == MARIADB_START_ENCRYPTION_EVENT:
                raise _encrypted(os.path.basename(path))
            elif etype in TRANSACTION_STARTS or etype == MYSQL_PREVIOUS_GTIDS_EVENT:
                break
    return BinlogHead(created, tuple(gtids))


def _gtid_list(body: bytes) -> list[str]:
    """The GTIDs of a MariaDB GTID list event's body (a trailing checksum is ignored)."""
    (count,) = struct.unpack_from("<I", body, 0)
    count &= 0x0FFFFFFF
    out = []
    for i in range(count):
        d, s, q = struct.unpack_from("<IIQ", body, 4 + 16 * i)
        out.append(_mariadb_gtid(d, s, q))
    return out


def scan_path(path: str, name: str | None = None, *, keep_transactions: bool = False) -> BinlogScan:
    with open(path, "rb") as f:
        return scan(f, name or os.path.basename(path), keep_transactions=keep_transactions)
