"""The daemon as a real process: budgets, retries with jitter, the breaker, crash recovery."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.control_support import (
    PASSWORD,
    WebhookSink,
    Workspace,
    max_overlap,
    scrape,
    write_random,
)

MiB = 1024 * 1024


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    w = Workspace(tmp_path)
    yield w
    w.close()


@pytest.fixture
def hook() -> Iterator[WebhookSink]:
    sink = WebhookSink()
    yield sink
    sink.close()



def test_caps_and_shared_bandwidth_budget_hold(ws: Workspace) -> None:
    budget = 2 * MiB
    repos = {"a": ws.repository("a"), "b": ws.repository("b")}
    sources = {}
    for name, repo in (("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b")):
        write_random(ws.root / "data" / name / "blob.bin", 3 * MiB // 2)
        sources[name] = {"kind": "files", "repository": repo, "paths": [f"data/{name}"],
                         "schedule": "* * * * * *"}
    ws.write_config({
        "repositories": {n: {"location": str(p), "password": "env:KW_TEST_PASSWORD"}
                         for n, p in repos.items()},
        "sources": sources,
        "limits": {"upload": budget, "upload_burst": "128KiB", "max_concurrent_jobs": 3,
                   "max_concurrent_per_repository": 2},
    })
    d = ws.daemon()
    port = d.metrics_port()
    d.wait_for(lambda: {r["source"] for r in ws.runs("status='succeeded'")} == set(sources),
               timeout=40, what="one backup of every source")
    metrics = scrape(port)
    assert d.stop() == 0

    first = {}
    for r in ws.runs("action='backup' AND status='succeeded'"):
        first.setdefault(r["source"], r)
    runs = list(first.values())
    assert all(r["bytes_uploaded"] >= 3 * MiB // 2 for r in runs)
    # Concurrency: never more than 3 at once, never more than 2 on repository a; and the caps
    # were reached, so they were what held the jobs back.
    intervals = [(r["started_at"], r["ended_at"]) for r in ws.runs("status != 'skipped'")]
    assert max_overlap(intervals) == 3
    on_a = [(r["started_at"], r["ended_at"]) for r in ws.runs("source LIKE 'a%'")]
    assert max_overlap(on_a) == 2
    # Bandwidth: bytes uploaded by the first (full) backups over the span in which they were
    # uploading (from the first upload's start to the last one's end, across all jobs).
    details = [json.loads(r["details"]) for r in runs]
    start = min(d["upload_started"] for d in details)
    end = max(d["upload_ended"] for d in details)
    total = sum(r["bytes_uploaded"] for r in runs)
    rate = total / (end - start)
    print(f"shared budget: measured {rate / MiB:.3f} MiB/s")
    assert abs(rate - budget) / budget < 0.10, f"measured {rate / MiB:.3f} MiB/s"
    # The same figures are visible in /metrics.
    uploaded = metrics["keepwell_upload_bytes_total"][0][1]
    assert uploaded >= total * 0.5
    assert metrics["keepwell_upload_limit_bytes_per_second"][0][1] == budget


def test_per_job_bandwidth_limit(ws: Workspace) -> None:
    repo = ws.repository("r")
    write_random(ws.root / "data" / "x.bin", 2 * MiB)
    ws.write_config({
        "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"x": {"kind": "files", "repository": "r", "paths": ["data"],
                          "upload_limit": "1MiB"}},
    })
    ws.cli("run", "x", check=True)
    (run,) = ws.runs("status='succeeded'")
    details = json.loads(run["details"])
    rate = run["bytes_uploaded"] / (details["upload_ended"] - details["upload_started"])
    print(f"per-job limit: measured {rate / MiB:.3f} MiB/s")
    assert abs(rate - MiB) / MiB < 0.10, f"measured {rate / MiB:.3f} MiB/s"


def test_daemon_backup_of_many_small_files_uses_worker_processes(ws: Workspace) -> None:
    """The daemon opens its repositories as the CLI does: a large tree of small files is read,
    chunked and stored by worker processes, and their uploads count in the job's bytes."""
    repo = ws.repository("r")
    files, size = 400, 4096
    for i in range(files):
        write_random(ws.root / "data" / f"d{i % 8}" / f"f{i}.bin", size)
    ws.write_config({
        "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"x": {"kind": "files", "repository": "r", "paths": ["data"],
                          "schedule": "* * * * * *"}},
    })
    d = ws.daemon()
    run = d.wait_for(lambda: ws.runs("action='backup' AND status='succeeded'"), timeout=60,
                     what="a backup of the tree")[0]
    assert d.stop() == 0
    assert run["bytes_uploaded"] >= files * size
    os.environ["KEEPWELL_TESTONLY_WEAK_KDF"] = "1"
    from keepwell.repository.repo import open_repository

    r = open_repository(str(repo), PASSWORD)
    try:
        snap = r.find_snapshot(run["snapshot_id"])
    finally:
        r.close()
    assert snap.summary["reader_processes"] >= 1
    assert snap.summary["files_new"] == files


