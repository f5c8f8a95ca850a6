"""The web app's HTTP server: pages, the JSON API under ``/api/v1/``, live events, and its guard.

Built on the standard library's `ThreadingHTTPServer` (one thread per request; a server-sent
events stream holds its thread while the page is open), so the app adds no dependency.

The guard (docs/web.md, "Security"):

* *Host*: on a loopback address, a request must name a loopback host (a page of another site
  cannot reach it through a DNS name rebound to 127.0.0.1).
* *Token*: when ``web.token`` is set, every request but the login page and the static files
  must carry it, as ``Authorization: Bearer TOKEN`` (API clients) or as the session cookie the
  login page sets (HttpOnly, SameSite=Strict). Failed logins are limited per client address.
* *Roles*: ``web.token`` makes an *operator*, ``web.viewer_token`` a *viewer*; on loopback
  without a token everyone is an operator. A viewer sees every page and API answer; every action
  a viewer sends is refused (403), and pages hide the buttons.
* *CSRF*: an action (every POST) sent with a session cookie, or with no credential at all on
  loopback, must carry the session's CSRF token in ``X-Keepwell-CSRF`` (pages embed it; API
  clients read it from ``GET /api/v1/session``). A bearer token is no ambient credential, so
  it needs none.

Every action records who asked and in what role: the job's ``requested_by``, an alert's
``acknowledged_by`` (``web:ROLE:CREDENTIAL@ADDRESS``, e.g. ``web:operator:session@10.0.0.7``).
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import ssl
import threading
import time
from collections.abc import Callable
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

from keepwell.control.config import is_loopback
from keepwell.errors import ConfigurationError, KeepwellError, UsageError
from keepwell.web import pages
from keepwell.web.openapi import schema
from keepwell.web.views import Dashboard, NotFound

SESSION_COOKIE = "keepwell_session"
SESSION_TTL = 12 * 3600.0
LOGIN_ATTEMPTS = 5  # failed logins per client address per LOGIN_WINDOW
LOGIN_WINDOW = 60.0
EVENT_INTERVAL = 1.0
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".txt": "text/plain"}


class Refused(KeepwellError):
    """A request without the credential or the CSRF token it needs."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


OPERATOR = "operator"
VIEWER = "viewer"


class Identity(NamedTuple):
    """Who is asking: the credential (``loopback``, ``token``, ``session``), the role, and the
    CSRF token their actions need (None: none)."""

    kind: str
    role: str
    csrf: str | None


