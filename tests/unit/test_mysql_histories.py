"""Which snapshots belong to which server under one name, and what a new snapshot may join:
identities, histories, admission and planning across histories, on snapshot records (the
integration tests run the same rules against real servers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keepwell.backends.memory import MemoryBackend
from keepwell.errors import IntegrityError, KeepwellError, SourceError, UsageError
from keepwell.repository import Repository
from keepwell.repository.retention import Policy
from keepwell.repository.snapshot import Snapshot
from keepwell.sources.mysql import KIND_BINLOG
from keepwell.sources.mysql.admission import admit, discontinuity
from keepwell.sources.mysql.binlog import BinlogHead
from keepwell.sources.mysql.catalog import ServerArchive
from keepwell.sources.mysql.connection import ServerInfo
from keepwell.sources.mysql.dumpfilter import DumpInventory, filter_dump, lines_of
from keepwell.sources.mysql.identity import same_server
from keepwell.sources.mysql.logical import builtin_account
from keepwell.sources.mysql.operations import forget_plan
from keepwell.sources.mysql.plan import Target, plan
from keepwell.sources.mysql.restore import spool_binlog

T0 = datetime(2026, 12, 1, tzinfo=UTC)
A = {"flavor": "mariadb", "server_id": 1, "server_uuid": None,
     "initialized": "2026-01-01T00:00:00Z", "hostname": "db1", "datadir": "/var/lib/mysql/"}
B = {**A, "initialized": "2026-06-01T00:00:00Z", "hostname": "db2"}


def _snap(n: int, kind: str, source: dict[str, Any], minutes: int) -> Snapshot:
    return Snapshot(id=f"{n:02d}" + "0" * 62, time=T0 + timedelta(minutes=minutes),
                    host="prod", username="root", paths=[], tags=[], kind=kind, tree="",
                    source=source)


def _base(n: int, server: dict[str, Any], pos: tuple[str, int], minutes: int,
          **extra: Any) -> Snapshot:
    return _snap(n, "mysql-logical", {"server": server, "binlog_file": pos[0],
                                      "binlog_pos": pos[1], **extra}, minutes)


def _binlogs(n: int, server: dict[str, Any], files: list[tuple[str, int]], minutes: int,
             **extra: Any) -> Snapshot:
    synced = (T0 + timedelta(minutes=minutes)).timestamp()
    return _snap(n, "mysql-binlog", {"server": server, "synced_at": synced, "files": [
        {"name": name, "size": size, "closed": True, "created": 1000 + n,
         "gtid_list": [], "first_time": None, "last_time": None, "gtids": {}}
        for name, size in files], **extra}, minutes)


def _info(identity: dict[str, Any]) -> ServerInfo:
    return ServerInfo(version="10.11.19-MariaDB", flavor="mariadb",
                      server_id=identity["server_id"], server_uuid=None, log_bin=True,
                      binlog_basename="/var/lib/mysql/binlog", datadir=identity["datadir"],
                      hostname=identity["hostname"], gtid_pos="",
                      initialized=identity["initialized"])


def test_identities_compare_what_both_know() -> None:
    assert same_server(A, {**A, "hostname": "renamed", "datadir": "/srv/moved/"})
    assert not same_server(A, B)
    assert not same_server(A, {**A, "server_id": 2})
    legacy = {"server_id": 1, "server_uuid": None, "flavor": "mariadb"}
    assert same_server(legacy, A) and same_server(legacy, B)


def test_legacy_snapshots_join_the_first_history_and_another_server_starts_its_own() -> None:
    legacy = {"server_id": 1, "server_uuid": None, "flavor": "mariadb"}
    archive = ServerArchive.build([
        _base(1, legacy, ("binlog.000001", 300), 0),
        _binlogs(2, legacy, [("binlog.000001", 900)], 1),
        _base(3, A, ("binlog.000002", 400), 2),
        _base(4, B, ("binlog.000001", 350), 3),  # another server, undeclared (old keepwell)
    ])
    first, second = archive.catalogs
    assert [b.snapshot_id[:2] for b in first.bases] == ["01", "03"]
    assert first.identity["initialized"] == A["initialized"]
    assert [b.snapshot_id[:2] for b in second.bases] == ["04"]
    assert archive.undeclared() == [second]
    assert "two servers under this name" in archive.problems()[0]


def test_a_declared_history_is_current_even_while_an_old_stream_still_writes() -> None:
    archive = ServerArchive.build([
        _base(1, A, ("binlog.000001", 300), 0),
        _base(2, {**B, "history": 1}, ("binlog.000001", 350), 5, new_server=True),
        _binlogs(3, A, [("binlog.000002", 900)], 9),  # the old server's stream, later
    ])
    assert archive.current is archive.catalogs[1]
    assert archive.undeclared() == [] and archive.problems() == []


def test_admission_refuses_another_server_unless_declared() -> None:
    archive = ServerArchive.build([_base(1, A, ("binlog.000003", 300), 0)])
    on_server = [("binlog.000001", 5000), ("binlog.000002", 400)]
    with pytest.raises(SourceError, match="refusing to file another server's data"):
        admit(archive, _info(B), "prod", on_server)
    adm = admit(archive, _info(B), "prod", on_server, new_server=True)
    assert adm.history == 1 and adm.declared
    assert adm.source(_info(B))["new_server"] is True
    # the server the name holds, its binary log going on: --new-server changes nothing
    same = admit(archive, _info(A), "prod", [("binlog.000003", 900)], new_server=True)
    assert same.history == 0 and not same.declared and "ignored" in same.notes[0]


def test_a_binary_log_that_no_longer_continues_the_archive_is_refused() -> None:
    archive = ServerArchive.build([
        _base(1, A, ("binlog.000001", 300), 0),
        _binlogs(2, A, [("binlog.000001", 900), ("binlog.000002", 800)], 1),
    ])
    cat = archive.current
    assert cat is not None
    assert discontinuity(cat, [("binlog.000002", 800), ("binlog.000003", 10)]) is None
    assert "newest binary log is binlog.000001" in str(
        discontinuity(cat, [("binlog.000001", 4000)]))  # RESET MASTER
    assert "named mysql-bin" in str(discontinuity(cat, [("mysql-bin.000009", 400)]))
    assert "holds 500 bytes" in str(
        discontinuity(cat, [("binlog.000002", 500), ("binlog.000003", 10)]))
    other = BinlogHead(4242, ())
    assert "is not the archived" in str(discontinuity(
        cat, [("binlog.000002", 800), ("binlog.000003", 10)], heads=lambda name: other))
    with pytest.raises(SourceError, match="no longer continues"):
        admit(archive, _info(A), "prod", [("binlog.000001", 4000)])
    assert admit(archive, _info(A), "prod", [("binlog.000001", 4000)],
                 new_server=True).history == 1


def test_plan_never_mixes_histories_and_refuses_an_ambiguous_target() -> None:
    archive = ServerArchive.build([
        _base(1, A, ("binlog.000001", 300), 0),
        _binlogs(2, A, [("binlog.000001", 900), ("binlog.000002", 800)], 1),
        _base(3, {**B, "history": 1}, ("binlog.000001", 350), 5, new_server=True),
        _binlogs(4, {**B, "history": 1}, [("binlog.000001", 700), ("binlog.000002", 600)], 6,
                 new_server=True),
    ])

    def fetch(f: Any) -> str:
        raise AssertionError("a position target needs no binlog read")

    target = Target.of(None, "binlog.000002:500", None)
    assert target is not None
    with pytest.raises(UsageError, match="can be reached in 2 histories"):
        plan(archive, target, fetch)
    p = plan(archive, target, fetch, base_id="01")
    assert p.base.snapshot_id.startswith("01") and p.history == 0
    assert {f.snapshot_id[:2] for f in p.files} == {"02"}
    p = plan(archive, target, fetch, base_id="03")
    assert p.history == 1 and {f.snapshot_id[:2] for f in p.files} == {"04"}
    assert {f.history for f in p.files} == {p.base.history}
    # only the first history's files reach this far
    far = Target.of(None, "binlog.000002:750", None)
    assert far is not None and plan(archive, far, fetch).history == 0


DUMP = (b"-- MariaDB dump\n--\n-- Current Database: `shop`\n--\n"
        b"-- Table structure for table `items`\n--\nCREATE TABLE `items` (id int);\n"
        b"INSERT INTO `items` VALUES " + b"(1)," * 3000 + b"(2);\n"
        b"-- Table structure for table `a``b`\n--\n"
        b"-- Temporary table structure for view `v`\n--\n"
        b"-- Current Database: `other`\n--\n-- Dump completed\n")


@pytest.mark.parametrize("step", [1, 7, 64, 4096])
def test_dump_inventory_reads_section_comments_across_chunk_boundaries(step: int) -> None:
    inv = DumpInventory()
    for i in range(0, len(DUMP), step):
        inv.feed(memoryview(DUMP)[i:i + step])
    assert inv.databases == {"shop": ["items", "a`b", "v"], "other": []}


def test_a_table_that_matches_nothing_sends_nothing() -> None:
    out: list[bytes] = []
    with pytest.raises(SourceError, match="table nosuch of database shop is not in the dump"):
        out.extend(filter_dump(lines_of([DUMP]), "shop", "nosuch"))
    assert out == []
    got = b"".join(filter_dump(lines_of([DUMP]), ["shop"], ["items", "v"]))
    assert b"CREATE TABLE `items`" in got and b"view `v`" in got


def test_builtin_accounts() -> None:
    for user, host, role in [("root", "%", False), ("mariadb.sys", "localhost", False),
                             ("mysql", "localhost", False), ("PUBLIC", "", True),
                             ("mysql.session", "localhost", False), ("", "localhost", False)]:
        assert builtin_account(user, host, role), (user, host)
    for user, host, role in [("mysql", "%", False), ("public", "", True), ("app", "%", False),
                             ("PUBLIC", "%", False)]:
        assert not builtin_account(user, host, role), (user, host)


def test_forget_keeps_each_history_whole_and_drops_a_history_without_bases() -> None:
    repo = Repository.init(MemoryBackend(), "pw")
    made = [
        _base(1, A, ("binlog.000001", 300), 0),
        _binlogs(2, A, [("binlog.000001", 900), ("binlog.000002", 800)], 1),
        _base(3, {**B, "history": 1}, ("binlog.000001", 350), 5, new_server=True),
        _binlogs(4, {**B, "history": 1}, [("binlog.000001", 700)], 6, new_server=True),
        _base(5, {**B, "history": 1}, ("binlog.000002", 100), 7),
        _binlogs(6, {**B, "history": 1}, [("binlog.000002", 600)], 8),
    ]
    ids = {}
    for s in made:
        with repo.new_snapshot(s.kind, [], host="prod") as w:
            w.source.update(s.source)
            ids[s.id[:2]] = w.commit(time_=s.time).id
    result = forget_plan(repo, Policy(last=1))
    gone = {k for k, v in ids.items() if v in result.bases + result.binlogs}
    # the newest base is history 1's second; the first history keeps no base, so its binlogs
    # go too; history 1 keeps what its kept base rolls forward with
    assert gone == {"01", "02", "03", "04"}
    assert result.binlog_floor == "binlog.000002"


@pytest.mark.parametrize("name", ["../../victim.000001", "/ABS/victim.000001",
                                  "sub/victim.000001"])
def test_a_forged_binlog_name_is_refused_and_nothing_is_written_outside_the_spool(
        tmp_path: Path, name: str) -> None:
    name = name.replace("/ABS", str(tmp_path))
    victim = tmp_path / "victim.000001"
    victim.write_bytes(b"precious")
    (tmp_path / "sub").mkdir()
    repo = Repository.init(MemoryBackend(), "pw")
    with repo.new_snapshot(KIND_BINLOG, ["binlog"], host="prod") as w:
        w.add_bytes("binlog/victim.000001", b"forged")
        w.source.update(_binlogs(1, A, [(name, 6)], 0).source)
        snap = w.commit()
    (f,) = ServerArchive.build(repo.list_snapshots()).catalogs[0].files.values()
    spool = tmp_path / "spool"  # spool_binlog writes in spool/<history>/
    spool.mkdir()
    with pytest.raises(KeepwellError) as err:
        spool_binlog(repo, f, str(spool))
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool", "sub", "victim.000001"]
    assert not any((tmp_path / "sub").iterdir())
    assert isinstance(err.value, IntegrityError)
    assert f"snapshot {snap.short_id} holds a binary log named" in str(err.value)
