"""Pure parts of the PostgreSQL source: WAL names, tar tapping, catalog and PITR planning."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keepwell.errors import UsageError
from keepwell.repository.retention import Policy
from keepwell.sources.postgres import KIND_PHYSICAL, KIND_RESTORE_POINT, KIND_WAL
from keepwell.sources.postgres.catalog import Catalog
from keepwell.sources.postgres.errors import RestorePlanError
from keepwell.sources.postgres.hooks import HookSettings
from keepwell.sources.postgres.plan import Target, choose
from keepwell.sources.postgres.retention import plan_forget
from keepwell.sources.postgres.spool import SpoolFull, WalSpool
from keepwell.sources.postgres.tartap import TarTap
from keepwell.sources.postgres.walcommand import main, parse_args
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
    tags: list[str] = field(default_factory=list)

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
    plan = choose(cat, Target(time=T0 + timedelta(seconds=30)))
    assert plan.backup.short_id == "b1b1b1b1"
    # past the WAL b1 reaches (the gap at …04): refused, naming the gap
    with pytest.raises(RestorePlanError, match=f"{seg[3]} is missing"):
        choose(cat, Target(time=T0 + timedelta(minutes=5)))
    assert choose(cat, Target(xid=105)).backup.short_id == "b1b1b1b1"
    # to the end: b2 reaches the end of the archive; from b1, the gap stops it short
    assert choose(cat, Target()).gap is None
    with pytest.raises(RestorePlanError, match="would stop at the gap"):
        choose(cat, Target(), "b1b1b1b1")
    assert choose(cat, Target(), "b1b1b1b1", allow_gap=True).gap == (seg[3], seg[6])
    with pytest.raises(RestorePlanError):
        choose(cat, Target(time=T0 - timedelta(minutes=1)))
    with pytest.raises(RestorePlanError):
        choose(cat, Target(lsn=Lsn.parse("0/4000000"), immediate=True))
    forget = plan_forget(cat, Policy(last=1))
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


def test_hook_help_is_printed_with_exit_code_0(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["-h"], ["push", "--help"], ["fetch", "-h"]):
        assert main(argv) == 0, argv
        out, err = capsys.readouterr()
        assert out.startswith("usage: keepwell-wal COMMAND") and not err, argv
    assert main([]) == 2
    assert "usage: keepwell-wal" in capsys.readouterr().err


def test_hook_arguments() -> None:
    assert parse_args(["push", "p", "--async", "--spool=/s"]) == (
        "push", ["p"], {"--async": "1", "--spool": "/s"})
    assert parse_args(["fetch", "f", "p", "-r", "/r"])[2] == {"--repo": "/r"}
    assert HookSettings.resolve(spool_max="4G").spool_max == 4 << 30
    assert HookSettings.resolve(spool_max="512MiB").spool_max == 512 << 20


def point_snap(sid: str, name: str, lsn: str, minute: int) -> Snap:
    t = T0 + timedelta(minutes=minute)
    return Snap(sid, KIND_RESTORE_POINT, t, {
        "cluster": "main", "system_identifier": "42", "name": name, "lsn": lsn,
        "time": t.isoformat(), "timeline": 1})


def test_target_name_picks_the_backup_before_the_recorded_point() -> None:
    seg = [segment_name(1, i) for i in range(1, 9)]
    snaps = [
        base_snap("b1" * 8, "0/1000028", "0/1000100", 0),
        point_snap("p1" * 8, "before-upgrade", "0/2000200", 3),
        base_snap("b2" * 8, "0/3000028", "0/3000100", 5),
        point_snap("p2" * 8, "nightly", "0/4000300", 7),
        point_snap("p3" * 8, "nightly", "0/6000300", 9),
        wal_snap("w1" * 8, seg[0:7], 12),
        point_snap("p4" * 8, "too-late", "0/9000000", 13),
    ]
    cat = Catalog.build(snaps, "main")
    assert [p.name for p in cat.points_named("nightly")] == ["nightly", "nightly"]
    plan = choose(cat, Target(name="before-upgrade"))
    assert plan.backup.short_id == "b1b1b1b1" and plan.note is None
    assert plan.point is not None and str(plan.point.lsn) == "0/2000200"
    assert plan.target.recovery_settings() == {"recovery_target_name": "before-upgrade"}
    # recovery stops at the first 'nightly' after the backup's start: no backup reaches the
    # newest one, so the restore goes to the older one from b2, and says so
    plan = choose(cat, Target(name="nightly"))
    assert plan.backup.short_id == "b2b2b2b2" and plan.point is not None
    assert str(plan.point.lsn) == "0/4000300"
    assert plan.note is not None and "2 restore points are named 'nightly'" in plan.note
    with pytest.raises(RestorePlanError, match="ends after restore point 'before-upgrade'"):
        choose(cat, Target(name="before-upgrade"), snapshot_id="b2b2")
    with pytest.raises(RestorePlanError, match="past the archived WAL"):
        choose(cat, Target(name="too-late"))
    # a point keepwell did not record: the newest backup, with a note saying so
    plan = choose(cat, Target(name="made-in-sql"))
    assert plan.backup.short_id == "b2b2b2b2" and plan.point is None
    assert plan.note is not None and "not recorded" in plan.note


def test_a_snapshot_prefix_names_one_backup_or_is_refused() -> None:
    seg = [segment_name(1, i) for i in range(1, 5)]
    cat = Catalog.build([
        base_snap("abcd1111" * 2, "0/1000028", "0/1000100", 0),
        base_snap("abcd2222" * 2, "0/2000028", "0/2000100", 5),
        wal_snap("e" * 16, seg, 6),
    ], "main")
    with pytest.raises(UsageError, match="ambiguous"):
        choose(cat, Target(), snapshot_id="abcd")
    for bad in ("", "a", "nothex!!"):
        with pytest.raises(UsageError, match="not a snapshot id"):
            choose(cat, Target(), snapshot_id=bad)
    assert choose(cat, Target(), snapshot_id="ABCD1").backup.short_id == "abcd1111"
    assert choose(cat, Target(), snapshot_id="latest").backup.short_id == "abcd2222"


def test_target_timeline_must_exist_and_descend_from_the_backup() -> None:
    """Timeline 2 left timeline 1 at 0/5000000 (a restore to a point in time); the old primary
    went on on timeline 1. A timeline recovery cannot follow from a backup is refused, or
    another backup chosen, before anything is written (PostgreSQL would stop at start-up)."""
    tl1 = [segment_name(1, i) for i in range(1, 9)]
    tl2 = [segment_name(2, i) for i in range(5, 9)]
    hist = {"00000002.history": {"hash": "h", "size": 1, "text": "1\t0/5000000\tno reason\n"}}
    snaps = [
        base_snap("b1" * 8, "0/1000028", "0/1000100", 0),
        wal_snap("w1" * 8, tl1, 1),
        Snap("h" * 16, KIND_WAL, T0 + timedelta(minutes=2), {"cluster": "main", "files": hist}),
        wal_snap("w2" * 8, tl2, 3),
        base_snap("b2" * 8, "0/6000028", "0/6000100", 4, tli=2),
        base_snap("b3" * 8, "0/7000028", "0/7000100", 5),  # timeline 1, after the fork
        point_snap("p1" * 8, "early", "0/3000000", 6),
        point_snap("p2" * 8, "late", "0/7000200", 7),  # timeline 1, after the fork
    ]
    cat = Catalog.build(snaps, "main")
    with pytest.raises(RestorePlanError, match="timeline 7 is not in the archive"):
        choose(cat, Target(timeline="7"))
    # the latest timeline (2): the newest backup of its history, not b3
    plan = choose(cat, Target())
    assert plan.backup.short_id == "b2b2b2b2" and plan.timeline == 2
    with pytest.raises(RestorePlanError, match="not in the history of timeline 2"):
        choose(cat, Target(), snapshot_id="b3b3")
    assert choose(cat, Target(), snapshot_id="b1b1").timeline == 2
    # timeline 1: a backup of timeline 2 cannot go back to it
    plan = choose(cat, Target(timeline="1"))
    assert plan.backup.short_id == "b3b3b3b3" and plan.timeline == 1
    with pytest.raises(RestorePlanError, match="not in the history of timeline 1"):
        choose(cat, Target(timeline="1"), snapshot_id="b2b2")
    # current: the backup's own timeline, to its end there
    plan = choose(cat, Target(timeline="current"), snapshot_id="b1b1")
    assert plan.timeline == 1 and plan.wal_end == Lsn.parse("0/9000000")
    # what info and check show: b3's window is on timeline 1, where a restore can follow it
    b3 = next(b for b in cat.backups if b.short_id == "b3b3b3b3")
    reach = cat.reach(b3)
    assert (reach.timeline, reach.end_lsn) == (1, Lsn.parse("0/9000000"))
    # a restore point recovery meets only on the timeline it was made on, before any fork
    assert choose(cat, Target(name="early")).backup.short_id == "b1b1b1b1"
    with pytest.raises(RestorePlanError, match="not in the history of timeline 2"):
        choose(cat, Target(name="late"))
    assert choose(cat, Target(name="late", timeline="1")).backup.short_id == "b3b3b3b3"


FAST_PUSH = Path(__file__).resolve().parents[2] / "src/keepwell/sources/postgres/keepwell-wal-push"


def run_fast_push(tmp_path: Path, *args: str) -> str:
    """Run the shell fast path with a stand-in hook that only says it was called."""
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\necho \"hook $*\"\n")
    hook.chmod(0o755)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KEEPWELL_WAL_HOOK": str(hook)}
    res = subprocess.run(["/bin/sh", str(FAST_PUSH), *args], env=env, capture_output=True,
                         text=True, check=True)
    return res.stdout


def test_shell_fast_path_acknowledges_only_a_newer_marker(tmp_path: Path) -> None:
    spool = WalSpool(str(tmp_path / "spool")).ensure()
    seg = tmp_path / "pg_wal" / "000000010000000000000007"
    seg.parent.mkdir()
    seg.write_bytes(b"w" * 100)
    args = ("--cluster", "main", "--async", "--spool", spool.path, str(seg))
    # no marker: the Python hook runs, with every argument
    assert run_fast_push(tmp_path, *args) == f"hook push {' '.join(args)}\n"
    # a marker written after the segment: acknowledged by the shell alone
    spool.mark_done(seg.name, "d1gest", None)
    os.utime(seg, (1_000_000, 1_000_000))
    assert run_fast_push(tmp_path, *args) == ""
    assert run_fast_push(tmp_path, f"--spool={spool.path}", str(seg)) == ""
    # the segment changed after the marker: the hook decides
    os.utime(seg, None)
    marker = Path(spool.done_dir) / seg.name
    os.utime(marker, (1_000_000, 1_000_000))
    assert run_fast_push(tmp_path, *args).startswith("hook push")
    # a refusal is never acknowledged; nor is a missing segment
    spool.mark_refused(seg.name, "from another cluster")
    os.utime(seg, (1_000_000, 1_000_000))
    assert run_fast_push(tmp_path, *args).startswith("hook push")
    spool.mark_done(seg.name, "d1gest", None)
    assert run_fast_push(tmp_path, *args) == ""
    # the spool can come from the environment (the hook, /bin/false here, is not needed)
    from_env = subprocess.run(
        ["/bin/sh", str(FAST_PUSH), "--async", str(seg)], capture_output=True, text=True,
        env={"KEEPWELL_PG_SPOOL": spool.path, "KEEPWELL_WAL_HOOK": "/bin/false"})
    assert from_env.returncode == 0
    seg.unlink()
    assert run_fast_push(tmp_path, *args).startswith("hook push")


def test_uploader_reads_ahead_oldest_first_in_a_small_head_batch(tmp_path: Path) -> None:
    from keepwell.sources.postgres.uploader import BATCH_FILES, HEAD_BATCH_FILES, next_batch

    spool = WalSpool(str(tmp_path / "spool")).ensure()
    pg_wal = tmp_path / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    names = [segment_name(1, i) for i in range(1, 31)]
    for name in names:
        (pg_wal / name).write_bytes(b"w")
        (pg_wal / "archive_status" / f"{name}.ready").touch()
    spool.mark_done(names[0], "d", None)  # uploaded ahead before, not yet acknowledged by PG
    known: set[str] = set()
    head = next_batch(spool, str(pg_wal), set(), known)
    assert [item.name for item, from_pg_wal in head] == names[1:1 + HEAD_BATCH_FILES]
    assert all(from_pg_wal for _, from_pg_wal in head) and known == {names[0]}
    # with the head in flight, the next worker takes a full batch after it
    claimed = {item.name for item, _ in head}
    rest = next_batch(spool, str(pg_wal), claimed, known)
    assert [item.name for item, _ in rest] == names[1 + HEAD_BATCH_FILES:][:BATCH_FILES]
    spool.set_inflight(claimed)
    assert spool.inflight() == claimed


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("split", [1 << 20, 511, 4096 + 7])
def test_tar_members_match_tarfile_in_any_block_split(fmt: int, split: int) -> None:
    """The zero-copy reader restore uses yields what tarfile reads, whatever the block sizes
    of the stored stream, with long names (GNU and PAX headers) applied."""
    from keepwell.sources.postgres.datadir import tar_members

    deep = "base/" + "d" * 60 + "/" + "f" * 70 if fmt != tarfile.USTAR_FORMAT else "base/16384/1259"
    files = {"PG_VERSION": b"15\n", deep: os.urandom(70_000), "global/pg_control": bytes(8192),
             "empty": b""}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        d = tarfile.TarInfo("base")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("pg_tblspc/16400")
        link.type, link.linkname = tarfile.SYMTYPE, "/srv/ts"
        tar.addfile(link)
    raw = buf.getvalue()
    blocks = [raw[i:i + split] for i in range(0, len(raw), split)]
    seen = {}
    for info, data in tar_members(blocks):
        seen[info.name] = (info.type, b"".join(data), info.linkname)
    assert seen["base"][0] == tarfile.DIRTYPE
    assert seen["pg_tblspc/16400"] == (tarfile.SYMTYPE, b"", "/srv/ts")
    for name, data in files.items():
        assert seen[name][1] == data
    with pytest.raises(Exception, match="ends inside a member"):
        list(tar_members([raw[: len(raw) // 2]]))


def test_copy_method_leaves_out_what_pg_basebackup_leaves_out(tmp_path: Path) -> None:
    """The copy method's tar holds the cluster's files, empty pg_wal and rebuilt-at-start
    directories, and none of the pid, relation cache or temporary files; a file that shrank
    after it was listed is padded to its listed size, and the manifest lists every file."""
    import hashlib
    import json as json_mod

    from keepwell.sources.postgres import filecopy
    from keepwell.sources.postgres.datadir import tar_members
    from keepwell.sources.postgres.walnames import Lsn

    root = tmp_path / "data"
    for rel, data in {
        "PG_VERSION": b"15\n", "postmaster.pid": b"1\n", "postmaster.opts": b"x",
        "base/1/1259": b"p" * 9000, "base/1/pg_internal.init": b"c",
        "base/pgsql_tmp/pgsql_tmp1.0": b"t", "pg_wal/000000010000000000000001": b"w",
        "pg_wal/archive_status/000000010000000000000001.done": b"", "pg_stat_tmp/db.stat": b"s",
        "pg_replslot/slot/state": b"r", "global/pg_control": b"\0" * 8192,
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    manifest = filecopy.Manifest()
    stream = filecopy.tar_blocks(str(root), manifest)
    blocks: list[bytes] = []
    for block in stream:
        blocks.append(bytes(block))
        if block[:11] == b"base/1/1259":  # its header (listed at 9000 bytes) went out
            (root / "base/1/1259").write_bytes(b"p" * 100)  # it shrinks while being copied
    copy = filecopy.CopyResult(1, Lsn.parse("0/2000028"), Lsn.parse("0/2000100"),
                             b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n")
    blocks.append(filecopy.closing_members(copy, manifest, 0))
    members = {i.name: (i, b"".join(d)) for i, d in tar_members(blocks)}
    assert set(members) == {"PG_VERSION", "base", "base/1", "base/1/1259", "global",
                            "global/pg_control", "pg_wal", "pg_wal/archive_status", "pg_stat_tmp",
                            "pg_replslot", "backup_label", "backup_manifest"}
    assert members["base/1/1259"][1] == b"p" * 100 + bytes(8900)
    text = members["backup_manifest"][1]
    body, _, tail = text.rstrip(b"\n").rpartition(b"\n")
    assert hashlib.sha256(body + b"\n").hexdigest().encode() in tail
    listed = json_mod.loads(text)
    assert {f["Path"] for f in listed["Files"]} == {
        "PG_VERSION", "base/1/1259", "global/pg_control", "backup_label"}
    assert listed["WAL-Ranges"] == [{"Timeline": 1, "Start-LSN": "0/2000028",
                                     "End-LSN": "0/2000100"}]


def test_extract_tar_writes_large_and_small_files_durably_and_intact(tmp_path: Path) -> None:
    """A relation file larger than the small-file limit is written by the extracting thread with
    its write-out started as it goes; small ones by the writer threads. Every byte, mode and
    mtime arrives, and every file is fsynced before the extraction returns."""
    from keepwell.sources.postgres import datadir

    big = os.urandom(datadir.KICK * 2 + 12345)  # crosses the write-out step twice
    small = {f"base/5/{n}": os.urandom(n * 100) for n in range(1, 40)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in [("base/5/16396", big, 0o600), *((k, v, 0o640) for k, v in small.items())]:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, 1_700_000_000
            tar.addfile(ti, io.BytesIO(data))
    raw = buf.getvalue()
    root = tmp_path / "restored"
    stats = datadir.extract_tar([raw[i:i + (1 << 20)] for i in range(0, len(raw), 1 << 20)],
                                str(root), delta=False)
    assert (root / "base/5/16396").read_bytes() == big
    for name, data in small.items():
        assert (root / name).read_bytes() == data
        assert (root / name).stat().st_mode & 0o777 == 0o640
    assert (root / "base/5/16396").stat().st_mtime == 1_700_000_000
    assert stats.files == 40 and stats.written_bytes == len(big) + sum(map(len, small.values()))
    assert stats.synced == {str(root / n) for n in ["base/5/16396", *small]}
    # the write-out hint reaches the kernel here (Linux): a refused call would make it a no-op
    fd = os.open(root / "base/5/16396", os.O_WRONLY)
    try:
        assert datadir.start_writeback(fd, 0, len(big)) is True
        assert datadir.start_writeback(-1, 0, 1) is False  # a bad descriptor: refused, not raised
    finally:
        os.close(fd)


# -- extraction never writes outside its root ---------------------------------------------------
def _tar(*members: tuple[str, str, bytes | str]) -> list[bytes]:
    """A tar stream of (name, kind, data or link target) members, kind one of file, dir, link,
    in two-block pieces."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, body in members:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.mode = 1_700_000_000, 0o600
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o700
                tar.addfile(ti)
            elif kind == "link":
                ti.type, ti.linkname = tarfile.SYMTYPE, str(body)
                tar.addfile(ti)
            else:
                data = body if isinstance(body, bytes) else body.encode()
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    raw = buf.getvalue()
    return [raw[i:i + 1024] for i in range(0, len(raw), 1024)]


