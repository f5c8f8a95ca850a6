"""The one retention engine (`keepwell.repository.retention`): restic's keep rules, the reasons
listed for each kept snapshot, ``within`` measured from the newest snapshot, and the rules the
database sources add (the base a --keep-within window starts from, the log floor), the same
for PostgreSQL, MySQL, the generic forget and the daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keepwell.backends.local import LocalBackend
from keepwell.control.config import parse_config
from keepwell.errors import UsageError
from keepwell.repository import Repository
from keepwell.repository.retention import (
    WINDOW_START,
    Item,
    Policy,
    apply_policy,
    keep_bases,
    oldest_kept,
    source_group,
)
from keepwell.repository.snapshot import Snapshot
from keepwell.sources.postgres import KIND_LOGICAL, KIND_PHYSICAL, KIND_WAL
from keepwell.sources.postgres.catalog import Catalog
from keepwell.sources.postgres.retention import NEWEST_INCOMPLETE, plan_forget
from keepwell.sources.postgres.walnames import segment_name

T0 = datetime(2026, 11, 1, 3, 0, tzinfo=UTC)  # a Sunday
NOW = T0 + timedelta(days=400)
CLI = "import sys; from keepwell.cli.main import run; sys.argv[0] = 'keepwell'; run()"


def _snap(i: int, kind: str, at: datetime, tags: list[str] | None = None) -> Snapshot:
    return Snapshot(id=f"{kind[6]}{i:063d}", time=at, host="db1", username="root",
                    paths=["dump.sql"], tags=tags or [], kind=kind, tree="0" * 64)


def _daily(kind: str, days: int) -> list[Snapshot]:
    return [_snap(d, kind, T0 + timedelta(days=d)) for d in range(days)]


def _kept(items: list[Item], policy: Policy, now: datetime = NOW) -> dict[str, list[str]]:
    kept, _ = apply_policy(items, policy, group_by=lambda _: None, now=now)
    return {s.id: why for s, why in kept}


@pytest.fixture(autouse=True)
def zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Calendar buckets follow the local zone: the tests say which (UTC unless they set one)."""
    monkeypatch.setenv("TZ", "UTC0")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# -- the rules ----------------------------------------------------------------------------------
def test_keep_last_counts_each_kind_separately() -> None:
    logical, physical = _daily("mysql-logical", 5), _daily("mysql-physical", 3)
    verdict = keep_bases(logical + physical, Policy(last=2), group_by=lambda s: s.kind, now=NOW)
    assert set(verdict.kept) == {s.id for s in logical[-2:] + physical[-2:]}
    assert sorted(verdict.forget) == sorted(s.id for s in logical[:3] + physical[:1])


def test_calendar_rules_keep_the_newest_of_each_bucket() -> None:
    # two bases a day for ten days, then one a week later
    snaps = [_snap(2 * d + h, "mysql-logical", T0 + timedelta(days=d, hours=6 * h))
             for d in range(10) for h in range(2)]
    snaps.append(_snap(99, "mysql-logical", T0 + timedelta(days=17)))
    verdict = keep_bases(snaps, Policy(daily=3, weekly=2), group_by=lambda s: s.kind, now=NOW)
    days = sorted((s.time for s in snaps if s.id in verdict.kept), reverse=True)
    # daily: the newest base of the three newest days; weekly: the newest of two weeks
    assert days[:3] == [T0 + timedelta(days=17), T0 + timedelta(days=9, hours=6),
                        T0 + timedelta(days=8, hours=6)]
    assert len(verdict.kept) + len(verdict.forget) == len(snaps)
    assert all(why for why in verdict.kept.values())


def test_a_snapshot_lists_every_rule_that_keeps_it() -> None:
    items = [Item(f"s{d}", T0 + timedelta(days=d), ("monthly-report",) if d == 0 else ())
             for d in range(3)]
    kept = _kept(items, Policy(last=1, daily=5, within=timedelta(days=1), tags=("monthly-report",)))
    assert kept["s2"] == ["last", "daily", "within"]
    assert kept["s1"] == ["daily", "within"]
    assert kept["s0"] == ["daily", "tag"]


def test_buckets_left_over_keep_the_oldest_snapshot_too() -> None:
    # three snapshots on one day: daily=7 has buckets left, so the oldest is kept as well
    items = [Item(f"s{h}", T0 + timedelta(hours=h)) for h in range(3)]
    assert _kept(items, Policy(daily=7)) == {"s2": ["daily"], "s0": ["oldest daily"]}
    # with its buckets used up, the rule keeps nothing more
    assert _kept(items, Policy(daily=1)) == {"s2": ["daily"]}


def test_within_counts_from_the_newest_snapshot_not_from_now() -> None:
    items = [Item(f"s{d}", T0 + timedelta(days=d)) for d in range(10)]
    # a year after the last backup, --keep-within 3d still keeps the last three days of it
    assert sorted(_kept(items, Policy(within=timedelta(days=3)))) == ["s6", "s7", "s8", "s9"]


