"""The OpenTelemetry exporter of job traces (the ``tracing`` extra), over OTLP/HTTP (protobuf).

Imported only when tracing is on (`keepwell.control.tracing.open_tracing`). One tracer provider
per process, not installed as the global one (keepwell's spans are its own business). Spans are
batched and exported in the background; each attempt's end flushes them, so a job's trace is out
when its run is recorded. The service is ``tracing.service_name`` (default ``keepwell``).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import threading
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import Span, Status, StatusCode

from keepwell.control.config import TracingConfig
from keepwell.control.spans import JobTrace

FLUSH_TIMEOUT_MS = 5000


def _ns(ts: float) -> int:
    return int(ts * 1e9)


class _JobIds(IdGenerator):
    """Random span ids; the trace id of the attempt being started is the job's."""

    def __init__(self) -> None:
        self.pending = threading.local()

    def generate_span_id(self) -> int:
        return random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        wanted = getattr(self.pending, "trace_id", None)
        return wanted if wanted is not None else random.getrandbits(128) or 1


def trace_id_of(job_id: str) -> int:
    """The trace id of a job: every attempt of the job is in this trace."""
    return int.from_bytes(hashlib.blake2b(job_id.encode(), digest_size=16).digest()) or 1


def _endpoint(cfg: TracingConfig) -> str | None:
    """The configured base URL as the OTLP variables give it (``http://host:4318``), with the
    traces path; None leaves the exporter to the ``OTEL_EXPORTER_OTLP_*`` variables."""
    if not cfg.otlp_endpoint:
        return None
    base = cfg.otlp_endpoint.rstrip("/")
    return base if base.endswith("/v1/traces") else base + "/v1/traces"


class _Attempt(JobTrace):
    def __init__(self, tracer: trace.Tracer, provider: TracerProvider, root: Span) -> None:
        self.tracer = tracer
        self.provider = provider
        self.stack = [root]

    def _child(self, name: str, start: float | None, attributes: dict[str, Any]) -> Span:
        ctx = trace.set_span_in_context(self.stack[-1])
        return self.tracer.start_span(name, context=ctx, attributes=attributes,
                                      start_time=_ns(start) if start is not None else None)

    @contextlib.contextmanager
    def phase(self, name: str, **attributes: Any) -> Iterator[None]:
        span = self._child(name, None, attributes)
        self.stack.append(span)
        try:
            yield
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            self.stack.pop()
            span.end()

    def span_at(self, name: str, start: float, end: float, **attributes: Any) -> None:
        self._child(name, start, attributes).end(end_time=_ns(max(start, end)))

    def finish(self, status: str, error: str | None = None, **attributes: Any) -> None:
        root = self.stack[0]
        root.set_attribute("keepwell.status", status)
        for key, value in attributes.items():
            if value is not None:
                root.set_attribute(f"keepwell.{key}", value)
        if status == "succeeded":
            root.set_status(Status(StatusCode.OK))
        else:
            root.set_status(Status(StatusCode.ERROR, error or status))
        root.end()
        self.provider.force_flush(FLUSH_TIMEOUT_MS)


class OtlpTracing:
    """Starts the root span of each job attempt; exports over OTLP/HTTP."""

    def __init__(self, cfg: TracingConfig) -> None:
        self.ids = _JobIds()
        self.provider = TracerProvider(resource=Resource.create({"service.name":
                                                                 cfg.service_name}),
                                       id_generator=self.ids)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
            endpoint=_endpoint(cfg))))
        self.tracer = self.provider.get_tracer("keepwell")

    def start(self, job_id: str, name: str, **attributes: Any) -> JobTrace:
        self.ids.pending.trace_id = trace_id_of(job_id)
        try:
            root = self.tracer.start_span(name, context=trace.set_span_in_context(
                trace.INVALID_SPAN), attributes={"keepwell.job_id": job_id, **{
                    f"keepwell.{k}": v for k, v in attributes.items() if v is not None}})
        finally:
            self.ids.pending.trace_id = None
        return _Attempt(self.tracer, self.provider, root)

    def close(self) -> None:
        self.provider.shutdown()
