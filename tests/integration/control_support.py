"""Support for the control-plane integration tests: real repositories, configs, daemons, hooks.

`Workspace` makes a temporary tree with repositories (weak KDF for speed), writes keepwell.yaml,
starts real ``keepwell daemon`` processes and runs real CLI commands. `WebhookSink` is a real
HTTP server that records the notifications it receives.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from tests.servers.postgres import (
    PgCluster,
    as_pg_user,
    make_workdir,
    pg_available,
    remove_workdir,
    stop_all_in,
)

PASSWORD = "test-password"
CLI = [sys.executable, "-m", "keepwell.cli.control"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["KEEPWELL_TESTONLY_WEAK_KDF"] = "1"
    e["KW_TEST_PASSWORD"] = PASSWORD
    src = str(Path(__file__).resolve().parents[2] / "src")
    e["PYTHONPATH"] = src + os.pathsep + e.get("PYTHONPATH", "")
    return e


def init_repository(path: Path) -> None:
    os.environ["KEEPWELL_TESTONLY_WEAK_KDF"] = "1"
    from keepwell.backends import open_backend
    from keepwell.repository import Repository

    Repository.init(open_backend(str(path)), PASSWORD).close()


def write_random(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))


class Daemon:
    """A real ``keepwell daemon`` process logging JSON lines to a file."""

    def __init__(self, config: Path, log: Path, args: tuple[str, ...] = ()) -> None:
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - open as long as the daemon runs
        self.proc = subprocess.Popen([*CLI, "daemon", "-c", str(config), "--log-json", *args],
                                     stdout=self._log, stderr=self._log, env=env())

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and (name is None or doc.get("event") == name):
                out.append(doc)
        return out

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0,
                 what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) waiting for {what}:"
                                     f"\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n"
                             f"{self.log_path.read_text()[-3000:]}")

    def metrics_port(self) -> int:
        ev = self.wait_for(lambda: self.events("metrics_listening"), what="metrics endpoint")
        return int(ev[0]["address"].rsplit(":", 1)[1])

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.config_path = root / "keepwell.yaml"
        self.history = root / "history.db"
        self.history_location = str(self.history)  # or a postgresql:// URL
        self.daemons: list[Daemon] = []

    def repository(self, name: str) -> Path:
        path = self.root / "repos" / name
        init_repository(path)
        return path

    def write_config(self, doc: dict[str, Any]) -> Path:
        doc = {"history": self.history_location, "scratch": str(self.root / "scratch"),
               "metrics": {"listen": "127.0.0.1:0"}, **doc}
        self.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return self.config_path

    def daemon(self, *args: str) -> Daemon:
        d = Daemon(self.config_path, self.root / f"daemon-{len(self.daemons)}.log", args)
        self.daemons.append(d)
        return d

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*CLI, *args, "-c", str(self.config_path)], env=env(),
                              capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} failed: {proc.stdout}\n{proc.stderr}")
        return proc

    def runs(self, where: str = "1=1", args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        if self.history_location.startswith("postgresql://"):
            import psycopg
            from psycopg.rows import dict_row

            with psycopg.connect(self.history_location, row_factory=dict_row) as conn:
                try:
                    return list(conn.execute(
                        f"SELECT * FROM runs WHERE {where.replace('?', '%s')} ORDER BY id",
                        args).fetchall())
                except psycopg.errors.UndefinedTable:
                    return []
        if not self.history.exists():
            return []
        db = sqlite3.connect(self.history, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute(
                f"SELECT * FROM runs WHERE {where} ORDER BY id", args).fetchall()]
        except sqlite3.OperationalError:
            return []
        finally:
            db.close()

    def close(self) -> None:
        for d in self.daemons:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The samples of a daemon's ``/metrics``: name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals],
                    key=lambda p: (p[0], p[1]))
    cur = peak = 0
    for _, delta in points:
        cur += delta
        peak = max(peak, cur)
    return peak


class WebhookSink:
    """A real HTTP server that records JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                sink.events.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def of(self, event: str, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event
                and (kind is None or e["kind"] == kind)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def pg_history_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL cluster for job histories: trust for ``postgres``, SCRAM passwords for the
    role ``kwhist`` (so a wrong history_password is really refused)."""
    import pytest

    if not pg_available():
        pytest.skip("PostgreSQL binaries or the postgres user are not available")
    workdir = make_workdir("kw-pghist-")
    cluster = PgCluster(workdir, "hist").initdb(max_connections=60)
    hba = cluster.datadir / "pg_hba.conf"
    text = "host all kwhist 127.0.0.1/32 scram-sha-256\n" + hba.read_text()
    subprocess.run(as_pg_user(["tee", str(hba)]), input=text, text=True, check=True,
                   capture_output=True)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop("immediate")
        stop_all_in(workdir)
        remove_workdir(workdir)