def test_a_snapshot_from_the_future_is_kept_and_does_not_move_the_window() -> None:
    items = [Item(f"s{d}", T0 + timedelta(days=d)) for d in range(10)]
    items.append(Item("ahead", T0 + timedelta(days=900)))  # a clock far ahead
    kept = _kept(items, Policy(within=timedelta(days=3)))
    assert sorted(kept) == ["ahead", "s6", "s7", "s8", "s9"]


def test_within_buckets_keep_the_newest_of_each_inside_the_duration() -> None:
    items = [Item(f"d{d}h{h}", T0 + timedelta(days=d, hours=h)) for d in range(6)
             for h in (0, 6)]
    kept = _kept(items, Policy(within_daily=timedelta(days=2)))
    # within two days of day 5 06:00: day 3 06:00 onwards; the newest of each of those days,
    # and the oldest of them, the rule having no count to run out of
    assert kept == {"d5h6": ["daily within"], "d4h6": ["daily within"],
                    "d3h6": ["daily within"]}
    kept = _kept(items, Policy(within_weekly=timedelta(days=30)))
    assert kept == {"d5h6": ["weekly within"], "d0h6": ["weekly within"],
                    "d0h0": ["oldest weekly within"]}


def test_calendar_buckets_are_local_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # 03:00 and 06:00 UTC are 22:00 the day before and 01:00 in EST: two days, not one
    monkeypatch.setenv("TZ", "EST5")
    time.tzset()
    items = [Item("late", T0), Item("early", T0 + timedelta(hours=3))]
    assert _kept(items, Policy(daily=2)) == {"early": ["daily"], "late": ["daily"]}
    assert _kept(items, Policy(daily=1)) == {"early": ["daily"]}


def test_forget_groups_by_host_paths_and_kind() -> None:
    a = [_snap(i, "files--", T0 + timedelta(days=i)) for i in range(3)]
    b = [Snapshot(**{**s.__dict__, "id": "b" + s.id[1:], "host": "db2"}) for s in a]
    kept, removed = apply_policy(a + b, Policy(last=1), group_by=source_group, now=NOW)
    assert {s.id for s, _ in kept} == {a[2].id, b[2].id} and len(removed) == 4


def test_an_empty_policy_keeps_everything() -> None:
    items = [Item("s", T0)]
    assert apply_policy(items, Policy(), group_by=lambda _: None) == ([(items[0], ["no policy"])],
                                                                      [])


# -- the database rules -------------------------------------------------------------------------
def test_within_keeps_the_base_that_opens_the_window() -> None:
    snaps = _daily("mysql-physical", 10)  # days 0..9
    verdict = keep_bases(snaps, Policy(within=timedelta(days=3)), group_by=lambda s: s.kind,
                         now=NOW)
    inside = {s.id for s in snaps[6:]}  # days 6..9: within 3 days of day 9
    assert inside <= set(verdict.kept)
    assert verdict.kept[snaps[5].id] == [WINDOW_START]  # day 5 restores the window's start
    assert set(verdict.forget) == {s.id for s in snaps[:5]}


def test_tags_and_oldest_kept() -> None:
    snaps = _daily("mysql-logical", 4)
    snaps[0].tags.append("before-upgrade")
    verdict = keep_bases(snaps, Policy(last=1, tags=("before-upgrade",)),
                         group_by=lambda s: s.kind, now=NOW)
    assert verdict.kept[snaps[0].id] == ["tag"] and verdict.kept[snaps[3].id] == ["last"]

    class Base:
        def __init__(self, s: Snapshot, pos: int | None) -> None:
            self.snapshot_id, self.pos = s.id, pos

    bases = [Base(s, p) for s, p in zip(snaps, [None, 20, 30, 40], strict=True)]
    # the tagged base has no binlog position: the floor follows the oldest one that has
    assert oldest_kept(bases, verdict, lambda b: b.pos) is bases[3]
    verdict.kept[snaps[1].id] = ["last"]
    assert oldest_kept(bases, verdict, lambda b: b.pos) is bases[1]


def _pg_snapshots(days: int, start: datetime) -> list[tuple[str, datetime, dict[str, object]]]:
    """A base backup a day, each in its own WAL segment, with that segment archived."""
    out: list[tuple[str, datetime, dict[str, object]]] = []
    for d in range(days):
        t = start + timedelta(days=d)
        out.append((KIND_PHYSICAL, t, {
            "cluster": "main", "system_identifier": "42", "timeline": 1,
            "start_lsn": f"0/{d + 1:X}000028", "stop_lsn": f"0/{d + 1:X}000100",
            "start_time": t.isoformat(), "stop_time": t.isoformat(), "segment_size": 16 << 20}))
        name = segment_name(1, d + 1)
        out.append((KIND_WAL, t + timedelta(minutes=1), {
            "cluster": "main", "system_identifier": "42",
            "files": {name: {"hash": name, "size": 1, "mtime": t.isoformat()}}}))
    return out


