"""Robust anomaly judgement, alert de-duplication and notifications (real HTTP, real command)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from keepwell.control.alerts import Alerts, judge
from keepwell.control.config import AlertPolicy, Notification
from keepwell.control.history import History
from tests.waiting import gone, wait_for

POLICY = AlertPolicy(min_history=5, threshold=5.0, min_relative_change=0.5)


def test_normal_variation_is_not_an_anomaly() -> None:
    history = [100.0, 104.0, 97.0, 110.0, 95.0, 102.0, 99.0]
    for value in (92.0, 101.0, 112.0):
        assert not judge(history, value, POLICY).abnormal


def test_far_outside_is_an_anomaly_even_with_an_old_outlier() -> None:
    history = [100.0, 104.0, 97.0, 2000.0, 95.0, 102.0, 99.0]
    assert judge(history, 900.0, POLICY).abnormal
    assert judge(history, 5.0, POLICY).abnormal
    assert not judge(history, 130.0, POLICY).abnormal


def test_minimum_history_and_floors() -> None:
    assert not judge([1.0, 1.0, 1.0], 1000.0, POLICY).abnormal
    steady = [1000.0] * 8
    assert not judge(steady, 1400.0, POLICY).abnormal  # under the relative floor
    assert judge(steady, 1600.0, POLICY).abnormal
    assert not judge(steady, 1600.0, POLICY, min_change=10_000).abnormal


class _Sink:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        sink = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers["Content-Length"])
                sink.bodies.append(json.loads(self.rfile.read(n)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/x"


def test_an_alert_notifies_once_until_it_resolves(tmp_path: Path) -> None:
    sink = _Sink()
    out = tmp_path / "cmd.jsonl"
    cmd = [sys.executable, "-c",
           f"import sys,os; open({str(out)!r},'a').write(os.environ['KEEPWELL_ALERT_KIND'] + "
           "' ' + sys.stdin.read() + '\\n')"]
    history = History(str(tmp_path / "h.db"))
    alerts = Alerts(history, POLICY, [Notification(webhook=sink.url), Notification(command=cmd)])
    try:
        assert alerts.fire("db", "stale", "no backup for 2 days")
        assert not alerts.fire("db", "stale", "no backup for 3 days")
        assert [a.message for a in history.alerts()] == ["no backup for 3 days"]
        assert alerts.clear("db", "stale")
        assert not alerts.clear("db", "stale")
        assert alerts.fire("db", "stale", "again")
    finally:
        sink.httpd.shutdown()
        history.close()
    assert [(b["event"], b["kind"]) for b in sink.bodies] == [
        ("alert", "stale"), ("resolved", "stale"), ("alert", "stale")]
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("stale {")
    assert all(d.ok for d in alerts.deliveries)


def test_a_broken_channel_is_reported_not_raised(tmp_path: Path) -> None:
    history = History(str(tmp_path / "h.db"))
    alerts = Alerts(history, POLICY, [Notification(webhook="http://127.0.0.1:9/none"),
                                      Notification(command=[sys.executable, "-c", "exit(4)"])])
    try:
        assert alerts.fire("x", "drill_failed", "boom")
    finally:
        history.close()
    assert [d.ok for d in alerts.deliveries] == [False, False]
    assert "exit 4" in (alerts.deliveries[1].error or "")


def test_a_streamer_down_longer_than_its_lag_alert(tmp_path: Path) -> None:
    history = History(str(tmp_path / "h.db"))
    alerts = Alerts(history, POLICY, [])
    try:
        alerts.check_down("live", 0.0, 60.0, 10)  # a first exit
        alerts.check_down("live", 59.9, 60.0, 10)
        assert not history.alerts()
        alerts.check_down("live", 61.0, 60.0, 10)
        (active,) = history.alerts()
        assert active.kind == "stream_down" and "exit: 10" in active.message
        alerts.stream_up("live")
        assert not history.alerts()
    finally:
        history.close()


def test_a_notification_command_past_its_timeout_is_killed_with_its_children(
        tmp_path: Path) -> None:
    from keepwell.control.notify import send

    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
              "time.sleep(60)\n")
    delivery = send(Notification(command=[sys.executable, "-c", script], timeout=2.0),
                    {"event": "alert"})
    assert not delivery.ok and "timed out" in (delivery.error or "")
    child = int(pid_file.read_text())
    try:
        wait_for(lambda: gone(child), "the notification command's child to be killed with it",
                 timeout=5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