class Guard:
    """Sessions, CSRF tokens and login rate limits of one server (kept in memory)."""

    def __init__(self, token: str | None, listen: str, viewer_token: str | None = None) -> None:
        self.token = token
        self.tokens = [(t, role) for t, role in ((token, OPERATOR), (viewer_token, VIEWER))
                       if t is not None]
        self.loopback = is_loopback(listen)
        self.anonymous_csrf = secrets.token_urlsafe(24)  # loopback without a token
        self._sessions: dict[str, tuple[float, str, str]] = {}  # id -> (expiry, csrf, role)
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def login(self, client: str, given: str) -> str:
        """A new session id for the right token; `Refused` otherwise or when rate-limited."""
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._failures.get(client, []) if now - t < LOGIN_WINDOW]
            self._failures[client] = recent
            if len(recent) >= LOGIN_ATTEMPTS:
                raise Refused("too many failed logins: wait a minute", 429)
            role = self._role(given)
            if role is None:
                recent.append(now)
                raise Refused("wrong token", 403)
            sid = secrets.token_urlsafe(32)
            self._sessions[sid] = (time.time() + SESSION_TTL, secrets.token_urlsafe(24), role)
            return sid

    def _role(self, given: str) -> str | None:
        """The role of a token, or None; every token is compared, each in constant time."""
        found = None
        for token, role in self.tokens:
            if hmac.compare_digest(given.encode(), token.encode()):
                found = found or role
        return found

    def logout(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    def session(self, sid: str | None) -> tuple[str, str] | None:
        """(CSRF token, role) of a live session, or None."""
        with self._lock:
            found = self._sessions.get(sid or "")
            if found is None or found[0] < time.time():
                self._sessions.pop(sid or "", None)
                return None
            return found[1], found[2]

    def check_host(self, host: str | None) -> None:
        if not self.loopback:
            return
        name = (host or "").rpartition(":")[0] if (host or "").count(":") == 1 else (host or "")
        name = name.strip("[]") or (host or "")
        if not (name in ("localhost", "::1") or name.startswith("127.")):
            raise Refused(f"host {host!r} is not this server's loopback address", 421)

    def identify(self, headers: Any, cookie_sid: str | None) -> Identity:
        auth = headers.get("Authorization") or ""
        if self.token is not None and auth.startswith("Bearer "):
            role = self._role(auth[7:].strip())
            if role is not None:
                return Identity("token", role, None)
            raise Refused("wrong token", 401)
        if self.token is None:
            return Identity("loopback", OPERATOR, self.anonymous_csrf)
        found = self.session(cookie_sid)
        if found is None:
            raise Refused("log in first", 401)
        return Identity("session", found[1], found[0])


class WebApp:
    """The routes: pages, API and static files over one `Dashboard`."""

    def __init__(self, dashboard: Dashboard, guard: Guard) -> None:
        self.dash = dashboard
        self.guard = guard
        self.stopping = threading.Event()
        R = re.compile
        self.api_get: list[tuple[re.Pattern[str], Callable[..., Any]]] = [
            (R(r"/api/v1/overview"), lambda q: self.dash.overview()),
            (R(r"/api/v1/sources"), lambda q: self.dash.overview()["sources"]),
            (R(r"/api/v1/sources/([^/]+)"), lambda q, n: self.dash.source(n)),
            (R(r"/api/v1/sources/([^/]+)/snapshots"), lambda q, n: self.dash.snapshots(n)),
            (R(r"/api/v1/runs"), lambda q: self.dash.runs(
                source=_one(q, "source"), action=_one(q, "action"), status=_one(q, "status"),
                limit=int(_one(q, "limit") or 50))),
            (R(r"/api/v1/runs/(\d+)"), lambda q, i: self.dash.run(int(i))),
            (R(r"/api/v1/jobs/([^/]+)"), lambda q, j: self.dash.runs_of_job(j)),
            (R(r"/api/v1/running"), lambda q: self.dash.running()),
            (R(r"/api/v1/repositories"), lambda q: self.dash.repositories()),
            (R(r"/api/v1/repositories/([^/]+)"), lambda q, n: self.dash.repository(n)),
            (R(r"/api/v1/drills"), lambda q: self.dash.drills()),
            (R(r"/api/v1/alerts"), lambda q: self.dash.alerts(_one(q, "all") == "1")),
            (R(r"/api/v1/openapi.json"), lambda q: schema()),
        ]
        # a page takes its `pages.Viewer` (CSRF token and role) and the groups of its path
        self.pages: list[tuple[re.Pattern[str], Callable[..., str]]] = [
            (R(r"/"), lambda c: pages.overview(self.dash.overview(), c)),
            (R(r"/sources/([^/]+)"), lambda c, n: pages.source(self.dash.source(n), c)),
            (R(r"/runs/(\d+)"), lambda c, i: pages.run(self.dash.run(int(i)), c)),
            (R(r"/repositories/([^/]+)"), lambda c, n: pages.repository(
                self.dash.repository(n), c)),
            (R(r"/drills"), lambda c: pages.drills(self.dash.drills(), c)),
            (R(r"/running"), lambda c: pages.running(self.dash.running(), c)),
        ]

    def post(self, path: str, body: dict[str, Any], who: str) -> tuple[int, Any]:
        m = re.fullmatch(r"/api/v1/alerts/(.+)/acknowledge", path)
        if m:
            return 200, self.dash.acknowledge(unquote(m[1]), who)
        m = re.fullmatch(r"/api/v1/actions/(backup|drill)", path)
        if m:
            name = body.get("source") if m[1] == "backup" else body.get("drill",
                                                                         body.get("source"))
            if not isinstance(name, str) or not name:
                raise UsageError("give the name: {\"source\": NAME} or {\"drill\": NAME}")
            return 202, self.dash.start(m[1], name, who)
        raise NotFound(f"no action at {path}")


def _one(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def _static(name: str) -> bytes | None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        return None
    try:
        return resources.files("keepwell.web").joinpath("static", name).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None


def make_handler(app: WebApp) -> type[BaseHTTPRequestHandler]:
    guard = app.guard

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "keepwell"
        sys_version = ""

        # -- answers ----------------------------------------------------------------------
        def _send(self, code: int, body: bytes, ctype: str,
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Content-Security-Policy",
                             "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                             "script-src 'self'; frame-ancestors 'none'")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, code: int, doc: Any, headers: dict[str, str] | None = None) -> None:
            self._send(code, json.dumps(doc, default=str).encode(), "application/json",
                       headers)

        def _error(self, exc: Exception, api: bool) -> None:
            if isinstance(exc, Refused):
                code = exc.status
            elif isinstance(exc, NotFound):
                code = 404
            elif isinstance(exc, UsageError | ConfigurationError | ValueError):
                code = 409 if "already" in str(exc) else 400
            else:
                code = 500
            message = exc.line() if isinstance(exc, KeepwellError) else str(exc)
            if code == 401 and not api:
                self._send(303, b"", "text/plain", {"Location": "/login"})
            elif api:
                self._json(code, {"error": message, "status": code})
            else:
                self._send(code, pages.error(code, message).encode(), "text/html; charset=utf-8")

        def _cookie(self) -> str | None:
            jar = SimpleCookie()
            try:
                jar.load(self.headers.get("Cookie") or "")
            except Exception:
                return None
            morsel = jar.get(SESSION_COOKIE)
            return morsel.value if morsel is not None else None

        def _who(self, ident: Identity) -> str:
            return f"web:{ident.role}:{ident.kind}@{self.client_address[0]}"

        # -- methods ----------------------------------------------------------------------
        def do_HEAD(self) -> None:  # noqa: N802 - the http.server protocol
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802
            url = urlsplit(self.path)
            path, query = url.path, parse_qs(url.query)
            api = path.startswith("/api/")
            try:
                guard.check_host(self.headers.get("Host"))
                if path.startswith("/static/"):
                    body = _static(path[len("/static/"):])
                    if body is None:
                        raise NotFound(f"no file {path}")
                    ext = path[path.rfind("."):]
                    self._send(200, body, STATIC_TYPES.get(ext, "application/octet-stream"),
                               {"Cache-Control": "max-age=3600"})
                    return
                if path == "/login":
                    self._send(200, pages.login(None).encode(), "text/html; charset=utf-8")
                    return
                ident = guard.identify(self.headers, self._cookie())
                if path == "/api/v1/session":
                    self._json(200, {"who": self._who(ident), "role": ident.role,
                                     "csrf": ident.csrf if ident.role == OPERATOR else None})
                    return
                if path == "/api/v1/events":
                    self._events()
                    return
                routes = app.api_get if api else app.pages
                for pattern, fn in routes:
                    m = pattern.fullmatch(path)
                    if m:
                        groups = [unquote(g) for g in m.groups()]
                        if api:
                            self._json(200, fn(query, *groups))
                        else:
                            viewer = pages.Viewer(ident.csrf, ident.role)
                            self._send(200, fn(viewer, *groups).encode(),
                                       "text/html; charset=utf-8")
                        return
                raise NotFound(f"nothing at {path}")
            except (BrokenPipeError, ConnectionResetError):
                return
            except Exception as exc:
                self._error(exc, api)

        def do_POST(self) -> None:  # noqa: N802
            path = urlsplit(self.path).path
            try:
                guard.check_host(self.headers.get("Host"))
                length = int(self.headers.get("Content-Length") or 0)
                if length > 65536:
                    raise UsageError("request body too large")
                raw = self.rfile.read(length) if length else b""
                if path == "/login":
                    self._login(raw)
                    return
                if path == "/logout":
                    guard.logout(self._cookie())
                    self._send(303, b"", "text/plain", {
                        "Location": "/login",
                        "Set-Cookie": f"{SESSION_COOKIE}=; Max-Age=0; Path=/; HttpOnly; "
                                      "SameSite=Strict"})
                    return
                ident = guard.identify(self.headers, self._cookie())
                if ident.role != OPERATOR:
                    raise Refused(f"the {ident.role} role may look but not act: {path} needs "
                                  "the operator's token (web.token)", 403)
                if ident.csrf is not None and not hmac.compare_digest(
                        (self.headers.get("X-Keepwell-CSRF") or "").encode(),
                        ident.csrf.encode()):
                    raise Refused("missing or wrong CSRF token (X-Keepwell-CSRF)", 403)
                try:
                    body = json.loads(raw) if raw.strip() else {}
                except ValueError:
                    raise UsageError("the request body is not JSON") from None
                if not isinstance(body, dict):
                    raise UsageError("the request body must be a JSON object")
                code, doc = app.post(path, body, self._who(ident))
                self._json(code, doc)
            except (BrokenPipeError, ConnectionResetError):
                return
            except Exception as exc:
                self._error(exc, True)

        def _login(self, raw: bytes) -> None:
            form = parse_qs(raw.decode(errors="replace"))
            try:
                sid = guard.login(self.client_address[0], _one(form, "token") or "")
            except Refused as exc:
                self._send(exc.status, pages.login(exc.line()).encode(),
                           "text/html; charset=utf-8")
                return
            secure = "; Secure" if isinstance(self.connection, ssl.SSLSocket) else ""
            self._send(303, b"", "text/plain", {
                "Location": "/",
                "Set-Cookie": f"{SESSION_COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict"
                              f"{secure}"})

        def _events(self) -> None:
            """Server-sent events: ``running`` (the running jobs) every EVENT_INTERVAL."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            while not app.stopping.is_set():
                doc = json.dumps(app.dash.running(fleet=False), default=str)
                self.wfile.write(f"event: running\ndata: {doc}\n\n".encode())
                self.wfile.flush()
                app.stopping.wait(EVENT_INTERVAL)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


class WebServer:
    """Serves a `WebApp` on a background thread (`start`/`stop`), or in the foreground."""

    def __init__(self, dashboard: Dashboard, listen: str, token: str | None,
                 tls: tuple[str, str] | None = None, viewer_token: str | None = None) -> None:
        if not is_loopback(listen) and token is None:
            raise ConfigurationError(f"web: listening on {listen} (beyond loopback) needs a "
                                     "token", hint="set web.token (env:NAME or file:PATH)")
        if viewer_token is not None and (token is None or viewer_token == token):
            raise ConfigurationError("web: viewer_token needs a token of its own beside "
                                     "web.token (the operator's)")
        host, _, port = listen.rpartition(":")
        self.app = WebApp(dashboard, Guard(token, listen, viewer_token))
        try:
            self.httpd = ThreadingHTTPServer((host.strip("[]") or "0.0.0.0", int(port)),
                                             make_handler(self.app))
        except OSError as exc:
            raise ConfigurationError(f"web: cannot listen on {listen}: {exc.strerror or exc}",
                                     hint="choose another address (--listen or web.listen)"
                                     ) from None
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                context.load_cert_chain(tls[0], tls[1])
            except (OSError, ssl.SSLError) as exc:
                self.httpd.server_close()
                raise ConfigurationError(f"web: cannot load the TLS certificate: {exc}"
                                         ) from None
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.daemon_threads = True
        self.scheme = "https" if tls is not None else "http"
        self.host = host.strip("[]") or "0.0.0.0"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="web",
                                       daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def address(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self) -> None:
        self.thread.start()

    def serve(self, stop: threading.Event) -> None:
        self.start()
        stop.wait()
        self.stop()

    def stop(self) -> None:
        self.app.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
