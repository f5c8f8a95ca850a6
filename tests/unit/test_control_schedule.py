"""Cron schedules in time zones."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from keepwell.control.schedule import Schedule


def test_daily_in_a_time_zone_across_a_dst_change() -> None:
    s = Schedule("30 1 * * *", "Europe/Berlin")
    before = datetime(2024, 3, 30, 12, 0, tzinfo=UTC)
    first = s.next_after(before)
    second = s.next_after(first)
    assert first == datetime(2024, 3, 31, 0, 30, tzinfo=UTC)  # 01:30 CET
    assert second == datetime(2024, 3, 31, 23, 30, tzinfo=UTC)  # 01:30 CEST


def test_aliases_and_seconds_field() -> None:
    t = datetime(2024, 1, 1, 10, 15, tzinfo=UTC)
    assert Schedule("@hourly").next_after(t) == datetime(2024, 1, 1, 11, 0, tzinfo=UTC)
    assert Schedule("*/5 * * * * *").next_after(t) == datetime(2024, 1, 1, 10, 15, 5,
                                                                tzinfo=UTC)
    assert Schedule("*/5 * * * * *").typical_interval(t.timestamp()) == 5.0


@pytest.mark.parametrize("bad", ["", "* * *", "61 * * * *", "@sometimes", "* * * * * * *"])
def test_bad_expressions(bad: str) -> None:
    with pytest.raises(ValueError):
        Schedule.parse(bad)


def test_explain() -> None:
    assert Schedule("0 2 * * 1-5", "UTC").explain() == "At 02:00 on Monday through Friday (UTC)"
