"""Progress and results as events: the core emits, renderers (text, JSON, metrics) subscribe.

The core never imports a renderer. An event is a name and keyword fields; subscribers must be
quick and thread-safe (events come from worker threads).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Subscriber = Callable[[str, dict[str, Any]], None]


class Events:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> None:
        self._subscribers.append(fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        if fn in self._subscribers:
            self._subscribers.remove(fn)

    def emit(self, name: str, **fields: Any) -> None:
        for fn in self._subscribers:
            fn(name, fields)