class _Snap:
    def __init__(self, n: int, kind: str, at: datetime, source: dict[str, object],
                 tags: list[str] | None = None) -> None:
        self.id, self.kind, self.time, self.source = f"{n:064x}", kind, at, source
        self.tags, self.short_id = tags or [], self.id[:8]


def test_postgres_uses_the_engine_and_keeps_the_wal_of_kept_bases() -> None:
    snaps = [_Snap(i, k, t, src) for i, (k, t, src) in enumerate(_pg_snapshots(10, T0))]
    dumps = [_Snap(90 + i, KIND_LOGICAL, T0 - timedelta(days=30 * i), {"cluster": "main"},
                   tags=["keep-me"] if i == 1 else []) for i in range(3)]
    snaps += dumps
    # the newest base has no WAL yet: incomplete, kept, and not counted by the policy
    snaps.append(_Snap(97, KIND_PHYSICAL, T0 + timedelta(days=11), {
        **snaps[0].source, "start_lsn": "0/F0000028", "stop_lsn": "0/F0000100"}))
    cat = Catalog.build(snaps, "main")
    plan = plan_forget(cat, Policy(within=timedelta(days=3), tags=("keep-me",)), now=NOW)
    bases = [s.id for s in snaps if s.kind == KIND_PHYSICAL]
    # days 6..9 are within 3 days of the newest complete base, day 5 opens the window
    assert plan.kept_physical == bases[5:]
    assert plan.kept[bases[5]] == [WINDOW_START] and plan.kept[bases[-1]] == [NEWEST_INCOMPLETE]
    assert plan.kept[bases[9]] == ["within"]
    assert plan.physical == bases[:5]
    # the dumps: the policy alone (a dump rolls nothing forward), here the tagged one
    assert plan.logical == [dumps[2].id]
    assert plan.kept[dumps[1].id] == ["tag"] and plan.kept[dumps[0].id] == ["within"]
    # WAL below the oldest kept base's start segment goes
    assert plan.wal_floor == hex(6)
    wal = [s.id for s in snaps if s.kind == KIND_WAL]
    assert sorted(plan.wal) == sorted(wal[:5])
    with pytest.raises(UsageError, match="no --keep-\\* policy"):
        plan_forget(cat, Policy())


def _keepwell(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CLI, *args],
                          env={**os.environ, "KEEPWELL_TESTONLY_WEAK_KDF": "1", **env},
                          capture_output=True, text=True, timeout=120)


def test_postgres_forget_measures_the_window_from_the_newest_backup(tmp_path: Path) -> None:
    # the cluster's last base backups are three weeks old (backups stopped): a --keep-within
    # window counted back from now would keep only the newest of them
    location = str(tmp_path / "repo")
    start = datetime.now(UTC) - timedelta(days=30)
    with Repository.init(LocalBackend(location), "pw") as repo:
        for kind, at, source in _pg_snapshots(10, start):
            with repo.new_snapshot(kind, [], host="db1", source=dict(source)) as w:
                w.commit(time_=at)
    out = _keepwell("-r", location, "postgres", "forget", "--keep-within", "3d", "--dry-run",
                    "--json", env={"KEEPWELL_PASSWORD": "pw"})
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert len(plan["kept_physical"]) == 5  # four within 3 days of the newest, and day 5
    assert len(plan["forget_physical"]) == 5


# -- one policy from every door -----------------------------------------------------------------
def test_the_config_and_the_command_line_make_the_same_policy(tmp_path: Path) -> None:
    cfg = parse_config("""\
repositories: {main: {location: repo, password: "env:PW"}}
sources:
  home:
    kind: files
    repository: main
    paths: [data]
    retention: {keep_daily: 7, keep_within: 1y6mo, keep_within_weekly: 2w, keep_tag: [x]}
""", tmp_path / "keepwell.yaml")
    retention = cfg.sources["home"].model_dump(mode="json")["retention"]  # what the daemon gets
    from_config = Policy.from_options(**{k: v for k, v in retention.items() if v is not None})
    from_cli = Policy.from_options(keep_daily=7, keep_within="1y6mo",
                                   keep_within_weekly="2w", keep_tag=["x"])
    assert from_config == from_cli
    assert from_cli.within == timedelta(days=365 + 180)


def test_policy_options_are_checked() -> None:
    assert Policy.from_options().empty()
    with pytest.raises(UsageError, match="--keep-last must not be negative"):
        Policy.from_options(keep_last=-1)
    with pytest.raises(UsageError, match="--keep-within: expected a duration"):
        Policy.from_options(keep_within="a while")
    with pytest.raises(UsageError, match="write 6mo for months or 6min for minutes"):
        Policy.from_options(keep_within="6m")
    with pytest.raises(UsageError, match="--keep-within-daily: '1y6m' is ambiguous"):
        Policy.from_options(keep_within_daily="1y6m")
    with pytest.raises(UsageError, match="one tag"):
        Policy.from_options(keep_tag=["a,b"])
    assert Policy.from_options(keep_within="6mo").within == timedelta(days=180)
