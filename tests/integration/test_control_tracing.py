"""Traces of jobs, exported over OTLP/HTTP to a real receiver on loopback that decodes the
protobuf payloads; and no OpenTelemetry import at all when tracing is not configured."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from keepwell.errors import MissingExtraError
from tests.integration.control_support import Workspace, env, write_random

OTEL_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


class OtlpReceiver:
    """A tiny OTLP/HTTP trace receiver: decodes each ExportTraceServiceRequest into spans."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server protocol
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                with receiver.lock:
                    receiver.paths.append(self.path)
                    for rs in request.resource_spans:
                        service = {a.key: a.value.string_value
                                   for a in rs.resource.attributes}.get("service.name")
                        for ss in rs.scope_spans:
                            for span in ss.spans:
                                receiver.spans.append(_span(span, service))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def named(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["name"] == name]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _span(span: Any, service: str | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        attrs[a.key] = getattr(a.value, kind) if kind else None
    return {"name": span.name, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
            "parent": span.parent_span_id.hex() or None, "start": span.start_time_unix_nano,
            "end": span.end_time_unix_nano, "attributes": attrs, "status": span.status.code,
            "service": service}


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workspace]:
    for var in OTEL_VARS:
        monkeypatch.delenv(var, raising=False)
    w = Workspace(tmp_path)
    yield w
    w.close()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


def _files_config(ws: Workspace, **more: Any) -> None:
    repo = ws.repository("r")
    write_random(ws.root / "data" / "a.bin", 256 * 1024)
    write_random(ws.root / "data" / "b.bin", 64 * 1024)
    ws.write_config({
        "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"x": {"kind": "files", "repository": "r", "paths": ["data"],
                          "retention": {"keep_last": 3}}},
        **more,
    })


def test_keepwell_run_exports_the_job_as_a_trace_of_its_phases(
        ws: Workspace, receiver: OtlpReceiver) -> None:
    _files_config(ws, tracing={"otlp_endpoint": receiver.url, "service_name": "kw-test"})
    ws.cli("run", "x", check=True)  # the trace is exported before the command exits
    (run,) = ws.runs("status='succeeded'")

    assert receiver.paths and set(receiver.paths) == {"/v1/traces"}
    (root,) = receiver.named("backup x")
    assert root["parent"] is None and root["service"] == "kw-test"
    assert root["attributes"]["keepwell.job_id"] == run["job_id"]
    assert root["attributes"]["keepwell.attempt"] == 1
    assert root["attributes"]["keepwell.status"] == "succeeded"
    assert root["attributes"]["keepwell.snapshot"] == run["snapshot_id"]
    # the trace id is the job's: every attempt of the job lands in the same trace
    assert root["trace_id"] == hashlib.blake2b(run["job_id"].encode(), digest_size=16).hexdigest()
    by_id = {s["span_id"]: s for s in receiver.spans}
    assert all(s["trace_id"] == root["trace_id"] for s in receiver.spans)

    def children(span: dict[str, Any]) -> list[str]:
        return sorted(s["name"] for s in receiver.spans if s["parent"] == span["span_id"])

    assert children(root) == ["backup files", "open repository", "retention"]
    (backup,) = receiver.named("backup files")
    assert children(backup) == ["index and snapshot", "read", "upload"]
    for s in receiver.spans:  # each child lies within its parent
        if s["parent"] is not None:
            parent = by_id[s["parent"]]
            assert parent["start"] <= s["start"] <= s["end"] <= parent["end"], s["name"]


def test_daemon_retries_are_spans_of_one_trace_with_the_otel_variables(
        ws: Workspace, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """No tracing section: the standard OTEL variable turns it on. A failing job's attempts
    are spans of the job's one trace, each marked failed."""
    _files_config(ws, retries={"attempts": 2, "base": "0.2s", "cap": "0.2s"},
                  circuit_breaker={"failure_threshold": 10})
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("KW_WRONG_PASSWORD", "not-the-password")
    text = ws.config_path.read_text().replace("env:KW_TEST_PASSWORD", "env:KW_WRONG_PASSWORD")
    ws.config_path.write_text(text.replace("paths:", "schedule: '* * * * * *'\n    paths:"))
    d = ws.daemon()
    attempts = d.wait_for(lambda: [s for s in receiver.named("backup x")
                                   if s["attributes"].get("keepwell.attempt") == 2],
                          timeout=30, what="a second attempt's span")
    assert d.stop() == 0
    second = attempts[0]
    job_id = second["attributes"]["keepwell.job_id"]
    same_job = [s for s in receiver.named("backup x")
                if s["attributes"]["keepwell.job_id"] == job_id]
    assert sorted(s["attributes"]["keepwell.attempt"] for s in same_job) == [1, 2]
    assert {s["trace_id"] for s in same_job} == {second["trace_id"]}
    assert all(s["parent"] is None for s in same_job)
    assert all(s["attributes"]["keepwell.status"] == "failed" for s in same_job)
    assert all(s["status"] == 2 for s in same_job)  # STATUS_CODE_ERROR
    assert {s["attributes"]["keepwell.trigger"] for s in same_job} == {"schedule", "retry"}


def test_nothing_of_opentelemetry_is_imported_without_tracing(ws: Workspace) -> None:
    _files_config(ws)
    script = (
        "import sys\n"
        "import keepwell.cli.main as m\n"
        f"sys.argv = ['keepwell', 'run', 'x', '-c', {str(ws.config_path)!r}]\n"
        "try:\n"
        "    m.run()\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "loaded = sorted(n for n in sys.modules if n.startswith('opentelemetry'))\n"
        "print(code, loaded)\n"
    )
    e = env()
    for var in OTEL_VARS:
        e.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", script], env=e, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stdout + proc.stderr
    assert ws.runs("status='succeeded'")


def test_tracing_without_its_extra_is_one_line(ws: Workspace) -> None:
    _files_config(ws, tracing={"otlp_endpoint": "http://127.0.0.1:9"})
    script = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # as if the tracing extra were not installed\n"
        "import keepwell.cli.main as m\n"
        f"sys.argv = ['keepwell', 'run', 'x', '-c', {str(ws.config_path)!r}]\n"
        "m.run()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == MissingExtraError.exit_code, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "pip install 'keepwell[tracing]'" in line
    assert ws.runs() == []
