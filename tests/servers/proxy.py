"""A TCP proxy on loopback that a test controls, to put network faults between a client and a
server: cut every connection after some bytes, stall, throttle, refuse, freeze (the server
stops answering, on every connection, and new ones are accepted and never answered), or (for
HTTP servers) answer a burst of ``503 Slow Down`` itself.

Faults are armed on the proxy and apply to all its connections; ``bytes_up``/``bytes_down``
count what actually crossed it (client→server and server→client).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass

from tests.servers import free_port

_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass
class _Faults:
    cut_after: int | None = None  # reset all connections once this many more bytes flowed
    stall_after: int | None = None  # stop forwarding once this many more bytes flowed ...
    stall_for: float = 0.0  # ... for this long
    rate: float | None = None  # bytes per second per direction and connection
    link_rate: float | None = None  # bytes per second client→server, all connections together
    refuse: int = 0  # close this many new connections at once
    http_503: int = 0  # answer this many new HTTP requests with 503
    outage: bool = False  # after the cut, refuse every new connection until cleared
    cut_down_after: int | None = None  # reset everything once the server sent this many more
    freeze_after: int | None = None  # stop forwarding anything once this many more bytes flowed
    frozen: bool = False


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._faults = _Faults()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._thaw = threading.Event()  # set by `clear` and `stop`: frozen pumps stop waiting
        self._held: list[socket.socket] = []  # accepted while frozen, never answered
        self.bytes_up = 0
        self.bytes_down = 0
        self.cuts = 0
        self.answered_503 = 0
        self.connections = 0
        self._link_free = 0.0  # monotonic time at which the shared upstream link is free again

    # --- control -----------------------------------------------------------------------------

    def cut_after(self, n: int) -> None:
        """Reset every connection once ``n`` more bytes have crossed (either way)."""
        with self._lock:
            self._faults.cut_after = n

    def outage_after(self, n: int) -> None:
        """Once ``n`` more bytes have crossed, reset everything and refuse new connections
        until `clear` (the network is down)."""
        with self._lock:
            self._faults.cut_after = n
            self._faults.outage = True

    def cut_next_response(self, after: int = 0) -> None:
        """Reset everything once the server has sent ``after`` more bytes back: requests arrive
        and are carried out, the client never learns it (an ambiguous failure)."""
        with self._lock:
            self._faults.cut_down_after = after

    def freeze_after(self, n: int) -> None:
        """Once ``n`` more bytes have crossed (either way), nothing crosses any more, on any
        connection, until `clear`; new connections are accepted and never answered (a frozen
        server, or a path that drops everything). ``n = 0``: at once."""
        with self._lock:
            self._faults.freeze_after = n
            self._faults.frozen = n <= 0

    def stall_after(self, n: int, seconds: float) -> None:
        with self._lock:
            self._faults.stall_after = n
            self._faults.stall_for = seconds

    def throttle(self, bytes_per_second: float | None) -> None:
        with self._lock:
            self._faults.rate = bytes_per_second

    def throttle_link(self, bytes_per_second: float | None) -> None:
        """Cap the bytes per second client→server of all connections together (one link
        that the uploads share), unlike `throttle`, which caps each connection alone."""
        with self._lock:
            self._faults.link_rate = bytes_per_second
            self._link_free = time.monotonic()

    def refuse(self, n: int) -> None:
        with self._lock:
            self._faults.refuse = n

    def answer_503(self, n: int) -> None:
        """The next ``n`` requests on new connections get 503; live connections are reset so
        the client has to open new ones."""
        with self._lock:
            self._faults.http_503 = n
        self.cut_all()

    def clear(self) -> None:
        """No more faults; connections accepted while frozen are reset, the others go on."""
        with self._lock:
            self._faults = _Faults()
            held, self._held = self._held, []
        self._thaw.set()
        for s in held:
            _reset(s)
        self._thaw.clear()

    def cut_all(self) -> None:
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for s in conns:
            _reset(s)
        if conns:
            with self._lock:
                self.cuts += 1

    # --- life ----------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(128)
        self._listener = ls
        threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thaw.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        self.cut_all()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- internals -----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                refuse = self._faults.refuse > 0
                if refuse:
                    self._faults.refuse -= 1
                answer = self._faults.http_503 > 0
                frozen = self._faults.frozen
                if frozen:
                    self._held.append(client)
            if frozen:
                continue
            if refuse:
                _reset(client)
                continue
            if answer:
                threading.Thread(target=self._serve_503, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.update((client, upstream))
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, up), daemon=True).start()

    def _serve_503(self, client: socket.socket) -> None:
        # Answer HTTP requests on this connection with 503 while the budget lasts.
        client.settimeout(5)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    key, _, value = line.partition(b":")
                    if key.strip().lower() == b"content-length":
                        length = int(value.strip())
                while len(buf) < length:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                buf = buf[length:]
                with self._lock:
                    self._faults.http_503 -= 1
                    self.answered_503 += 1
                    last = self._faults.http_503 <= 0
                client.sendall(
                    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                    + f"Content-Length: {len(_SLOW_DOWN)}\r\n".encode()
                    + (b"Connection: close\r\n" if last else b"")
                    + b"\r\n"
                    + _SLOW_DOWN
                )
                if last:
                    return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                client.close()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while not self._stop.is_set():
                try:
                    data = src.recv(16384)
                except OSError:
                    break
                if not data:
                    with self._lock:
                        orderly = src in self._conns
                    if orderly:  # the peer closed: pass the close on
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_WR)
                    break
                view = memoryview(data)
                while view:
                    piece, action, pause = self._admit(len(view), up)
                    if piece:
                        try:
                            dst.sendall(view[:piece])
                        except OSError:
                            return
                        self._count(piece, up)
                        view = view[piece:]
                    if action == "cut":
                        self.cut_all()
                        return
                    if action == "freeze":
                        self._thaw.wait()
                        if self._stop.is_set():
                            return
                        continue
                    if pause:
                        time.sleep(pause)
        finally:
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def _admit(self, n: int, up: bool) -> tuple[int, str, float]:
        """How many of ``n`` bytes may go now, then what to do: ("", "cut") and a pause."""
        with self._lock:
            f = self._faults
            if f.frozen:
                return 0, "freeze", 0.0
            if f.freeze_after is not None:
                n = min(n, f.freeze_after)
                f.freeze_after -= n
                if f.freeze_after <= 0:
                    f.freeze_after = None
                    f.frozen = True
            if f.cut_down_after is not None and not up:
                if f.cut_down_after <= 0:
                    f.cut_down_after = None
                    return 0, "cut", 0.0
                n = min(n, f.cut_down_after)
                f.cut_down_after -= n
            piece = n
            if f.rate:
                piece = max(1, min(piece, int(f.rate * 0.01)))  # 10 ms worth at a time
            for limit in (f.cut_after, f.stall_after):
                if limit is not None:
                    piece = min(piece, limit)
            action = ""
            pause = piece / f.rate if f.rate else 0.0
            if f.link_rate and up:
                piece = max(1, min(piece, int(f.link_rate * 0.01)))
                now = time.monotonic()
                self._link_free = max(self._link_free, now) + piece / f.link_rate
                pause = max(pause, self._link_free - now)
            if f.cut_after is not None:
                f.cut_after -= piece
                if f.cut_after <= 0:
                    f.cut_after = None
                    action = "cut"
                    if f.outage:
                        f.refuse = 2**62
            if f.stall_after is not None:
                f.stall_after -= piece
                if f.stall_after <= 0:
                    f.stall_after = None
                    pause += f.stall_for
            return piece, action, pause

    def _count(self, n: int, up: bool) -> None:
        with self._lock:
            if up:
                self.bytes_up += n
            else:
                self.bytes_down += n


def _reset(s: socket.socket) -> None:
    """Close with RST, as a dropped network path or a crashed peer looks.

    ``shutdown(SHUT_RD)`` wakes a thread blocked in ``recv`` on it (a bare ``close`` would not),
    and with a zero linger the final close sends RST instead of FIN.
    """
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        s.close()
