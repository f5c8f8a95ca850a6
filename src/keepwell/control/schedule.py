"""Schedules: cron expressions evaluated in a time zone.

A schedule is a cron expression with five fields (minute hour day month weekday), or six with a
leading seconds field (for short test schedules), or one of the aliases ``@hourly``, ``@daily``,
``@weekly``, ``@monthly``, ``@yearly``. Evaluation follows Debian cron, including its behaviour
at daylight-saving changes (the ``cronsim`` library).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

ALIASES = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}


@dataclass(frozen=True)
class Schedule:
    expression: str
    timezone: str = "UTC"

    @staticmethod
    def parse(expression: str) -> str:
        """Return the canonical cron text of ``expression`` or raise ValueError."""
        expr = ALIASES.get(expression.strip().lower(), expression.strip())
        if len(expr.split()) not in (5, 6):
            raise ValueError(
                f"{expression!r} is not a cron expression: give 5 fields "
                "(minute hour day month weekday), 6 with leading seconds, or @daily/@hourly"
            )
        try:
            CronSim(expr, datetime(2024, 1, 1))
        except CronSimError as exc:
            raise ValueError(f"bad cron expression {expression!r}: {exc}") from None
        return expr

    @staticmethod
    def zone(name: str) -> ZoneInfo:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {name!r} (use an IANA name such as "
                             "Europe/Berlin or UTC)") from None

    def next_after(self, when: datetime) -> datetime:
        """The first firing strictly after ``when`` (aware), as an aware UTC datetime."""
        tz = self.zone(self.timezone)
        local = when.astimezone(tz)
        it = CronSim(self.parse(self.expression), local)
        return next(it).astimezone(UTC)

    def next_after_ts(self, ts: float) -> float:
        return self.next_after(datetime.fromtimestamp(ts, UTC)).timestamp()

    def typical_interval(self, around: float) -> float:
        """Seconds between two firings near ``around`` (used for the staleness window)."""
        a = self.next_after_ts(around)
        b = self.next_after_ts(a)
        return max(b - a, 1.0)

    def explain(self) -> str:
        try:
            text = CronSim(self.parse(self.expression), datetime(2024, 1, 1)).explain()
        except Exception:  # explain() is best effort for odd expressions
            text = self.expression
        return f"{text} ({self.timezone})"


def utcnow() -> datetime:
    return datetime.now(UTC)


def fmt_ts(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return str(timedelta(seconds=int(seconds)))
