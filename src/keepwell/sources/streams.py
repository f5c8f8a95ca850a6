"""Reading a native tool's output: what every source that stores a program's stream uses."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

PIPE_PAUSE = 0.002  # seconds; a 1 MiB pipe fills in about 10 ms at 100 MB/s


def widen_pipe(f: Any, size: int = 1 << 20) -> None:
    """Ask Linux for a larger pipe buffer (F_SETPIPE_SZ); harmless where it is refused."""
    try:
        import fcntl

        fcntl.fcntl(f.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (OSError, ValueError, AttributeError, ImportError):
        pass


class Prefetch:
    """A readable stream over blocks that a thread produces a bounded number ahead.

    ``blocks`` is iterated in the thread; an exception it raises reaches the reader at the
    point of the stream where it happened. `close` stops the thread at its next block.
    """

    def __init__(self, blocks: Iterator[bytes | bytearray | memoryview], *, depth: int = 32,
                 name: str = "kw-prefetch") -> None:
        self._blocks = blocks
        self._q: queue.Queue[bytes | bytearray | memoryview | BaseException | None] = (
            queue.Queue(depth))
        self._buf = memoryview(b"")
        self._eof = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: bytes | bytearray | memoryview | BaseException | None) -> bool:
        while not self._stop:
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for block in self._blocks:
                if block and not self._put(block):
                    return
        except BaseException as exc:  # handed to the reader
            self._put(exc)
            return
        self._put(None)

    def readinto(self, b: memoryview | bytearray) -> int:
        view = memoryview(b).cast("B")
        got = 0
        while got < len(view):
            if not self._buf:
                if self._eof:
                    break
                item = self._q.get()
                if item is None:
                    self._eof = True
                    break
                if isinstance(item, BaseException):
                    raise item
                self._buf = memoryview(item).cast("B")
            n = min(len(view) - got, len(self._buf))
            view[got:got + n] = self._buf[:n]
            self._buf = self._buf[n:]
            got += n
        return got

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            parts = [bytes(self._buf)]
            self._buf = memoryview(b"")
            while part := self.read(1 << 20):
                parts.append(part)
            return b"".join(parts)
        out = bytearray(n)
        got = self.readinto(out)
        return bytes(out[:got])

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        """Stop producing; the thread ends at its next block (nothing here waits for it)."""
        self._stop = True


def _pipe_blocks(raw: IO[bytes], block: int) -> Iterator[bytes]:
    # os.read on the descriptor: each block is a new bytes object filled by the kernel (no
    # zeroed buffer, no joining); nothing was read through the file object yet
    fd = raw.fileno()
    while data := os.read(fd, block):
        yield data
        if len(data) < block // 8:
            # a tool writing in small pieces would wake this thread for each one; a moment's
            # pause lets the pipe fill, so one read (and one hand-over) takes many writes
            time.sleep(PIPE_PAUSE)


class ReadAhead(Prefetch):
    """Reads a tool's output in a thread, a bounded number of blocks ahead.

    Without it the tool stalls on a full pipe whenever keepwell is busy chunking and
    compressing, and the two run one after the other instead of side by side. The pipe is
    widened to 1 MiB (Linux) so the tool writes with fewer wake-ups, and each read takes what
    the pipe holds, up to 2 MiB (no joining of 64 KiB pieces): below the size glibc serves by
    mmap (see ``tune_malloc``), so block memory is reused rather than faulted in afresh.
    `close` does not wait for the tool: the thread ends at its next block, or when the tool's
    pipe is closed by its owner.
    """

    def __init__(self, raw: IO[bytes], *, block: int = 2 << 20, depth: int = 32) -> None:
        widen_pipe(raw)
        super().__init__(_pipe_blocks(raw, block), depth=depth, name="kw-readahead")
