"""Notifications: tell people about alerts, by webhook or by command.

An *event* is a JSON object (``event``, ``source``, ``kind``, ``message``, ``time``, ``key``).
A webhook receives it as the body of an HTTP POST (``Content-Type: application/json``); a command
receives it on standard input and as ``KEEPWELL_EVENT``, ``KEEPWELL_SOURCE``,
``KEEPWELL_ALERT_KIND`` and ``KEEPWELL_MESSAGE`` in its environment. A failed delivery is
reported in the result, never raised: one broken channel must not stop the others.
"""

from __future__ import annotations

import json
import os
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
            proc = subprocess.run(list(channel.command or []), input=body, env=env,
                                  capture_output=True, timeout=channel.timeout, check=False)
            if proc.returncode != 0:
                tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
                return Delivery(name, False, f"exit {proc.returncode}: {tail[0]}")
    except (OSError, urllib.error.URLError, subprocess.TimeoutExpired, KeepwellError) as exc:
        return Delivery(name, False, str(exc))
    return Delivery(name, True)


def send_all(channels: list[Notification], event: dict[str, Any]) -> list[Delivery]:
    return [send(c, event) for c in channels]
