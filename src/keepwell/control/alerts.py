"""Alerts: notice what is wrong, notify once, and show it until it is resolved.

Kinds of alert (one per source and kind, keyed ``SOURCE:KIND``):

* ``anomaly_size``, ``anomaly_changed``, ``anomaly_duration``: a backup whose logical size,
  changed bytes or duration is far from that source's own history. With the median ``m`` and the
  median absolute deviation ``MAD`` (scaled by 1.4826 to estimate a standard deviation) of the
  last ``window`` successful backups, a value ``x`` is abnormal when
  ``|x - m| > threshold * MAD`` **and** ``|x - m|`` exceeds both ``min_relative_change * m`` and
  an absolute floor (``min_bytes_change`` or ``min_duration_change``); nothing is judged before
  ``min_history`` backups exist. Robust statistics: one earlier outlier does not move the
  baseline, and the floors keep a very steady history from flagging tiny changes.
* ``stale``: no successful backup within the expected window (``expect_success_within``, or
  ``stale_factor`` times the schedule's interval).
* ``log_lag``: a streamed WAL/binlog lag, or a continuous files source's wait for a snapshot,
  above its ``lag_alert`` and still growing.
* ``stream_down``: a streamer with a ``lag_alert`` has kept exiting (or cannot start) for longer
  than that ``lag_alert``.
* ``drill_failed``: the newest restore drill failed.
* ``circuit_open``: the source kept failing and is paused.

An alert notifies when it becomes active (not again while it stays active) and once more when
it resolves.
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from keepwell.control.config import AlertPolicy, Notification
from keepwell.control.history import History, Run
from keepwell.control.logs import LOGGER_NAME, log_event
from keepwell.control.notify import Delivery, send_all

MAD_SCALE = 1.4826


@dataclass(frozen=True)
class Verdict:
    abnormal: bool
    median: float | None
    mad: float | None
    reason: str


def judge(history: list[float], value: float, policy: AlertPolicy,
          min_change: float = 0.0) -> Verdict:
    """Is ``value`` far outside ``history`` (older values)?

    ``min_change`` is an absolute floor in the value's unit: smaller deviations never count.
    """
    if len(history) < policy.min_history:
        return Verdict(False, None, None, f"only {len(history)} earlier backups")
    med = statistics.median(history)
    mad = statistics.median(abs(v - med) for v in history) * MAD_SCALE
    dev = abs(value - med)
    floor = max(policy.min_relative_change * abs(med), min_change)
    abnormal = dev > policy.threshold * mad and dev > floor
    return Verdict(abnormal, med, mad, f"{value:.6g} vs median {med:.6g} (MAD {mad:.3g})")


def _changed(run: Run) -> float | None:
    added = run.details.get("bytes_added")
    if isinstance(added, int | float):
        return float(added)
    return float(run.bytes_stored) if run.bytes_stored is not None else None


_MEASURES = {
    "anomaly_size": ("size", "bytes",
                     lambda r: float(r.bytes_read) if r.bytes_read is not None else None),
    "anomaly_changed": ("changed bytes", "bytes", _changed),
    "anomaly_duration": ("duration", "seconds", lambda r: r.duration),
}


class Outbox:
    """Sends notifications on a thread of its own, in order, so that a channel that hangs until
    its timeout never holds up the daemon's scheduling loop or a job."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="notifications", daemon=True)
        self._thread.start()

    def put(self, send: Callable[[], None]) -> None:
        self._queue.put(send)

    def _run(self) -> None:
        while (send := self._queue.get()) is not None:
            try:
                send()
            except Exception as exc:  # the history closed under it at shutdown, or a bug
                log_event(logging.getLogger(LOGGER_NAME), "notification_failed",
                          level=logging.WARNING, error=f"{type(exc).__name__}: {exc}")

    def close(self, wait: float) -> None:
        """Send what is queued, for up to ``wait`` seconds."""
        self._queue.put(None)
        self._thread.join(wait)


