"""Pure parts of the PostgreSQL source: WAL names, tar tapping, catalog and PITR planning."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keepwell.sources.postgres import KIND_PHYSICAL, KIND_WAL
from keepwell.sources.postgres.catalog import Catalog
from keepwell.sources.postgres.errors import RestorePlanError
from keepwell.sources.postgres.hooks import parse_args, parse_size
from keepwell.sources.postgres.plan import Target, choose
from keepwell.sources.postgres.retention import plan_forget
from keepwell.sources.postgres.spool import SpoolFull, WalSpool
from keepwell.sources.postgres.tartap import TarTap
from keepwell.sources.postgres.walnames import (
    Lsn,
    parse_segment_name,
    segment_name,
    wal_kind,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Snap:
    id: str
    kind: str
    time: datetime
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def short_id(self) -> str:
        return self.id[:8]


def wal_snap(sid: str, names: list[str], minute: int) -> Snap:
    files = {n: {"hash": n, "size": 1, "mtime": (T0 + timedelta(minutes=minute)).isoformat()}
             for n in names}
    return Snap(sid, KIND_WAL, T0 + timedelta(minutes=minute),
                {"cluster": "main", "system_identifier": "42", "files": files})


def base_snap(sid: str, start: str, stop: str, minute: int, tli: int = 1) -> Snap:
    t = T0 + timedelta(minutes=minute)
    return Snap(sid, KIND_PHYSICAL, t, {
        "cluster": "main", "system_identifier": "42", "timeline": tli, "start_lsn": start,
        "stop_lsn": stop, "start_time": t.isoformat(), "stop_time": t.isoformat(),
        "segment_size": 16 << 20, "next_xid": 100 + minute, "version": "15.2"})


def test_lsn_and_segment_names() -> None:
    lsn = Lsn.parse("16/B374D848")
    assert str(lsn) == "16/B374D848"
    assert segment_name(1, lsn.segno()) == "0000000100000016000000B3"
    assert parse_segment_name("0000000100000016000000B3") == (1, lsn.segno())
    assert wal_kind("00000002.history") == "history"
    assert wal_kind("000000010000000000000003.partial") == "partial"
    assert wal_kind("000000010000000000000003.00000028.backup") == "backup"
    with pytest.raises(ValueError):
        Lsn.parse("nope")


def test_tartap_captures_members_while_passing_bytes() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("a", b"x" * 1000), ("backup_label", b"START WAL LOCATION: 0/2"),
                           ("d" * 90 + "/" + "b" * 90, b"long"), ("backup_manifest", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    tap = TarTap(io.BytesIO(raw), {"backup_label", "backup_manifest"})
    out = b"".join(iter(lambda: tap.read(777), b""))
    assert out == raw
    assert tap.captured == {"backup_label": b"START WAL LOCATION: 0/2", "backup_manifest": b"{}"}


def test_catalog_completeness_gaps_and_plan() -> None:
    seg = [segment_name(1, i) for i in range(1, 9)]
    snaps = [
        base_snap("b1" * 8, "0/1000028", "0/1000100", 0),
        wal_snap("w1" * 8, seg[0:3], 1),
        base_snap("b2" * 8, "0/5000028", "0/5000100", 10),
        wal_snap("w2" * 8, seg[4:7], 12),  # seg[3] (…04) is missing
    ]
    cat = Catalog.build(snaps, "main")
    assert cat.system_identifier == 42
    assert [b.short_id for b in cat.complete_backups()] == ["b1b1b1b1", "b2b2b2b2"]
    assert cat.gaps() == [(1, seg[3], seg[3])]
    assert cat.reach(cat.backups[0]).last_segment == seg[2]
    # the newest complete backup before the target
    plan = choose(cat, Target(time=T0 + timedelta(minutes=11)))
    assert plan.backup.short_id == "b2b2b2b2"
    plan = choose(cat, Target(time=T0 + timedelta(minutes=5)))
    assert plan.backup.short_id == "b1b1b1b1"
    assert choose(cat, Target(xid=105)).backup.short_id == "b1b1b1b1"
    with pytest.raises(RestorePlanError):
        choose(cat, Target(time=T0 - timedelta(minutes=1)))
    with pytest.raises(RestorePlanError):
        choose(cat, Target(lsn=Lsn.parse("0/4000000"), immediate=True))
    forget = plan_forget(cat, keep_last=1, keep_within=None)
    assert [i[:8] for i in forget.physical] == ["b1b1b1b1"]
    assert forget.wal == ["w1" * 8]


def test_timeline_lineage_follows_history() -> None:
    hist = {"00000002.history": {"hash": "h", "size": 1, "text": "1\t0/3000000\tno reason\n"}}
    snaps = [Snap("h" * 16, KIND_WAL, T0, {"cluster": "main", "files": hist})]
    cat = Catalog.build(snaps, "main")
    lineage = cat.lineage(2)
    assert lineage == [(2, 3), (1, 0)]
    assert cat.segment_for(2, lineage) == segment_name(1, 2)
    assert cat.segment_for(3, lineage) == segment_name(2, 3)


def test_spool_bounds_and_markers(tmp_path: Path) -> None:
    spool = WalSpool(str(tmp_path / "spool"), max_bytes=100).ensure()
    src = tmp_path / "000000010000000000000001"
    src.write_bytes(b"a" * 60)
    spool.accept(str(src), src.name)
    assert spool.ready_names() == [src.name]
    with pytest.raises(SpoolFull):
        spool.accept(str(src), "000000010000000000000002")
    spool.mark_done(src.name, "abc", [1, 2, 3, 4])
    marker = spool.done_marker(src.name)
    assert marker is not None and marker.digest == "abc" and marker.file == [1, 2, 3, 4]
    spool.set_identity("main", 7)
    assert spool.identity() == ("main", 7)


def test_hook_arguments() -> None:
    assert parse_args(["push", "p", "--async", "--spool=/s"]) == (
        "push", ["p"], {"--async": "1", "--spool": "/s"})
    assert parse_args(["fetch", "f", "p", "-r", "/r"])[2] == {"--repo": "/r"}
    assert parse_size("4G") == 4 << 30 and parse_size("512MiB") == 512 << 20
