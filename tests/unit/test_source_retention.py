"""The keep policy of the database sources (`keepwell.sources.retention`): per kind, the rules
of the generic forget, and the base that opens a --keep-within window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from keepwell.errors import UsageError
from keepwell.repository.snapshot import Snapshot
from keepwell.sources.retention import WINDOW_START, keep_bases, oldest_kept, policy_of

T0 = datetime(2026, 11, 1, 3, 0, tzinfo=UTC)


def _snap(i: int, kind: str, at: datetime, tags: list[str] | None = None) -> Snapshot:
    return Snapshot(id=f"{kind[6]}{i:063d}", time=at, host="db1", username="root",
                    paths=["dump.sql"], tags=tags or [], kind=kind, tree="0" * 64)


def _daily(kind: str, days: int) -> list[Snapshot]:
    return [_snap(d, kind, T0 + timedelta(days=d)) for d in range(days)]


def test_keep_last_counts_each_kind_separately() -> None:
    logical, physical = _daily("mysql-logical", 5), _daily("mysql-physical", 3)
    verdict = keep_bases(logical + physical, policy_of(last=2))
    assert set(verdict.kept) == {s.id for s in logical[-2:] + physical[-2:]}
    assert sorted(verdict.forget) == sorted(s.id for s in logical[:3] + physical[:1])


def test_calendar_rules_keep_the_newest_of_each_bucket() -> None:
    # two bases a day for ten days, then one a week later
    snaps = [_snap(2 * d + h, "mysql-logical", T0 + timedelta(days=d, hours=6 * h))
             for d in range(10) for h in range(2)]
    snaps.append(_snap(99, "mysql-logical", T0 + timedelta(days=17)))
    verdict = keep_bases(snaps, policy_of(daily=3, weekly=2))
    days = sorted((s.time for s in snaps if s.id in verdict.kept), reverse=True)
    # daily: the newest base of the three newest days; weekly: the newest of two weeks
    assert days[:3] == [T0 + timedelta(days=17), T0 + timedelta(days=9, hours=6),
                        T0 + timedelta(days=8, hours=6)]
    assert len(verdict.kept) + len(verdict.forget) == len(snaps)
    assert all(why for why in verdict.kept.values())


def test_within_keeps_the_base_that_opens_the_window() -> None:
    snaps = _daily("mysql-physical", 10)  # days 0..9
    verdict = keep_bases(snaps, policy_of(within="3d"))
    inside = {s.id for s in snaps[6:]}  # days 6..9: within 3 days of day 9
    assert inside <= set(verdict.kept)
    assert verdict.kept[snaps[5].id] == [WINDOW_START]  # day 5 restores the window's start
    assert set(verdict.forget) == {s.id for s in snaps[:5]}


def test_tags_and_oldest_kept() -> None:
    snaps = _daily("mysql-logical", 4)
    snaps[0].tags.append("before-upgrade")
    verdict = keep_bases(snaps, policy_of(last=1, tags=["before-upgrade"]))
    assert verdict.kept[snaps[0].id] == ["tag"] and verdict.kept[snaps[3].id] == ["last"]

    class Base:
        def __init__(self, s: Snapshot, pos: int | None) -> None:
            self.snapshot_id, self.pos = s.id, pos

    bases = [Base(s, p) for s, p in zip(snaps, [None, 20, 30, 40], strict=True)]
    # the tagged base has no binlog position: the floor follows the oldest one that has
    assert oldest_kept(bases, verdict, lambda b: b.pos) is bases[3]
    verdict.kept[snaps[1].id] = ["last"]
    assert oldest_kept(bases, verdict, lambda b: b.pos) is bases[1]


def test_policy_options_are_checked() -> None:
    assert policy_of().empty()
    with pytest.raises(UsageError):
        policy_of(last=-1)
    with pytest.raises(UsageError):
        policy_of(within="a while")
    assert policy_of(within="1y6m").within == timedelta(days=365 + 180)
