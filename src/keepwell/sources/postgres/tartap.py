"""A pass-through reader that watches a tar stream go by and keeps chosen members' contents.

``pg_basebackup -D -`` writes the cluster as one tar stream to stdout and prints nothing about
the WAL range it needs; the range is inside the stream (``backup_label``, ``backup_manifest``).
`TarTap` wraps the stream that is being stored, parses the 512-byte tar headers as the bytes
pass, and keeps the content of the members whose names it was asked for.
"""

from __future__ import annotations

from typing import Protocol

BLOCK = 512


class Source(Protocol):
    """What TarTap reads from: a file opened for binary reading, or a tool's stream."""

    def read(self, n: int = -1, /) -> bytes: ...

    def readinto(self, b: bytearray | memoryview, /) -> int: ...


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # base-256 for large sizes
        value = field[0] & 0x7F
        for b in field[1:]:
            value = (value << 8) | b
        return value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


class TarTap:
    """Read-through wrapper: ``read``/``readinto`` behave as the wrapped stream's."""

    def __init__(self, raw: Source, watch: set[str], limit: int = 512 * 1024 * 1024) -> None:
        self.raw = raw
        self.watch = watch
        self.limit = limit
        self.captured: dict[str, bytes] = {}
        self.members = 0
        self.total = 0
        self._header = bytearray()
        self._data_left = 0  # data bytes of the current member still to pass
        self._pad_left = 0
        self._current: str | None = None
        self._buf = bytearray()
        self._long_name: str | None = None

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n) if n is not None and n >= 0 else self.raw.read()
        if data:
            self._feed(memoryview(data))
        return data

    def readinto(self, b: bytearray | memoryview) -> int:
        n = self.raw.readinto(b)  # straight into the caller's buffer: no block per read
        if n:
            self._feed(memoryview(b).cast("B")[:n])
        return n or 0

    def _feed(self, view: memoryview) -> None:
        self.total += len(view)
        while view:
            if self._data_left:
                take = min(self._data_left, len(view))
                if self._current is not None:
                    self._buf += view[:take]
                self._data_left -= take
                view = view[take:]
                if not self._data_left:
                    self._finish_member()
            elif self._pad_left:
                take = min(self._pad_left, len(view))
                self._pad_left -= take
                view = view[take:]
            else:
                take = min(BLOCK - len(self._header), len(view))
                self._header += view[:take]
                view = view[take:]
                if len(self._header) == BLOCK:
                    self._parse_header(bytes(self._header))
                    self._header.clear()

    def _parse_header(self, h: bytes) -> None:
        if h == b"\0" * BLOCK:
            return
        name = h[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = h[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if h[257:262] == b"ustar" and prefix:
            name = f"{prefix}/{name}"
        size = _octal(h[124:136])
        typeflag = h[156:157]
        if typeflag == b"L":  # GNU long name: the next member's name is the data
            self._current = "\0longname"
        else:
            if self._long_name is not None:
                name, self._long_name = self._long_name, None
            self.members += 1
            name = name.removeprefix("./")
            self._current = name if name in self.watch and size <= self.limit else None
        self._data_left = size
        self._pad_left = (-size) % BLOCK
        self._buf = bytearray()
        if size == 0:
            self._finish_member()

    def _finish_member(self) -> None:
        if self._current == "\0longname":
            self._long_name = bytes(self._buf).split(b"\0", 1)[0].decode("utf-8", "replace")
        elif self._current is not None:
            self.captured[self._current] = bytes(self._buf)
        self._current = None
        self._buf = bytearray()
