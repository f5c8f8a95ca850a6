"""Notifications: tell people about alerts, by webhook or by command.

An *event* is a JSON object (``event``, ``source``, ``kind``, ``message``, ``time``, ``key``).
A webhook receives it as the body of an HTTP POST (``Content-Type: application/json``); a command
receives it on standard input and as ``KEEPWELL_EVENT``, ``KEEPWELL_SOURCE``,
``KEEPWELL_ALERT_KIND`` and ``KEEPWELL_MESSAGE`` in its environment. A failed delivery is
reported in the result, never raised: one broken channel must not stop the others.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from keepwell.control.config import Notification
from keepwell.control.secrets import resolve
from keepwell.errors import KeepwellError


@dataclass(frozen=True)
class Delivery:
    channel: str
    ok: bool
    error: str | None = None


def _webhook_url(channel: Notification) -> str:
    url = channel.webhook or ""
    if url.startswith(("env:", "file:")):
        return resolve(url, what="webhook URL")
    return url


def _describe(channel: Notification) -> str:
    if channel.webhook is not None:
        if channel.webhook.startswith(("env:", "file:")):
            return "webhook " + channel.webhook
        # a webhook's path and query often are its secret (Slack, Teams...): the server only
        parts = urllib.parse.urlsplit(channel.webhook)
        return f"webhook {parts.scheme}://{parts.netloc.rpartition('@')[2]}/..."
    return "command " + " ".join((channel.command or [])[:1])


def _run_command(argv: list[str], body: bytes, env: dict[str, str],
                 timeout: float) -> tuple[int, bytes]:
    """Run a notification command in a session of its own: past its timeout it is killed with
    everything it started (a script's children would outlive it otherwise)."""
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env, start_new_session=True) as proc:
        try:
            _, stderr = proc.communicate(body, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet: still its group's id
            proc.wait()
            raise
    return proc.returncode, stderr


def send(channel: Notification, event: dict[str, Any]) -> Delivery:
    body = json.dumps(event, default=str).encode()
    name = _describe(channel)
    try:
        if channel.webhook is not None:
            req = urllib.request.Request(
                _webhook_url(channel), data=body, method="POST",
                headers={"Content-Type": "application/json", "User-Agent": "keepwell"},
            )
            with urllib.request.urlopen(req, timeout=channel.timeout) as resp:
                resp.read()
        else:
            env = dict(os.environ)
            env.update({
                "KEEPWELL_EVENT": str(event.get("event", "")),
                "KEEPWELL_SOURCE": str(event.get("source", "")),
                "KEEPWELL_ALERT_KIND": str(event.get("kind", "")),
                "KEEPWELL_MESSAGE": str(event.get("message", "")),
            })
            returncode, stderr = _run_command(list(channel.command or []), body, env,
                                              channel.timeout)
            if returncode != 0:
                tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
                return Delivery(name, False, f"exit {returncode}: {tail[0]}")
    except (OSError, urllib.error.URLError, subprocess.TimeoutExpired, KeepwellError) as exc:
        return Delivery(name, False, str(exc))
    return Delivery(name, True)


def send_all(channels: list[Notification], event: dict[str, Any]) -> list[Delivery]:
    return [send(c, event) for c in channels]
