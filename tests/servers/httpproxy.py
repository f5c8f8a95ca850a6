"""An HTTP proxy on loopback that forwards every request to an S3 server and can tamper with
the answers, as a broken server, cache or middlebox would: a ``GET`` answered ``200`` with a
truncated body (its ``Content-Length`` made to match), or with bytes changed.

Unlike `tests.servers.proxy.FaultProxy` (TCP), it reads whole requests and answers, so it can
change an answer and still send a well-formed one. Requests keep their ``Host`` header, so
their signatures stay valid. ``tamper`` is a function of the method, the path (with its
query) and the answer's body; it returns the body to send instead, a status and a body (an
error the server did not give), or None to pass the answer on.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.servers import free_port

Tamper = Callable[[str, str, bytes], bytes | tuple[int, bytes] | None]

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer",
              "upgrade", "proxy-connection"}


class TamperingProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.tamper: Tamper | None = None
        self.tampered = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                conn = http.client.HTTPConnection(*proxy.target, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in HOP_BY_HOP}
                    if length:
                        headers["Content-Length"] = str(length)
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                    out = data
                    status = answer.status
                    tamper = proxy.tamper
                    if tamper is not None and 200 <= answer.status < 300:
                        changed = tamper(self.command, self.path, data)
                        if isinstance(changed, tuple):
                            status, out = changed
                            with proxy._lock:
                                proxy.tampered += 1
                        elif changed is not None:
                            out = changed
                            with proxy._lock:
                                proxy.tampered += 1
                    self.send_response(status, answer.reason if status == answer.status else None)
                    for k, v in answer.getheaders():
                        if k.lower() not in HOP_BY_HOP:
                            self.send_header(k, v)
                    if self.command != "HEAD":
                        self.send_header("Content-Length", str(len(out)))
                    else:
                        self.send_header("Content-Length", answer.getheader("Content-Length", "0"))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(out)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True

    def clear(self) -> None:
        self.tamper = None

    def __enter__(self) -> TamperingProxy:
        threading.Thread(target=self._server.serve_forever, name="tampering-proxy",
                         daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