def test_retries_back_off_with_jitter_and_breaker_opens_then_closes(
        ws: Workspace, hook: WebhookSink) -> None:
    repo = ws.repository("r")
    write_random(ws.root / "ok" / "f.bin", 10_000)
    base, cap = 0.4, 1.6
    ws.write_config({
        "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {
            "flaky": {"kind": "files", "repository": "r", "paths": ["missing"],
                      "schedule": "*/2 * * * * *"},
            "flaky2": {"kind": "files", "repository": "r", "paths": ["missing2"],
                       "schedule": "*/2 * * * * *"},
            "fine": {"kind": "files", "repository": "r", "paths": ["ok"],
                     "schedule": "*/2 * * * * *"},
        },
        "retries": {"attempts": 3, "base": base, "cap": cap},
        "circuit_breaker": {"failure_threshold": 3, "reset_after": "2s"},
        "notifications": [{"webhook": hook.url}],
        "limits": {"max_concurrent_jobs": 4},
    })
    d = ws.daemon()
    port = d.metrics_port()
    d.wait_for(lambda: len(hook.of("alert", "circuit_open")) == 2, timeout=30,
               what="both breakers to open")
    # Retries: attempt n waits a uniformly drawn delay in [0, min(cap, base * 2**(n-1))].
    retries = d.events("job_retry")
    assert len(retries) >= 4
    for ev in retries:
        assert 0 <= ev["delay"] <= min(cap, base * 2 ** (ev["attempt"] - 2)) + 1e-6
    assert len({ev["delay"] for ev in retries}) == len(retries), "delays must be jittered"
    runs = ws.runs("source='flaky' AND action='backup'")
    retried = [r for r in runs if r["trigger"] == "retry"]
    first = runs[0]
    assert retried and retried[0]["job_id"] == first["job_id"]
    # While open, scheduled runs of the paused source are recorded as skipped, not run.
    d.wait_for(lambda: ws.runs("source='flaky' AND status='skipped'"), timeout=10,
               what="a skipped run while the breaker is open")
    states = {lab["state"]: v for lab, v in scrape(port)["keepwell_circuit_breaker_state"]
              if lab["source"] == "flaky"}
    assert states["open"] + states["half-open"] == 1.0
    # Fix the source: the next probe succeeds and closes the breaker.
    (ws.root / "missing").mkdir()
    (ws.root / "missing" / "now-here.txt").write_text("hello")
    d.wait_for(lambda: hook.of("resolved", "circuit_open"), timeout=15,
               what="the breaker of flaky to close")
    probe = ws.runs("source='flaky' AND status='succeeded'")[0]
    assert probe["trigger"] == "probe"
    d.wait_for(lambda: d.events("circuit_closed"), what="circuit_closed event")
    states = {lab["state"]: v for lab, v in scrape(port)["keepwell_circuit_breaker_state"]
              if lab["source"] == "flaky"}
    assert states["closed"] == 1.0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        assert json.loads(resp.read())["ok"] is True
    assert d.stop() == 0
    # Each breaker alert was sent once, however many runs were skipped meanwhile.
    assert len([e for e in hook.of("alert", "circuit_open") if e["source"] == "flaky"]) == 1
    status = json.loads(ws.cli("status", "--json", check=True).stdout)
    by_source = {s["source"]: s for s in status["sources"]}
    assert by_source["flaky"]["breaker"] == "closed"
    assert by_source["flaky2"]["breaker"] == "open"
    assert "circuit_open" in by_source["flaky2"]["alerts"]


def test_sigkill_mid_job_then_restart_resumes(ws: Workspace) -> None:
    repo = ws.repository("r")
    write_random(ws.root / "big" / "a.bin", 3 * MiB)
    ws.write_config({
        "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"big": {"kind": "files", "repository": "r", "paths": ["big"],
                            "schedule": "*/2 * * * * *", "upload_limit": "1MiB"}},
    })
    d = ws.daemon()
    # the upload limit keeps a 3 MiB job running for seconds whatever the machine's speed
    d.wait_for(lambda: ws.runs("status='running'"), what="a running job")
    d.kill()
    (killed,) = ws.runs("status='running'")
    d2 = ws.daemon()
    d2.wait_for(lambda: ws.runs("job_id=? AND status='succeeded'", (killed["job_id"],)),
                timeout=30, what="the interrupted job to be re-run")
    assert d2.stop() == 0
    rows = ws.runs("job_id=?", (killed["job_id"],))
    assert rows[0]["status"] == "interrupted"
    assert rows[-1]["status"] == "succeeded" and rows[-1]["trigger"] == "recovery"
    assert [e for e in d2.events("job_interrupted") if e["job"] == killed["job_id"]]
    # The re-run's snapshot restores to the original bytes.
    out = ws.cli("drill", "big", "--json", check=True)
    assert json.loads(out.stdout)["status"] == "succeeded"
    assert not ws.runs("status='running'")


