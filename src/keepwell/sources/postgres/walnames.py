"""WAL names and positions: LSNs, segment names, segment headers and timeline history files.

Pure functions and values, no I/O beyond reading a segment's first bytes. A *segment number* is
the LSN divided by the segment size; a segment *name* is 24 hex digits: 8 for the timeline,
then 8 + 8 for the segment number split at 2^32 bytes.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
SEGMENT_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
HISTORY_RE = re.compile(r"^([0-9A-F]{8})\.history$")
BACKUP_LABEL_RE = re.compile(r"^([0-9A-F]{24})\.[0-9A-F]{8}\.backup$")
PARTIAL_SUFFIX = ".partial"

# XLogLongPageHeaderData: magic u16, info u16, tli u32, pageaddr u64, rem_len u32 (+4 padding),
# then sysid u64, seg_size u32, blcksz u32.
_LONG_HEADER = struct.Struct("<HHIQI4xQII")
XLP_LONG_HEADER = 0x0002


@dataclass(frozen=True, order=True)
class Lsn:
    """A WAL position (``XLogRecPtr``), written ``16/B374D848``."""

    value: int

    @classmethod
    def parse(cls, text: str) -> Lsn:
        hi, sep, lo = text.strip().partition("/")
        if not sep:
            raise ValueError(f"not an LSN: {text!r} (expected the form 16/B374D848)")
        try:
            return cls((int(hi, 16) << 32) | int(lo, 16))
        except ValueError:
            raise ValueError(f"not an LSN: {text!r} (expected the form 16/B374D848)") from None

    def __str__(self) -> str:
        return f"{self.value >> 32:X}/{self.value & 0xFFFFFFFF:X}"

    def segno(self, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
        return self.value // segment_size


def segment_name(timeline: int, segno: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    per_id = 0x100000000 // segment_size
    return f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"


def parse_segment_name(
    name: str, segment_size: int = DEFAULT_SEGMENT_SIZE
) -> tuple[int, int] | None:
    """(timeline, segment number) of a segment name, or None if it is no segment name."""
    m = SEGMENT_RE.match(name)
    if not m:
        return None
    per_id = 0x100000000 // segment_size
    return int(m.group(1), 16), int(m.group(2), 16) * per_id + int(m.group(3), 16)


def history_name(timeline: int) -> str:
    return f"{timeline:08X}.history"


def wal_kind(name: str) -> str:
    """'segment', 'partial', 'history', 'backup' or 'other' for a file name found in pg_wal."""
    if SEGMENT_RE.match(name):
        return "segment"
    if name.endswith(PARTIAL_SUFFIX) and SEGMENT_RE.match(name[: -len(PARTIAL_SUFFIX)]):
        return "partial"
    if HISTORY_RE.match(name):
        return "history"
    if BACKUP_LABEL_RE.match(name):
        return "backup"
    return "other"


def timeline_of(name: str) -> int:
    """The timeline a WAL file name belongs to (its first eight hex digits)."""
    return int(name[:8], 16)


@dataclass(frozen=True)
class SegmentHeader:
    timeline: int
    page_address: int
    system_identifier: int
    segment_size: int


def read_segment_header(data: bytes) -> SegmentHeader | None:
    """The long page header at the start of a segment, or None if the bytes do not start one."""
    if len(data) < _LONG_HEADER.size:
        return None
    _magic, info, tli, pageaddr, _rem, sysid, seg_size, _blcksz = _LONG_HEADER.unpack_from(data)
    if not info & XLP_LONG_HEADER or seg_size == 0 or seg_size & (seg_size - 1):
        return None
    return SegmentHeader(tli, pageaddr, sysid, seg_size)


@dataclass(frozen=True)
class TimelineSwitch:
    """One line of a history file: ``parent`` timeline ended at ``switch_lsn``."""

    parent: int
    switch_lsn: Lsn
    reason: str


def parse_history(text: str) -> list[TimelineSwitch]:
    out: list[TimelineSwitch] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 2:
            continue
        out.append(
            TimelineSwitch(int(parts[0]), Lsn.parse(parts[1]), parts[2] if len(parts) > 2 else "")
        )
    return out
