"""Structured logs for the daemon: one event per line, as text or JSON.

Code logs an event name with fields (``log_event(log, "job_finished", source=..., ...)``); the
formatter renders ``time level event key=value ...`` or, with ``log_json``, one JSON object per
line with the same keys, ready for a log shipper.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOGGER_NAME = "keepwell.control"
# other loggers whose lines belong in the daemon's log: the adaptive uploads' decisions
ALSO_LOGGED = ("keepwell.backends.adaptive",)


def log_event(log: logging.Logger, event: str, *, level: int = logging.INFO,
              **fields: Any) -> None:
    log.log(level, event, extra={"kw_fields": fields})


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = getattr(record, "kw_fields", {})
        parts = [f"{stamp}Z", record.levelname.lower(), record.getMessage()]
        parts += [f"{k}={v}" for k, v in fields.items() if v is not None]
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        doc.update(getattr(record, "kw_fields", {}))
        return json.dumps(doc, default=str)


def setup(*, json_lines: bool, level: int = logging.INFO) -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    for name in (LOGGER_NAME, *ALSO_LOGGED):
        other = logging.getLogger(name)
        other.handlers.clear()
        other.addHandler(handler)
        other.setLevel(level)
        other.propagate = False
    return logging.getLogger(LOGGER_NAME)