class _Outside:
    """``outside/``: a directory and a file that no extraction under ``root`` may touch."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "outside"
        self.dir.mkdir()
        self.victim = self.dir / "victim"
        self.victim.write_bytes(b"victim")
        self.root = tmp_path / "root"
        self.root.mkdir()

    def unchanged(self) -> None:
        assert sorted(p.name for p in self.dir.iterdir()) == ["victim"]
        assert self.victim.read_bytes() == b"victim"


@pytest.mark.parametrize("case", ["absolute", "dotdot", "dotdot-inside", "file-behind-link",
                                  "dir-behind-link", "file-behind-link-deeper",
                                  "dir-over-link"])
@pytest.mark.parametrize("delta", [False, True])
def test_extract_tar_refuses_members_that_would_write_outside(
        tmp_path: Path, case: str, delta: bool) -> None:
    from keepwell.errors import RestoreTargetError
    from keepwell.sources.postgres.datadir import extract_tar

    out = _Outside(tmp_path)
    link = ("pg_tblspc/16400", "link", str(out.dir))
    members = {
        "absolute": [(str(out.victim), "file", "forged")],
        "dotdot": [("../outside/victim", "file", "forged")],
        "dotdot-inside": [("base/../../outside/victim", "file", "forged")],
        "file-behind-link": [link, ("pg_tblspc/16400/victim", "file", "forged")],
        "dir-behind-link": [link, ("pg_tblspc/16400/x", "dir", "")],
        "file-behind-link-deeper": [link, ("pg_tblspc/16400/x/y", "file", "forged")],
        "dir-over-link": [link, ("pg_tblspc/16400", "dir", "")],
    }[case]
    with pytest.raises(RestoreTargetError, match="refusing tar member"):
        extract_tar(_tar(("PG_VERSION", "file", "16\n"), *members), str(out.root), delta=delta)
    out.unchanged()


def test_extract_tar_makes_the_streams_links_as_links(tmp_path: Path) -> None:
    from keepwell.sources.postgres.datadir import extract_tar

    out = _Outside(tmp_path)
    stats = extract_tar(_tar(("pg_tblspc", "dir", ""), ("pg_tblspc/16400", "link", str(out.dir)),
                             ("pg_tblspc/16400", "link", str(out.dir))), str(out.root),
                        delta=False)
    assert os.readlink(out.root / "pg_tblspc/16400") == str(out.dir)
    assert stats.links == {str(out.root / "pg_tblspc/16400")}
    out.unchanged()


@pytest.mark.parametrize("small", [True, False])
@pytest.mark.parametrize("delta", [True, False])  # a non-delta one meets them only if planted
def test_extraction_never_writes_through_what_the_target_holds(
        tmp_path: Path, small: bool, delta: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delta restore's target may hold links and hard links to files elsewhere: a link where
    the backup has a directory is replaced by a directory, a link or a hard link where it has a
    file is replaced by the file; nothing they lead to changes."""
    from keepwell.sources.postgres import datadir

    if not small:
        monkeypatch.setattr(datadir, "SMALL", 0)
    out = _Outside(tmp_path)
    (out.root / "pg_wal").symlink_to(out.dir)
    (out.root / "global").mkdir()
    (out.root / "global/pg_control").symlink_to(out.victim)
    os.link(out.victim, out.root / "PG_VERSION")
    datadir.extract_tar(_tar(("PG_VERSION", "file", "16\n"), ("pg_wal", "dir", ""),
                             ("pg_wal/archive_status", "dir", ""),
                             ("pg_wal/victim", "file", "wal"),
                             ("global/pg_control", "file", "control")),
                        str(out.root), delta=delta)
    out.unchanged()
    assert (out.root / "PG_VERSION").read_bytes() == b"16\n"
    assert not (out.root / "pg_wal").is_symlink() and (out.root / "pg_wal/archive_status").is_dir()
    assert (out.root / "pg_wal/victim").read_bytes() == b"wal"
    assert (out.root / "global/pg_control").read_bytes() == b"control"
    assert not (out.root / "global/pg_control").is_symlink()


