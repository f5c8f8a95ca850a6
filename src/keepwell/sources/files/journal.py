"""The change journal of a watched tree: a write-ahead log of the paths that changed.

Words:
    mark        one record: a path that changed (``c``) or whose whole subtree must be scanned
                again (``t``: a new directory, an overflow), with its sequence number
    commit      a record ``s``: the snapshot that holds every change marked up to a sequence
                number; marks up to it are no longer pending
    pending     the marks after the last commit: changes that no snapshot holds yet

The journal is one file of JSON lines, appended to and fsynced in batches (`sync`), under the
cache directory, one per repository and set of watched paths. A path leaves it only once a
snapshot holding its new content is committed; a kill at any moment loses no mark that was
synced, and a torn last line (a kill in the middle of a write) is ignored. When the file grows
past `_COMPACT_AT`, it is rewritten with the pending marks only (temp file, fsync, rename).

A failing disk under the journal (full, read-only, failing) raises `JournalError`, one line that
names the file. The marks stay in memory, so commits go on; a line the file's buffer could not
take is missing from the file (whole, never torn), and a watcher restarted before the next
commit finds that change again by its start scan. The watcher warns once and goes on
committing (keepwell.sources.files.watch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from keepwell.errors import KeepwellError

CHANGED, SUBTREE, COMMITTED = "c", "t", "s"
_COMPACT_AT = 4 * 1024 * 1024


def journal_path(base: str, repository_id: str, paths: list[str]) -> str:
    """The journal's file under the cache base for this repository and these watched paths."""
    key = hashlib.sha256("\0".join(sorted(paths)).encode("utf-8", "surrogateescape")).hexdigest()
    return os.path.join(base, "watch", repository_id, key[:32], "journal")


class JournalError(KeepwellError):
    hint = ("free space in keepwell's cache directory (--cache-dir, KEEPWELL_CACHE_DIR) or fix "
            "its permissions; a restarted watcher finds every change again by its start scan")


def _failed(path: str, exc: OSError) -> JournalError:
    return JournalError(f"the watch journal {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def _disk(path: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise _failed(path, exc) from exc


@dataclass(frozen=True, slots=True)
class Mark:
    seq: int
    path: str
    subtree: bool


class Journal:
    def __init__(self, path: str) -> None:
        self.path = path
        self.pending: dict[str, Mark] = {}  # by path: the newest mark of each
        self.last_snapshot: str | None = None
        self.seq = 0
        with _disk(path):
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            self._replay()
            self._f = open(path, "ab")  # noqa: SIM115 - held for the journal's life
        self._unsynced = False

    def _replay(self) -> None:
        try:
            with open(self.path, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return
        for line in lines:
            try:
                rec = json.loads(line)
                kind, seq, value = rec[0], int(rec[1]), rec[2]
            except (ValueError, TypeError, IndexError, KeyError):
                continue  # a torn last line
            self.seq = max(self.seq, seq)
            if kind == COMMITTED:
                self.last_snapshot = str(value)
                self.pending = {p: m for p, m in self.pending.items() if m.seq > seq}
            elif kind in (CHANGED, SUBTREE):
                old = self.pending.get(value)
                self.pending[value] = Mark(seq, value, kind == SUBTREE or (old is not None and old.subtree))

    def _write(self, kind: str, seq: int, value: str) -> None:
        self._unsynced = True
        try:  # once per event: no context manager on this path
            self._f.write(json.dumps([kind, seq, value]).encode("ascii") + b"\n")
        except OSError as exc:
            raise _failed(self.path, exc) from exc

    def mark(self, path: str, subtree: bool = False) -> bool:
        """Record a change of ``path``; False if it was pending already (nothing written)."""
        old = self.pending.get(path)
        if old is not None and (old.subtree or not subtree):
            return False
        up = path
        while (cut := up.rfind("/")) > 0:  # inside a subtree that is scanned whole anyway
            up = up[:cut]
            if (m := self.pending.get(up)) is not None and m.subtree:
                return False
        self.seq += 1
        self.pending[path] = Mark(self.seq, path, subtree)
        self._write(SUBTREE if subtree else CHANGED, self.seq, path)
        return True

    @property
    def unsynced(self) -> bool:
        return self._unsynced

    def sync(self) -> None:
        if self._unsynced:
            with _disk(self.path):
                self._f.flush()
                os.fsync(self._f.fileno())
            self._unsynced = False

    def committed(self, snapshot_id: str, upto: int, again: Sequence[str] = ()) -> None:
        """The snapshot ``snapshot_id`` holds every change marked up to ``upto``, except the
        paths in ``again`` (files that kept moving while read), which stay pending. The marks
        are dropped from memory even if the journal cannot be written (`JournalError`)."""
        lines = []
        for p in again:
            old = self.pending.pop(p, None)
            self.seq += 1
            self.pending[p] = Mark(self.seq, p, old is not None and old.subtree and old.seq > upto)
            lines.append([CHANGED, self.seq, p])
        lines.append([COMMITTED, upto, snapshot_id])
        self.last_snapshot = snapshot_id
        self.pending = {p: m for p, m in self.pending.items() if m.seq > upto}
        self._unsynced = True
        with _disk(self.path):  # in one write: the buffer takes all of the lines or none
            self._f.write(b"".join(json.dumps(line).encode("ascii") + b"\n" for line in lines))
        self.sync()
        if self._f.tell() > _COMPACT_AT:
            with _disk(self.path):
                self._compact()

    def _compact(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            if self.last_snapshot is not None:
                upto = min((m.seq for m in self.pending.values()), default=self.seq + 1) - 1
                f.write(json.dumps([COMMITTED, upto, self.last_snapshot]).encode("ascii") + b"\n")
            for m in sorted(self.pending.values(), key=lambda m: m.seq):
                f.write(json.dumps([SUBTREE if m.subtree else CHANGED, m.seq, m.path])
                        .encode("ascii") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self._f.close()
        try:
            os.replace(tmp, self.path)
            fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:  # the new file, or the old one if it could not replace it
            self._f = open(self.path, "ab")  # noqa: SIM115

    def close(self) -> None:
        with contextlib.suppress(JournalError):
            self.sync()
        with contextlib.suppress(OSError):  # what its buffer still holds cannot be written
            self._f.close()
