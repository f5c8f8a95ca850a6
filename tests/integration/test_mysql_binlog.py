"""Binlog archiving from real MariaDB servers: streaming through dropped connections without
gaps or duplicates, a purged binlog reported as a gap, foreign servers refused, retention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keepwell.sources.mysql.binlog import FORMAT_DESCRIPTION_EVENT, iter_events
from keepwell.sources.mysql.catalog import load_catalog
from tests.servers.mariadb import (
    KeepwellRepo,
    MariaDBServer,
    mariadb_available,
    mariadb_server,
    rows,
)
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mariadb_available(), reason="MariaDB is not installed"),
]


@pytest.fixture
def server() -> Iterator[MariaDBServer]:
    with mariadb_server(server_id=31, name="bl") as s:
        s.sql("CREATE DATABASE app")
        s.sql("CREATE TABLE app.t (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(50))")
        yield s


def _events(data: bytes) -> list[tuple[int, int, bytes]]:
    """(position, type, bytes) of each event; the format description's flags differ between a
    streamed copy and the file on disk, so it is compared by type only."""
    import io

    out = []
    for pos, hdr, body in iter_events(io.BytesIO(data)):
        out.append((pos, hdr[1], b"" if hdr[1] == FORMAT_DESCRIPTION_EVENT else body))
    return out


def _archived(repo: KeepwellRepo) -> dict[str, bytes]:
    with repo.open() as r:
        cat = load_catalog(r)
        out = {}
        for f in cat.ordered():
            snap = r.find_snapshot(f.snapshot_id)
            out[f.name] = b"".join(r.iter_file(snap, f"binlog/{f.name}"))
        return out


def _wait_caught_up(repo: KeepwellRepo, server: MariaDBServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        name, _size = server.sql("SHOW BINARY LOGS")[-1]
        disk = (server.datadir / name).read_bytes()
        got = _archived(repo).get(name)
        if got is not None and _events(got) == _events(disk):
            return
        time.sleep(0.3)
    raise AssertionError("the stream did not catch up")


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def _write(server: MariaDBServer, n: int) -> None:
    for i in range(n):
        server.sql(f"INSERT INTO app.t (v) VALUES ('row {i}')")


def _kill_dump_threads(server: MariaDBServer, timeout: float = 30) -> int:
    """Drop the stream's replication connection (once it is connected)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dumps = [r[0] for r in server.sql("SHOW PROCESSLIST") if r[4] == "Binlog Dump"]
        for thread in dumps:
            server.sql(f"KILL {thread}")
        if dumps:
            return len(dumps)
        time.sleep(0.1)
    return 0


def test_stream_survives_dropped_connections_without_gaps_or_duplicates(
        server: MariaDBServer, tmp_path: Path) -> None:
    repo = KeepwellRepo(tmp_path)
    _write(server, 3)
    repo.run("backup", "--logical", "--db-url", server.url)
    proc = repo.popen("binlog-stream", "--db-url", server.url, "--interval", "0.3")
    try:
        _write(server, 20)
        server.sql("FLUSH BINARY LOGS")
        _write(server, 20)
        _wait_caught_up(repo, server)
        for _ in range(2):
            assert _kill_dump_threads(server) == 1
            _write(server, 15)  # written while the stream is disconnected
            server.sql("FLUSH BINARY LOGS")
            _write(server, 5)
            time.sleep(0.5)
        _wait_caught_up(repo, server)
    finally:
        rc, out, err = _stop(proc)
    assert rc == 0, err
    assert err.count("reconnecting") >= 2
    archived = _archived(repo)
    on_server = [n for n, _ in server.sql("SHOW BINARY LOGS")]
    assert sorted(archived) == on_server
    for name in on_server:
        assert _events(archived[name]) == _events((server.datadir / name).read_bytes()), name
    report = repo.json("check")
    assert report["ok"] and report["gaps"] == []
    # the streamed binlogs (current file included) replay onto the base exactly
    end = server.sql("SHOW MASTER STATUS")[0]
    with mariadb_server(server_id=33, name="dst") as target:
        repo.run("restore", "--target-db-url", target.url, "--target-position",
                 f"{end[0]}:{end[1]}")
        assert rows(target, "SELECT COUNT(*), MAX(id) FROM app.t") == [(83, 83)]


