"""WAL archiving against real clusters: push, fetch, spool, and every way it can go wrong."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.servers.postgres import (
    PgCluster,
    PgEnv,
    as_pg_user,
    chown_pg,
    wal_hook_argv,
)
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def hook(env: PgEnv, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(as_pg_user([*wal_hook_argv(), *args]), env=env.env(),
                         capture_output=True, text=True, timeout=120)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def copy_segment(c: PgCluster, name: str, dest_dir: Path) -> Path:
    dest_dir.mkdir(exist_ok=True)
    chown_pg(dest_dir)
    dest = dest_dir / name
    shutil.copy(c.datadir / "pg_wal" / name, dest)
    chown_pg(dest)
    return dest


def current_segment(c: PgCluster) -> str:
    return str(c.scalar("SELECT pg_walfile_name(pg_current_wal_lsn())"))


def test_sync_push_fetch_repush_conflict_and_foreign(pg_env: PgEnv) -> None:
    c = PgCluster(pg_env.workdir).initdb()
    c.set_archive_command(pg_env.wal_hook_command("push", "%p"))
    c.start()
    c.sql("CREATE TABLE t AS SELECT generate_series(1, 10000) AS i")
    first = current_segment(c)
    c.switch_wal()
    c.wait_archived()

    # fetch: the archived file comes back byte for byte; an unknown one exits 1, one line
    out = pg_env.workdir / "fetched"
    out.mkdir()
    chown_pg(out)
    hook(pg_env, "fetch", first, str(out / "RECOVERYXLOG"), check=True)
    assert (out / "RECOVERYXLOG").read_bytes() == (c.datadir / "pg_wal" / first).read_bytes()
    missing = hook(pg_env, "fetch", "0000000100000000000000AA", str(out / "RECOVERYXLOG"))
    assert missing.returncode == 1
    assert "not in the repository" in missing.stderr and missing.stderr.count("\n") == 1

    # re-pushing the identical segment is fine; a different one under that name is refused
    seg = copy_segment(c, first, pg_env.workdir / "copies")
    hook(pg_env, "push", str(seg), check=True)
    data = bytearray(seg.read_bytes())
    data[-100] ^= 0xFF
    seg.write_bytes(bytes(data))
    conflict = hook(pg_env, "push", str(seg))
    assert conflict.returncode == 1 and "different file with this name" in conflict.stderr

    # a segment from another cluster is refused by its system identifier
    other = PgCluster(pg_env.workdir, "other").initdb().start()
    other.sql("SELECT 1")
    foreign = copy_segment(other, current_segment(other), pg_env.workdir / "foreign")
    refused = hook(pg_env, "push", str(foreign))
    assert refused.returncode == 1 and "system identifier" in refused.stderr
    spool = pg_env.workdir / "spool-foreign"
    async_refused = hook(pg_env, "push", "--async", "--spool", str(spool), str(foreign))
    assert async_refused.returncode == 1 and "system identifier" in async_refused.stderr
    other.stop("immediate")


def test_killed_push_loses_nothing(pg_env: PgEnv) -> None:
    c = PgCluster(pg_env.workdir).initdb().start()
    c.sql("CREATE TABLE t AS SELECT generate_series(1, 50000) AS i")
    name = current_segment(c)
    c.switch_wal()
    seg = copy_segment(c, name, pg_env.workdir / "copies")
    for delay in (0.05, 0.2, 0.35):
        proc = subprocess.Popen(as_pg_user([*wal_hook_argv(), "push", str(seg)]),
                                env=pg_env.env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Whatever the kills left, the retry archives the segment (or finds it archived, identical).
    hook(pg_env, "push", str(seg), check=True)
    info = json.loads(pg_env.keepwell("info", "--json").stdout)
    assert info["wal"]["timelines"]["1"]["last"] == name
    # the killed async push leaves at most a temp file; the retry acknowledges the segment
    spool = pg_env.workdir / "spool"
    proc = subprocess.Popen(as_pg_user([*wal_hook_argv(), "push", "--async", "--spool",
                                        str(spool), str(seg)]),
                            env=pg_env.env(), start_new_session=True)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    hook(pg_env, "push", "--async", "--spool", str(spool), str(seg), check=True)


def test_full_spool_refuses_loudly_then_catches_up(pg_env: PgEnv) -> None:
    spool = pg_env.workdir / "spool"
    c = PgCluster(pg_env.workdir).initdb(archive_timeout=0)
    c.set_archive_command(pg_env.wal_hook_command(
        "push", "--async", "--spool", str(spool), "--spool-max", "40M", "%p"))
    c.start()
    c.sql("CREATE TABLE t (i int)")
    c.switch_wal()
    c.wait_archived()
    pg_env.keepwell("backup", "--physical", "--db-url", c.url())

    # The repository becomes unwritable: uploads fail, the spool fills, pushes are refused.
    def repo_writable(on: bool) -> None:
        subprocess.run(["find", str(pg_env.repo), "-type", "d", "-exec", "chmod",
                        "u+w" if on else "u-w", "{}", "+"], check=True)

    repo_writable(False)
    try:
        for _ in range(5):
            c.sql("INSERT INTO t SELECT generate_series(1, 1000)")
            c.switch_wal()
        deadline = time.monotonic() + 60
        while "is full" not in c.log_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "WAL spool" in c.log_text() and "is full" in c.log_text()
        assert "is full" in (spool / "ALERT").read_text() or \
            "upload failed" in (spool / "ALERT").read_text()
        check = pg_env.keepwell("check", "--spool", str(spool), "--json", check=False)
        assert check.returncode == 1
        assert json.loads(check.stdout)["spool"]["alert"]
        ready = list((c.datadir / "pg_wal" / "archive_status").glob("*.ready"))
        assert ready, "the segments that did not fit must stay in pg_wal"
    finally:
        repo_writable(True)
    c.wait_archived(timeout=90)
    deadline = time.monotonic() + 60
    while True:
        check = pg_env.keepwell("check", "--spool", str(spool), "--json", check=False)
        data = json.loads(check.stdout)
        if data["spool"]["ready_segments"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert data["wal"]["gaps"] == [] and data["physical"][0]["complete"], data
    assert check.returncode == 0, data["problems"]


def test_missing_segment_is_reported(pg_env: PgEnv) -> None:
    c = PgCluster(pg_env.workdir).initdb()
    c.set_archive_command(pg_env.wal_hook_command("push", "%p"))
    c.start()
    c.sql("CREATE TABLE t (i int)")
    pg_env.keepwell("backup", "--physical", "--db-url", c.url())
    for _ in range(3):
        c.sql("INSERT INTO t SELECT generate_series(1, 1000)")
        c.switch_wal()
    c.wait_archived()
    assert pg_env.keepwell("check").returncode == 0

    info = json.loads(pg_env.keepwell("info", "--json").stdout)
    last = info["wal"]["timelines"]["1"]["last"]
    victim = last[:-1] + format(int(last[-1], 16) - 1, "X")
    forget = (
        "import os, sys\n"
        "from keepwell.repository import open_repository\n"
        "r = open_repository(os.environ['KEEPWELL_REPOSITORY'],"
        " open(os.environ['KEEPWELL_PASSWORD_FILE']).read().strip())\n"
        "ids = [s.id for s in r.list_snapshots('postgres-wal')"
        " if sys.argv[1] in s.source['files']]\n"
        "r.forget(ids)\n"
    )
    subprocess.run(as_pg_user([str(Path(wal_hook_argv()[0]).parent / "python")
                               if wal_hook_argv()[0].endswith("keepwell-wal")
                               else wal_hook_argv()[0], "-c", forget, victim]),
                   env=pg_env.env(), check=True)
    check = pg_env.keepwell("check", "--json", check=False)
    assert check.returncode == 1
    problems = " ".join(json.loads(check.stdout)["problems"])
    assert "gap" in problems and victim in problems


def test_sync_push_through_the_uploader_is_in_the_repository_on_return(pg_env: PgEnv) -> None:
    spool = pg_env.workdir / "spool"
    c = PgCluster(pg_env.workdir).initdb()
    c.set_archive_command(pg_env.wal_hook_command("push", "--spool", str(spool), "%p"))
    c.start()
    c.sql("CREATE TABLE t (i int)")
    for _ in range(3):
        c.sql("INSERT INTO t SELECT generate_series(1, 1000)")
        c.switch_wal()
    c.wait_archived()
    last_done = sorted(p.stem for p in (c.datadir / "pg_wal" / "archive_status").glob("*.done"))
    info = json.loads(pg_env.keepwell("info", "--json").stdout)
    assert info["wal"]["timelines"]["1"]["last"] == last_done[-1]
    assert info["wal"]["gaps"] == []


def test_read_ahead_segments_are_acknowledged_without_python(pg_env: PgEnv) -> None:
    spool = pg_env.workdir / "spool"
    c = PgCluster(pg_env.workdir).initdb(archive_timeout=0)
    c.set_archive_command("/bin/false")
    c.start()
    c.sql("CREATE TABLE t (i int)")
    for _ in range(4):
        c.sql("INSERT INTO t SELECT generate_series(1, 1000)")
        c.switch_wal()
    status = c.datadir / "pg_wal" / "archive_status"
    ready = sorted(p.name.removesuffix(".ready") for p in status.glob("*.ready"))
    assert len(ready) >= 4
    # the uploader reads the ready segments ahead from pg_wal while archive_command fails
    hook(pg_env, "upload", "--spool", str(spool), "--pg-wal", str(c.datadir / "pg_wal"),
         "--idle-exit", "1", check=True)
    assert all((spool / "done" / name).exists() for name in ready)

    # the shell fast path acknowledges them alone: its Python hook here would only fail
    def reload(command: str) -> None:
        c.set_archive_command(command)
        c.sql("SELECT pg_reload_conf()")

    reload(pg_env.wal_push_command("--async", "--spool", str(spool), "%p", hook="/bin/false"))
    c.wait_archived(timeout=30)
    info = json.loads(pg_env.keepwell("info", "--json").stdout)
    assert info["wal"]["timelines"]["1"]["last"] == ready[-1] and info["wal"]["gaps"] == []
    # a segment nobody uploaded yet goes to the hook (which fails here): it stays ready
    c.sql("INSERT INTO t SELECT generate_series(1, 1000)")
    fresh = current_segment(c)
    c.switch_wal()
    wait_for(lambda: c.scalar("SELECT last_failed_wal FROM pg_stat_archiver") == fresh,
             "the hook to refuse the fresh segment")
    assert (status / f"{fresh}.ready").exists()
    reload(pg_env.wal_push_command("--async", "--spool", str(spool), "%p"))
    c.wait_archived(timeout=60)
    assert (spool / "done" / fresh).exists() or (spool / "ready" / fresh).exists()
