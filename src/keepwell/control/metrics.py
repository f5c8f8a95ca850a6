"""Prometheus metrics and the daemon's small HTTP endpoint (``/metrics``, ``/healthz``).

Figures are collected at scrape time from the job history and the daemon's live state, so they
are never stale and cost nothing between scrapes. Names follow Prometheus conventions (base
units: seconds and bytes; ``_total`` for counters); the list is in docs/control.md.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from keepwell.backends.adaptive import live_controllers
from keepwell.control.history import History
from keepwell.control.pitr import WindowCache
from keepwell.errors import ConfigurationError, KeepwellError

BREAKER_STATES = ("closed", "open", "half-open")


@dataclass
class StreamFigures:
    up: bool = False
    restarts: int = 0
    lag_seconds: float | None = None
    spool_depth: float | None = None


@dataclass
class LiveFigures:
    queue_length: int = 0
    running: int = 0
    upload_bytes: int = 0
    upload_limit: float | None = None
    breakers: dict[str, str] = field(default_factory=dict)
    next_runs: dict[str, float] = field(default_factory=dict)
    streams: dict[str, StreamFigures] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    reloads: dict[str, int] = field(default_factory=dict)  # result (ok, refused) -> count
    last_reload: float | None = None


class KeepwellCollector:
    def __init__(self, history: History, sources: list[str],
                 live: Callable[[], LiveFigures], pitr: WindowCache | None = None) -> None:
        self.history = history
        self.sources = sources
        self.live = live
        self.pitr = pitr

    def _pitr(self) -> Iterator[Metric]:
        g = GaugeMetricFamily
        start = g("keepwell_pitr_window_start_timestamp_seconds",
                  "Oldest point a point-in-time restore can reach", labels=["source"])
        end = g("keepwell_pitr_window_end_timestamp_seconds",
                "Newest point a point-in-time restore can reach", labels=["source"])
        span = g("keepwell_pitr_window_seconds", "Length of the point-in-time-restore window",
                 labels=["source"])
        if self.pitr is not None:
            try:
                found = self.pitr.get()
            except KeepwellError:
                found = {}
            for source, win in sorted(found.items()):
                if win.start is not None and win.end is not None:
                    start.add_metric([source], win.start)
                    end.add_metric([source], win.end)
                    span.add_metric([source], win.seconds or 0.0)
        yield from (start, end, span)

    def collect(self) -> Iterator[Metric]:
        live = self.live()
        g = GaugeMetricFamily
        last_ok = g("keepwell_backup_last_success_timestamp_seconds",
                    "Unix time of the end of the last successful backup", labels=["source"])
        dur = g("keepwell_backup_last_duration_seconds",
                "Duration of the last successful backup", labels=["source"])
        read = g("keepwell_backup_last_read_bytes",
                 "Logical bytes of the source in the last successful backup", labels=["source"])
        stored = g("keepwell_backup_last_stored_bytes",
                   "Bytes the last successful backup added to the repository", labels=["source"])
        dedup = g("keepwell_backup_last_dedup_ratio",
                  "Fraction of the last backup's bytes already in the repository (0..1)",
                  labels=["source"])
        nxt = g("keepwell_backup_next_run_timestamp_seconds",
                "Unix time of the next scheduled backup", labels=["source"])
        drill_ok = g("keepwell_drill_last_success_timestamp_seconds",
                     "Unix time of the last successful restore drill", labels=["source"])
        rto = g("keepwell_drill_last_rto_seconds", "Restore time of the last drill",
                labels=["source"])
        rpo = g("keepwell_drill_last_rpo_seconds",
                "Age of the newest restorable point at the last drill", labels=["source"])
        drill_failed = g("keepwell_drill_last_failed",
                         "1 if the last restore drill failed", labels=["source"])
        for source in self.sources:
            run = self.history.last_run(source, "backup", "succeeded")
            if run is not None and run.ended_at is not None:
                last_ok.add_metric([source], run.ended_at)
                dur.add_metric([source], run.duration or 0.0)
                read.add_metric([source], float(run.bytes_read or 0))
                stored.add_metric([source], float(run.bytes_stored or 0))
                if run.dedup_ratio is not None:
                    dedup.add_metric([source], run.dedup_ratio)
            if source in live.next_runs:
                nxt.add_metric([source], live.next_runs[source])
            drill = self.history.last_run(source, "drill")
            if drill is not None and drill.status in ("succeeded", "failed", "timeout"):
                drill_failed.add_metric([source], 0.0 if drill.status == "succeeded" else 1.0)
                if drill.status == "succeeded":
                    rto.add_metric([source], drill.rto or 0.0)
                    rpo.add_metric([source], drill.rpo or 0.0)
            good = self.history.last_run(source, "drill", "succeeded")
            if good is not None and good.ended_at is not None:
                drill_ok.add_metric([source], good.ended_at)
        yield from (last_ok, dur, read, stored, dedup, nxt, drill_ok, rto, rpo, drill_failed)

        runs = CounterMetricFamily("keepwell_job_runs", "Job runs by source, action and status",
                                   labels=["source", "action", "status"])
        failures = CounterMetricFamily("keepwell_job_failures", "Failed job runs",
                                       labels=["source", "action"])
        fail_counts: dict[tuple[str, str], int] = {}
        for (source, action, status), n in sorted(self.history.count_by_status().items()):
            if status == "running":
                continue
            runs.add_metric([source, action, status], n)
            if status in ("failed", "timeout"):
                fail_counts[(source, action)] = fail_counts.get((source, action), 0) + n
        for (source, action), n in sorted(fail_counts.items()):
            failures.add_metric([source, action], n)
        yield runs
        yield failures

        yield g("keepwell_queue_jobs", "Jobs due and waiting for a slot",
                value=live.queue_length)
        yield g("keepwell_running_jobs", "Jobs running now", value=live.running)
        yield CounterMetricFamily("keepwell_upload_bytes", "Bytes uploaded by jobs of this "
                                  "daemon", value=live.upload_bytes)
        if live.upload_limit:
            yield g("keepwell_upload_limit_bytes_per_second",
                    "The shared upload budget", value=live.upload_limit)
        yield from _adaptive()
        breaker = g("keepwell_circuit_breaker_state", "1 for the breaker's current state",
                    labels=["source", "state"])
        for source, state in sorted(live.breakers.items()):
            for s in BREAKER_STATES:
                breaker.add_metric([source, s], 1.0 if s == state else 0.0)
        yield breaker

        up = g("keepwell_stream_up", "1 while the log streamer runs", labels=["source"])
        restarts = CounterMetricFamily("keepwell_stream_restarts",
                                       "Restarts of the log streamer", labels=["source"])
        lag = g("keepwell_stream_lag_seconds", "Archive lag reported by the log streamer",
                labels=["source"])
        spool = g("keepwell_stream_spool_depth", "Files waiting in the streamer's spool",
                  labels=["source"])
        for source, fig in sorted(live.streams.items()):
            up.add_metric([source], 1.0 if fig.up else 0.0)
            restarts.add_metric([source], fig.restarts)
            if fig.lag_seconds is not None:
                lag.add_metric([source], fig.lag_seconds)
            if fig.spool_depth is not None:
                spool.add_metric([source], fig.spool_depth)
        yield from (up, restarts, lag, spool)

        alerts = g("keepwell_alert_active", "1 for each active alert", labels=["source", "kind"])
        for alert in self.history.alerts():
            alerts.add_metric([alert.source, alert.kind], 1.0)
        yield alerts
        yield from self._pitr()
        yield g("keepwell_daemon_start_timestamp_seconds", "Unix time the daemon started",
                value=live.started_at)
        reloads = CounterMetricFamily("keepwell_config_reloads",
                                      "Reloads of the configuration, applied or refused",
                                      labels=["result"])
        for result in ("ok", "refused"):
            reloads.add_metric([result], live.reloads.get(result, 0))
        yield reloads
        if live.last_reload is not None:
            yield g("keepwell_config_last_reload_success_timestamp_seconds",
                    "Unix time of the last applied reload", value=live.last_reload)


def _adaptive() -> Iterator[Metric]:
    """How many uploads at once and at which pacing rate the running jobs of this process send
    to each remote repository (keepwell.backends.adaptive); jobs run in a process of their own
    (hard limits) are not seen here."""
    g = GaugeMetricFamily
    limit = g("keepwell_upload_concurrency", "Uploads allowed at once, as adapted to the link",
              labels=["repository"])
    rate = g("keepwell_upload_pacing_rate_bytes_per_second",
             "Pacing rate of uploads learned from the link (absent: unlimited)",
             labels=["repository"])
    seen: dict[str, tuple[int, float | None]] = {}
    for c in live_controllers():
        prev = seen.get(c.name)  # two jobs to one repository: the lower figures
        now = (c.limit, c.rate)
        if prev is not None:
            now = (min(prev[0], now[0]), min((r for r in (prev[1], now[1]) if r is not None),
                                             default=None))
        seen[c.name] = now
    for name, (n, r) in sorted(seen.items()):
        limit.add_metric([name], n)
        if r is not None:
            rate.add_metric([name], r)
    yield from (limit, rate)


class MetricsServer:
    """Serves ``/metrics`` and ``/healthz`` on a background thread."""

    def __init__(self, listen: str, collector: KeepwellCollector,
                 health: Callable[[], dict[str, Any]]) -> None:
        host, _, port = listen.rpartition(":")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)  # type: ignore[arg-type]
        registry, health_fn = self.registry, health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server protocol
                path = self.path.split("?")[0]
                if path == "/metrics":
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif path == "/healthz":
                    state = health_fn()
                    body = json.dumps(state).encode()
                    ctype, code = "application/json", 200 if state.get("ok") else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        try:
            self.httpd = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
        except OSError as exc:
            raise ConfigurationError(f"metrics: cannot listen on {listen}: "
                                     f"{exc.strerror or exc}",
                                     hint="choose another metrics.listen address") from None
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics",
                                       daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
