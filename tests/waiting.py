"""Waiting on an event in tests: poll a condition until it holds, with a deadline that only
fails a test that would otherwise hang (never a measure of speed)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout: float = 60,
             interval: float = 0.02) -> T:
    """The first truthy value of `condition()`; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended: no such process, or a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
