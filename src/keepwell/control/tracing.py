"""Whether job traces are exported, and the exporter (`open_tracing`).

Tracing is on when ``tracing.otlp_endpoint`` is configured or a standard
``OTEL_EXPORTER_OTLP_ENDPOINT``/``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` variable is set. A job's
trace id is derived from the job's id, so a retry, a re-run after a crash or another executor's
run land in the same trace (`keepwell.control.spans` says what a trace holds). When tracing is
off, jobs get `NO_TRACE`, and the OpenTelemetry SDK is never imported (it costs a tenth of a
second at start): the exporter lives in `keepwell.control.otel`, imported by `open_tracing` only
when tracing is on.
"""

from __future__ import annotations

import os

from keepwell.control.config import TracingConfig
from keepwell.control.spans import Tracing
from keepwell.extras import missing_extra

ENV_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def tracing_wanted(cfg: TracingConfig) -> bool:
    return bool(cfg.otlp_endpoint or any(os.environ.get(v) for v in ENV_VARS))


def open_tracing(cfg: TracingConfig) -> Tracing | None:
    """The exporter of job traces, or None when tracing is not configured.

    `MissingExtraError` when it is configured but the ``tracing`` extra is not installed."""
    if not tracing_wanted(cfg):
        return None
    try:
        from keepwell.control.otel import OtlpTracing  # the SDK: only when tracing is on
    except ImportError as exc:
        err = missing_extra(exc, "tracing")
        if err is None:
            raise
        raise err from None
    return OtlpTracing(cfg)
