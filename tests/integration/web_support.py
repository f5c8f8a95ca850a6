"""Support for the web tests: a workspace with real backups in its history, a real
``keepwell web`` process, and a small HTTP client that keeps a session and its CSRF token."""

from __future__ import annotations

import http.client
import json
import subprocess
from pathlib import Path
from typing import Any

from tests.integration.control_support import CLI, Daemon, Workspace, env, write_random


def files_workspace(ws: Workspace, *, web: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> None:
    """Two files sources in one repository, a drill, and a config for the web app."""
    repo = ws.repository("main")
    for name in ("docs", "photos"):
        write_random(ws.root / "data" / name / "a.bin", 64 * 1024)
    doc: dict[str, Any] = {
        "repositories": {"main": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {n: {"kind": "files", "repository": "main", "paths": [f"data/{n}"]}
                    for n in ("docs", "photos")},
        "drills": {"docs-drill": {"source": "docs"}},
        "web": web or {"listen": "127.0.0.1:0"},
        **(extra or {}),
    }
    ws.write_config(doc)


class WebProcess(Daemon):
    """A real ``keepwell web`` process (the same log handling as a daemon)."""

    def __init__(self, config: Path, log: Path, *args: str) -> None:
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - open as long as the process runs
        self.proc = subprocess.Popen([*CLI, "web", "-c", str(config), "--log-json", *args],
                                     stdout=self._log, stderr=self._log, env=env())

    def address(self) -> str:
        ev = self.wait_for(lambda: self.events("web_listening"), what="web endpoint")
        return str(ev[0]["address"])


def web_address(daemon: Daemon) -> str:
    ev = daemon.wait_for(lambda: daemon.events("web_listening"), what="web endpoint")
    return str(ev[0]["address"])


class Client:
    """HTTP requests to the web app, keeping a session cookie like a browser would."""

    def __init__(self, address: str) -> None:
        host, _, port = address.split("://", 1)[1].rpartition(":")
        self.host, self.port = host, int(port)
        self.cookie: str | None = None
        self.csrf: str | None = None

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None,
                form: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        h = dict(headers or {})
        data: bytes | None = None
        if form is not None:
            from urllib.parse import urlencode

            data = urlencode(form).encode()
            h["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        if self.cookie:
            h.setdefault("Cookie", self.cookie)
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        out = resp.read()
        found = {k.lower(): v for k, v in resp.getheaders()}
        conn.close()
        if "set-cookie" in found:
            self.cookie = found["set-cookie"].split(";", 1)[0]
        return resp.status, found, out

    def get(self, path: str, **kw: Any) -> Any:
        status, _h, body = self.request("GET", path, **kw)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def session(self) -> dict[str, Any]:
        doc = self.get("/api/v1/session")
        self.csrf = doc["csrf"]
        return doc

    def post(self, path: str, body: Any = None, *, csrf: bool = True,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        h = dict(headers or {})
        if csrf and self.csrf:
            h["X-Keepwell-CSRF"] = self.csrf
        status, _h, out = self.request("POST", path, body if body is not None else {}, h)
        return status, json.loads(out) if out else None
