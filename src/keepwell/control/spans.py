"""Spans of a job attempt, as the job records them; exported or not (`keepwell.control.tracing`).

Words: a job is one *trace*; each *attempt* is a root span of it; its *phases* are child spans.
A phase is either timed around a step (`JobTrace.phase`: opening the repository, the source's
backup, retention, the replica) or placed afterwards from the times the job's events already
carry (`JobTrace.span_at`, with `PhaseClock`: reading, uploading, the index and the snapshot), so
no per-chunk code is instrumented. `NO_TRACE` records nothing: what a job gets when tracing is
off.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, Protocol


class JobTrace:
    """The spans of one job attempt; this base records nothing (tracing off)."""

    @contextlib.contextmanager
    def phase(self, name: str, **attributes: Any) -> Iterator[None]:
        """A child span of the current phase around the enclosed step."""
        yield

    def span_at(self, name: str, start: float, end: float, **attributes: Any) -> None:
        """A child span of the current phase from ``start`` to ``end`` (Unix times)."""

    def finish(self, status: str, error: str | None = None, **attributes: Any) -> None:
        """End the attempt's span with the job's outcome."""


NO_TRACE = JobTrace()


class Tracing(Protocol):
    """An exporter of job traces (`keepwell.control.otel.OtlpTracing`)."""

    def start(self, job_id: str, name: str, **attributes: Any) -> JobTrace: ...

    def close(self) -> None:
        """Export what is pending and stop."""
        ...


READ_EVENTS = frozenset({"bytes", "file", "files", "sqlite_copy"})


class PhaseClock:
    """Times of the phases of a backup, taken from the repository's events as they pass (one
    clock reading per event; the events are already there for progress)."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def on_event(self, name: str, fields: dict[str, Any]) -> None:
        phase = ("read" if name in READ_EVENTS else "upload" if name == "pack_stored"
                 else "snapshot" if name == "snapshot_saved" else None)
        if phase is None:
            return
        now = time.time()
        self.first.setdefault(phase, now)
        self.last[phase] = now
        self.counts[phase] = self.counts.get(phase, 0) + 1

    def place(self, job_trace: JobTrace, upload_started: float | None,
              upload_ended: float | None) -> None:
        """Record the phases seen as spans of ``job_trace``'s current phase: ``read`` (the
        walk, reading, chunking, compressing and encrypting run together in one pipeline),
        ``upload`` (the first pack upload's start to the last one's end, worker processes'
        included), and ``index and snapshot`` (from the last data to the snapshot's commit:
        the last packs, the index, the snapshot)."""
        if "read" in self.first:
            job_trace.span_at("read", self.first["read"], self.last["read"],
                              events=self.counts["read"])
        if upload_started is not None:
            job_trace.span_at("upload", upload_started, upload_ended or upload_started,
                              packs=self.counts.get("upload", 0))
        elif "upload" in self.first:
            job_trace.span_at("upload", self.first["upload"], self.last["upload"],
                              packs=self.counts["upload"])
        if "snapshot" in self.first:
            done = self.last["snapshot"]
            data = [t for t in (self.last.get("read"), self.last.get("upload"), upload_ended)
                    if t is not None and t <= done]
            job_trace.span_at("index and snapshot", max(data, default=done), done)
