"""Reading a native tool's output: what every source that stores a program's stream uses."""

from __future__ import annotations

from typing import IO, Any


def widen_pipe(f: Any, size: int = 1 << 20) -> None:
    """Ask Linux for a larger pipe buffer (F_SETPIPE_SZ); harmless where it is refused."""
    try:
        import fcntl

        fcntl.fcntl(f.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (OSError, ValueError, AttributeError, ImportError):
        pass


class ReadAhead:
    """Reads a tool's output in a thread, a bounded number of blocks ahead.

    Without it the tool stalls on a full pipe whenever keepwell is busy chunking and
    compressing, and the two run one after the other instead of side by side. The pipe is
    widened to 1 MiB (Linux) so the tool writes with fewer wake-ups, and each block is read
    straight into its own buffer from the unbuffered file (no joining of 64 KiB pieces). Blocks
    are 2 MiB, below the size glibc serves by mmap (see ``tune_malloc``), so their memory is
    reused rather than faulted in afresh for every block.
    """

    def __init__(self, raw: IO[bytes], *, block: int = 2 << 20, depth: int = 32) -> None:
        import queue
        import threading

        self.raw = raw
        self.block = block
        self._q: queue.Queue[bytes | bytearray | memoryview | BaseException | None] = (
            queue.Queue(depth))
        self._buf = memoryview(b"")
        self._eof = False
        self._stop = False
        widen_pipe(raw)
        self._thread = threading.Thread(target=self._run, name="kw-readahead", daemon=True)
        self._thread.start()

    def _put(self, item: bytes | bytearray | memoryview | BaseException | None) -> bool:
        import queue

        while not self._stop:
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        # the unbuffered file under a BufferedReader (nothing was read through it yet)
        src: Any = getattr(self.raw, "raw", self.raw)
        try:
            while not self._stop:
                buf = bytearray(self.block)
                view = memoryview(buf)
                got = 0
                while got < self.block:
                    n = src.readinto(view[got:])
                    if not n:
                        break
                    got += n
                if not got:
                    break
                if not self._put(buf if got == self.block else view[:got]):
                    return
                if got < self.block:
                    break  # end of stream
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
                self._buf = memoryview(item)
            n = min(len(view) - got, len(self._buf))
            view[got:got + n] = self._buf[:n]
            self._buf = self._buf[n:]
            got += n
        return got

    def read(self, n: int = -1) -> bytes:
        out = bytearray(n if n >= 0 else self.block)
        got = self.readinto(out)
        return bytes(out[:got])

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        """Stop reading ahead. The thread ends at its next block, or when the tool's pipe is
        closed by its owner; nothing here waits for the tool."""
        self._stop = True