def test_a_delta_extraction_writes_a_plain_file_in_place(tmp_path: Path) -> None:
    from keepwell.sources.postgres.datadir import extract_tar

    root = tmp_path / "root"
    (root / "base").mkdir(parents=True)
    (root / "base/1").write_bytes(b"a" * 5000)
    before = os.stat(root / "base/1").st_ino
    stats = extract_tar(_tar(("base/1", "file", b"a" * 4096 + b"b" * 1000)), str(root), delta=True)
    assert (root / "base/1").read_bytes() == b"a" * 4096 + b"b" * 1000
    assert os.stat(root / "base/1").st_ino == before and stats.written_bytes < 5096


def _segment_file(path: Path, sysid: int, seed: int) -> Path:
    """A completed segment: a valid long page header, then bytes that compress, written some
    time ago (as PostgreSQL leaves a segment it has finished)."""
    import struct

    head = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, 1, 0, 0, sysid, 16 << 20, 8192)
    body = b"".join(f"{seed}:{i};".encode() for i in range(120_000))
    path.write_bytes(head + body[: (1 << 20) - len(head)])
    os.utime(path, (1_700_000_000, 1_700_000_000))
    return path


def test_a_segment_overwritten_while_it_is_archived_is_not_committed(tmp_path: Path) -> None:
    """Segments are hashed first and compressed later from the page cache: one that changes in
    between (recycled by PostgreSQL after another push acknowledged it) fails the push, and no
    snapshot records it."""
    from keepwell.backends.local import LocalBackend
    from keepwell.errors import IntegrityError
    from keepwell.repository import Repository
    from keepwell.sources.postgres.archive import WalArchive, WalItem

    first = _segment_file(tmp_path / "000000010000000000000001", 42, 1)
    second = _segment_file(tmp_path / "000000010000000000000002", 42, 2)
    repo = Repository.init(LocalBackend(str(tmp_path / "repo")), "pw")
    try:
        def overwrite_second(name: str, _fields: dict[str, Any]) -> None:
            if name == "bytes":  # the first segment is stored: the second is not read yet
                repo.events.unsubscribe(overwrite_second)
                with open(second, "r+b") as f:
                    f.seek(4096)
                    f.write(b"recycled" * 512)

        repo.events.subscribe(overwrite_second)
        items = [WalItem(p.name, str(p)) for p in (first, second)]
        with pytest.raises(IntegrityError, match="000000010000000000000002 changed"):
            WalArchive(repo, "main").push(items)
        assert [s for s in repo.list_snapshots() if s.kind == KIND_WAL] == []
        # once whole again, both are archived, each with the hash of what was stored
        result = WalArchive(repo, "main").push(items)
        assert result.stored == [first.name, second.name]
        snap = repo.find_snapshot(str(result.snapshot_id))
        import blake3

        stored = b"".join(repo.iter_file(snap, "wal/00000001/000000010000000000000002"))
        assert stored == second.read_bytes()
        assert blake3.blake3(stored).hexdigest() == result.digests[second.name]
    finally:
        repo.close()