class Alerts:
    """Raises and resolves alerts in the history and sends their notifications."""

    def __init__(self, history: History, policy: AlertPolicy,
                 channels: list[Notification], log: logging.Logger | None = None,
                 outbox: Outbox | None = None) -> None:
        self.history = history
        self.policy = policy
        self.channels = channels
        self.log = log or logging.getLogger(LOGGER_NAME)
        self.outbox = outbox
        self.deliveries: deque[Delivery] = deque(maxlen=100)  # the latest, newest last

    def _notify(self, event: dict[str, Any]) -> None:
        """Send to every channel (through the outbox, if any: a slow channel then holds up no
        caller); a failed delivery is a line of the log (and stops nothing)."""
        if self.outbox is not None:
            self.outbox.put(lambda: self._send(event))
        else:
            self._send(event)

    def _send(self, event: dict[str, Any]) -> None:
        for delivery in send_all(self.channels, event):
            self.deliveries.append(delivery)
            if not delivery.ok:
                log_event(self.log, "notification_failed", level=logging.WARNING,
                          channel=delivery.channel, key=event["key"], event_kind=event["event"],
                          error=delivery.error)
        if event["event"] == "alert":
            self.history.mark_notified(event["key"])

    def fire(self, source: str, kind: str, message: str) -> bool:
        key = f"{source}:{kind}"
        if not self.history.raise_alert(key, source, kind, message):
            return False
        event = {"event": "alert", "key": key, "source": source, "kind": kind,
                 "message": message, "time": time.time()}
        self._notify(event)
        return True

    def clear(self, source: str, kind: str) -> bool:
        key = f"{source}:{kind}"
        if not self.history.resolve_alert(key):
            return False
        event = {"event": "resolved", "key": key, "source": source, "kind": kind,
                 "message": f"{kind} on {source} resolved", "time": time.time()}
        self._notify(event)
        return True

    def after_backup(self, source: str) -> list[str]:
        """Judge the newest successful backup of ``source`` against the ones before it."""
        runs = self.history.successes(source, "backup", limit=self.policy.window + 1)
        if not runs:
            return []
        newest, older = runs[0], runs[1:]
        fired = []
        for kind, (label, unit, measure) in _MEASURES.items():
            floor = (self.policy.min_bytes_change if unit == "bytes"
                     else self.policy.min_duration_change)
            value = measure(newest)
            past = [v for v in (measure(r) for r in older) if v is not None]
            if value is None:
                continue
            verdict = judge(past, value, self.policy, floor)
            if verdict.abnormal:
                if self.fire(source, kind, f"backup {label} of {source} is abnormal: "
                                           f"{verdict.reason}"):
                    fired.append(kind)
            else:
                self.clear(source, kind)
        return fired

    def after_drill(self, source: str, ok: bool, error: str | None) -> None:
        if ok:
            self.clear(source, "drill_failed")
        else:
            self.fire(source, "drill_failed", f"restore drill of {source} failed: {error}")

    def check_stale(self, source: str, window: float, since: float, now: float) -> None:
        """``since``: when watching began (a source never backed up is judged from then)."""
        last = self.history.last_run(source, "backup", "succeeded")
        reference = last.ended_at if last is not None and last.ended_at else since
        if now - reference > window:
            age = "never" if last is None else f"{now - reference:.0f}s ago"
            self.fire(source, "stale", f"no successful backup of {source} within "
                                       f"{window:.0f}s (last: {age})")
        else:
            self.clear(source, "stale")

    def check_down(self, source: str, seconds: float, limit: float, code: int | str) -> None:
        """A streamer exited; it has been failing for ``seconds`` (0 at a first exit)."""
        if seconds >= limit:
            self.fire(source, "stream_down", f"the streamer of {source} has kept exiting for "
                                             f"{seconds:.0f}s (last exit: {code})")

    def stream_up(self, source: str) -> None:
        self.clear(source, "stream_down")

    def check_lag(self, source: str, samples: list[float], limit: float) -> None:
        if not samples:
            return
        growing = len(samples) >= 3 and samples[-1] > samples[-2] > samples[-3]
        if samples[-1] > limit and growing:
            self.fire(source, "log_lag", f"streaming lag of {source} is "
                                         f"{samples[-1]:.0f}s and growing")
        elif samples[-1] <= limit:
            self.clear(source, "log_lag")