def test_purged_binlog_is_reported_as_a_gap(server: MariaDBServer, tmp_path: Path) -> None:
    repo = KeepwellRepo(tmp_path)
    repo.run("backup", "--logical", "--db-url", server.url)
    proc = repo.popen("binlog-stream", "--db-url", server.url, "--interval", "0.3")
    _write(server, 5)
    server.sql("FLUSH BINARY LOGS")
    _write(server, 5)
    _wait_caught_up(repo, server)
    rc, _, err = _stop(proc)
    assert rc == 0, err
    # while nobody archives: the server rotates twice and purges what was not archived
    _write(server, 5)
    server.sql("FLUSH BINARY LOGS")
    _write(server, 5)
    server.sql("FLUSH BINARY LOGS")
    server.sql("FLUSH BINARY LOGS")
    current = server.sql("SHOW MASTER STATUS")[0][0]

    def purged() -> bool:
        server.sql(f"PURGE BINARY LOGS TO '{current}'")
        return bool(server.sql("SHOW BINARY LOGS")[0][0] != "binlog.000002")

    # MariaDB purges only files its binlog checkpoint has passed: asked again until it has
    wait_for(purged, "the server to purge the binary logs nobody archived")
    purged_first = server.sql("SHOW BINARY LOGS")[0][0]
    _write(server, 5)
    proc = repo.popen("binlog-stream", "--db-url", server.url, "--interval", "0.3")
    _wait_caught_up(repo, server)
    rc, _, err = _stop(proc)
    assert rc == 3
    assert "GAP: binlog.000002" in err and "purged by the server" in err
    res = repo.run("check", check=False)
    assert res.returncode == 1
    assert f"binlogs missing between binlog.000002 and {purged_first}" in res.stdout
    info = repo.json("info")
    assert info["gaps"][0]["missing"][0].startswith("binlog.000002 after offset ")
    # the base before the gap cannot be rolled past it
    assert info["bases"][0]["reach"].startswith("binlog.000002:")
    assert not info["gaps"][1:]


def test_foreign_server_is_refused(server: MariaDBServer, tmp_path: Path) -> None:
    repo = KeepwellRepo(tmp_path)
    repo.run("binlog-push", "--flush", "--db-url", server.url, "--server-name", "prod")
    with mariadb_server(server_id=99, name="other") as other:
        res = repo.run("binlog-push", "--flush", "--db-url", other.url, "--server-name", "prod",
                       check=False)
        assert res.returncode == 1
        assert "refusing to file another server's data" in res.stderr
        assert res.stderr.count("\n") == 1
        proc = repo.popen("binlog-stream", "--db-url", other.url, "--server-name", "prod")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and "refusing to file another server's data" in err


def test_push_check_info_and_forget_keep_needed_binlogs(server: MariaDBServer,
                                                        tmp_path: Path) -> None:
    repo = KeepwellRepo(tmp_path)
    for _day in range(3):
        _write(server, 10)
        repo.run("backup", "--logical", "--db-url", server.url)
        _write(server, 10)
        repo.run("binlog-push", "--flush", "--db-url", server.url)
    info = repo.json("info")
    assert len(info["bases"]) == 3 and all(b["reach"] for b in info["bases"])
    assert info["window"]["from"] and info["window"]["to"]
    (who,) = info["binlogs"]["servers"]
    assert who["flavor"] == "mariadb" and who["server_id"] == 31
    assert who["server_uuid"] is None and who["initialized"] and who["history"] == 0
    again = repo.json("binlog-push", "--db-url", server.url)
    assert again["stored"] == [] and len(again["skipped"]) == 3
    plan = repo.json("forget", "--keep-last", "1", "--dry-run")
    assert len(plan["bases"]) == 2 and len(plan["binlogs"]) == 2
    repo.run("forget", "--keep-last", "1")
    report = repo.json("check")
    assert report["ok"] and len(report["bases"]) == 1
    assert report["bases"][0]["reach"]
    # the kept base still rolls forward to the end of the archive
    last = server.sql("SHOW BINARY LOGS")[-2]
    with mariadb_server(server_id=32, name="dst") as target:
        repo.run("restore", "--target-db-url", target.url, "--target-position",
                 f"{last[0]}:{last[1]}")
        assert rows(target, "SELECT COUNT(*) FROM app.t") == [60]
    assert os.path.exists(repo.path)