def test_job_timeout_and_graceful_shutdown(ws: Workspace) -> None:
    repo = ws.repository("r")
    write_random(ws.root / "slow" / "a.bin", 3 * MiB)
    write_random(ws.root / "stuck" / "a.bin", 3 * MiB)
    ws.write_config({
        "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {
            "stuck": {"kind": "files", "repository": "r", "paths": ["stuck"],
                      "schedule": "*/2 * * * * *", "upload_limit": "256KiB", "timeout": "1s",
                      "retries": {"attempts": 1}},
            "slow": {"kind": "files", "repository": "r", "paths": ["slow"],
                     "schedule": "*/2 * * * * *", "upload_limit": "512KiB"},
        },
        "limits": {"shutdown_grace": "0.5s"},
    })
    d = ws.daemon()
    d.wait_for(lambda: ws.runs("source='stuck' AND status='timeout'"), timeout=15,
                     what="the stuck job to time out")
    d.wait_for(lambda: ws.runs("source='slow' AND status='running'"), what="slow to run")
    assert d.stop() == 0
    assert not ws.runs("status='running'")
    assert ws.runs("source='slow' AND status='interrupted'")
    assert d.events("daemon_stopped")[0]["cancelled"] >= 1


@pytest.fixture(scope="module")
def pg_history() -> Iterator[Any]:
    from tests.integration.control_support import pg_history_cluster

    with pg_history_cluster() as cluster:
        yield cluster


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_sqlite_source_backed_up_and_drilled_by_the_daemon(
        ws: Workspace, store: str, request: pytest.FixtureRequest) -> None:
    import sqlite3

    if store == "postgres":
        cluster = request.getfixturevalue("pg_history")
        cluster.sql("CREATE DATABASE daemon_history")
        ws.history_location = cluster.url("daemon_history")
    repo = ws.repository("r")
    app = ws.root / "app" / "app.db"
    app.parent.mkdir()
    db = sqlite3.connect(app)
    db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, note TEXT)")
    db.execute("CREATE TABLE tags (name TEXT)")
    db.executemany("INSERT INTO items (note) VALUES (?)", [(f"n{i}",) for i in range(300)])
    db.execute("INSERT INTO tags VALUES ('a'), ('b')")
    db.commit()
    ws.write_config({
        "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"app": {"kind": "sqlite", "repository": "r", "path": "app/app.db",
                            "schedule": "*/2 * * * * *", "retention": {"keep_last": 2}}},
        "drills": {"app-drill": {"source": "app", "schedule": "*/3 * * * * *",
                                 "tables": {"items": 300}}},
    })
    d = ws.daemon()
    d.wait_for(lambda: ws.runs("action='backup' AND status='succeeded'"), timeout=30,
               what="a backup of the SQLite source")
    # A writer keeps writing while the daemon backs the database up.
    for i in range(50):
        db.execute("INSERT INTO items (note) VALUES (?)", (f"late{i}",))
        db.commit()
    d.wait_for(lambda: len(ws.runs("action='backup' AND status='succeeded'")) >= 3, timeout=30,
               what="more backups")
    drill = d.wait_for(lambda: ws.runs("action='drill' AND status='succeeded'"), timeout=30,
                       what="a passing drill")[0]
    assert d.stop() == 0
    db.close()
    assert not ws.runs("status='running'")
    assert not ws.runs("action='backup' AND status='failed'")
    # A drill may fire before the first backup exists; it fails for that reason only.
    for early in ws.runs("action='drill' AND status='failed'"):
        assert early["started_at"] < drill["started_at"] and "snapshot" in early["error"]
    details = json.loads(drill["details"])
    assert details["integrity_check"] == "ok" and details["tables"] == 2
    assert details["row_counts"]["tags"] == 2 and details["row_counts"]["items"] >= 300
    assert drill["rto"] > 0 and drill["rpo"] >= 0
    # The newest snapshot restores to the database as it was at its backup.
    os.environ["KEEPWELL_TESTONLY_WEAK_KDF"] = "1"
    from keepwell.backends import open_backend
    from keepwell.repository import Repository
    from keepwell.sources.sqlite import restore_database

    last = ws.runs("action='backup' AND status='succeeded'")[-1]
    r = Repository.open(open_backend(str(repo)), PASSWORD)
    try:
        snaps = [s for s in r.list_snapshots() if "source:app" in s.tags]
        assert len(snaps) == 2, "retention keeps the last two"
        snap = r.find_snapshot(last["snapshot_id"])
        restore_database(r, snap, str(ws.root / "restored.db"))
    finally:
        r.close()
    got = sqlite3.connect(ws.root / "restored.db")
    assert got.execute("SELECT count(*) FROM items").fetchone()[0] == 350
    got.close()
    status = json.loads(ws.cli("status", "--json", check=True).stdout)
    (src,) = status["sources"]
    assert src["kind"] == "sqlite" and src["drill_status"] == "succeeded"
    assert src["pitr"] is None
