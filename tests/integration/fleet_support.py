"""The fleet's test harness: a real Temporal dev server (`keepwell fleet server`), a workspace
with repositories and keepwell.yaml, and real ``keepwell worker`` processes.

Waits are on events: a worker's ``worker_started`` log line, the server's port accepting
connections, rows of the job history.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.control_support import PASSWORD, env
from tests.servers import free_port
from tests.waiting import wait_for

MAIN = [sys.executable, "-m", "keepwell.cli.main"]
MiB = 1024 * 1024


class Fleet:
    """A Temporal dev server, a workspace with repositories and keepwell.yaml, its workers."""

    def __init__(self, root: Path, server_log: Path, address: str) -> None:
        self.root = root
        self.address = address
        self.server_log = server_log
        self.config = root / "keepwell.yaml"
        self.history = root / "history.db"
        self.workers: list[tuple[subprocess.Popen[bytes], Path]] = []
        (root / "pw").write_text(PASSWORD)

    def env(self) -> dict[str, str]:
        e = env()
        e["KEEPWELL_FLEET_ADDRESS"] = self.address
        return e

    def write_config(self, doc: dict[str, Any]) -> None:
        doc = {"history": str(self.history), "scratch": str(self.root / "scratch"),
               "metrics": {"listen": None},
               "fleet": {"namespace": "default", "heartbeat_timeout": "2s"},
               "retries": {"attempts": 3, "base": "1s", "cap": "2s"}, **doc}
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False))

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*MAIN, *args], env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def worker(self, site: str, config: Path | None = None,
               max_jobs: int | None = 1) -> subprocess.Popen[bytes]:
        """A worker of ``site`` reading ``config`` (the fleet's file by default), running
        ``max_jobs`` jobs at once (None: the configuration's ``limits.max_concurrent_jobs``)."""
        log = self.root / f"worker-{len(self.workers)}-{site}.log"
        jobs = ["--max-jobs", str(max_jobs)] if max_jobs else []
        with open(log, "wb") as out:
            proc = subprocess.Popen([*MAIN, "worker", "-c", str(config or self.config), "--site", site,
                                     *jobs, "--log-json"],
                                    stdout=out, stderr=out, env=self.env())
        self.workers.append((proc, log))

        def started() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited {proc.returncode}: {log.read_text()}")
            return '"worker_started"' in log.read_text(errors="replace")

        wait_for(started, f"worker of site {site}")
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        """What a worker has logged so far."""
        return next(log for p, log in self.workers if p is proc).read_text(errors="replace")

    def runs(self) -> list[dict[str, Any]]:
        import sqlite3

        if not self.history.exists():
            return []
        db = sqlite3.connect(self.history, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM runs ORDER BY id")]
        except sqlite3.OperationalError:
            return []
        finally:
            db.close()

    def stop_workers(self) -> None:
        for proc, _ in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        self.workers.clear()


def start_server(root: Path, ports: tuple[int, int, int]) -> subprocess.Popen[bytes]:
    """``keepwell fleet server`` on the given gRPC, HTTP and metrics ports, its state in
    ``root/temporal.db``; returns once the gRPC port accepts connections."""
    port, http, metrics = ports
    log = root / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([*MAIN, "fleet", "server", "--listen", f"127.0.0.1:{port}",
                                 "--db", str(root / "temporal.db"), "--http-port", str(http),
                                 "--metrics-port", str(metrics)],
                                stdout=out, stderr=out, env=env())

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"temporal server exited: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    wait_for(ready, "the temporal server")
    return proc


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("temporal")
    ports = (free_port(), free_port(), free_port())
    proc = start_server(root, ports)
    yield f"127.0.0.1:{ports[0]}", root / "server.log"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture
def fleet(server: tuple[str, Path], tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path, server[1], server[0])
    yield f
    f.stop_workers()


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def restore(fleet: Fleet, repo: Path, snapshot: str, data: Path) -> dict[str, str]:
    target = fleet.root / f"restored-{snapshot[:8]}"
    proc = fleet.cli("-r", str(repo), "--password-file", str(fleet.root / "pw"), "restore",
                     snapshot, "--target", str(target))
    assert proc.returncode == 0, proc.stderr
    return tree(target / data.relative_to("/"))


def snapshots(fleet: Fleet, repo: Path) -> list[dict[str, Any]]:
    proc = fleet.cli("-r", str(repo), "--password-file", str(fleet.root / "pw"), "snapshots",
                     "--json")
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def budget_leases(fleet: Fleet, workflow_id: str) -> list[dict[str, Any]]:
    """The holders of a budget workflow's leases (its ``leases`` query)."""
    from keepwell.fleet.target import temporal_binary

    proc = subprocess.run([temporal_binary(), "workflow", "query", "--address", fleet.address,
                           "-w", workflow_id, "--name", "leases", "-o", "json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    held = json.loads(proc.stdout)["queryResult"][0]  # the CLI shows an empty list as null
    return list(held or [])