def test_check_fails_on_an_archived_binlog_a_restore_could_not_read(
        server: MariaDBServer, tmp_path: Path) -> None:
    """A binlog whose chunks lie in a pack no stored index lists (an index write that failed
    under a long-lived stream) cannot be replayed: check says so, as it does for a gap."""
    from keepwell.repository.format import KIND_INDEX
    from keepwell.repository.index import decode_index

    repo = KeepwellRepo(tmp_path)
    repo.run("backup", "--logical", "--db-url", server.url)
    _write(server, 10)
    repo.run("binlog-push", "--flush", "--db-url", server.url)
    assert repo.json("check")["ok"]
    r = repo.open()
    try:
        snap = next(s for s in r.list_snapshots() if s.kind == "mysql-binlog")
        name = str(snap.source["files"][-1]["name"])
        pack = r.locate(r.find_node(snap, f"binlog/{name}").content[0]).pack
        for info in r.backend.list("index/"):
            index = info.name.split("/", 1)[1]
            if pack in [bytes(p) for p in decode_index(r.get_object("index", index,
                                                                    KIND_INDEX)).packs]:
                r.backend.delete(info.name)
    finally:
        r.close()
    res = repo.run("check", "--json", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    problems = " ".join(json.loads(res.stdout)["problems"])
    assert name in problems and "cannot be read" in problems, problems


def test_a_stalled_stream_claims_only_what_the_server_had_sent(server: MariaDBServer,
                                                               tmp_path: Path) -> None:
    """A row committed while the stream is stalled (in the network, in the client) is not yet
    archived: the archive's synced moment stays before it, and a restore to a time after it is
    refused until the stream delivers it."""
    repo = KeepwellRepo(tmp_path)
    repo.run("backup", "--logical", "--db-url", server.url)
    spool = tmp_path / "spool"
    proc = repo.popen("binlog-stream", "--db-url", server.url, "--interval", "0.3",
                      "--spool", str(spool))
    stream = client = None
    try:
        _wait_caught_up(repo, server)

        def child() -> int | None:
            out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
            return int(out.stdout.split()[0]) if out.stdout.split() else None

        client = wait_for(child, "the stream's binlog client")
        current = spool / server.sql("SHOW MASTER STATUS")[0][0]
        size = current.stat().st_size
        os.kill(proc.pid, signal.SIGSTOP)  # no sync between A arriving and the stall
        stream = proc.pid
        server.sql("INSERT INTO app.t (v) VALUES ('A')")
        wait_for(lambda: current.stat().st_size > size, "row A in the spool")
        os.kill(client, signal.SIGSTOP)  # the replication stream stalls
        server.sql("INSERT INTO app.t (v) VALUES ('B')")
        committed = time.time()
        # the clock past B's second (the archive keeps times to the second): a claim made from
        # the clock at the next sync would cover B
        wait_for(lambda: time.time() >= committed + 1.5, "the clock to pass B's commit",
                 interval=0.1)
        os.kill(proc.pid, signal.SIGCONT)
        stream = None

        def stored_a() -> bool:
            with repo.open() as r:
                f = load_catalog(r).files.get(current.name)
                return f is not None and f.size > size

        wait_for(stored_a, "a sync to store row A")
        with repo.open() as r:
            synced = load_catalog(r).synced_at
        assert synced is not None and synced < committed
        info = repo.json("info")
        assert datetime.fromisoformat(info["window"]["to"]).timestamp() < committed
        target = datetime.fromtimestamp(int(committed) + 1, UTC).isoformat()
        with mariadb_server(server_id=34, name="dst") as dst:
            res = repo.run("restore", "--target-db-url", dst.url, "--target-time", target,
                           check=False)
            assert res.returncode == 1 and "the binlog archive reaches only" in res.stderr
            # once the stream delivers B, the archive covers it
            os.kill(client, signal.SIGCONT)
            client = None
            _wait_caught_up(repo, server)

            def synced_past_b() -> bool:
                with repo.open() as r:
                    return (load_catalog(r).synced_at or 0) > committed

            wait_for(synced_past_b, "the synced moment to pass row B")
            repo.run("restore", "--target-db-url", dst.url, "--target-time", target)
            assert rows(dst, "SELECT v FROM app.t ORDER BY id") == ["A", "B"]
    finally:
        for pid in (stream, client):
            if pid is not None:
                os.kill(pid, signal.SIGCONT)
        rc, _, err = _stop(proc)
    assert rc == 0, err
