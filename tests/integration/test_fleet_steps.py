"""Fleet runs step by step, against a real Temporal dev server and ``keepwell worker`` processes:
the backup, its retention, its replica copy and the drill marked ``after_backup`` as steps of
their own, and the circuit breaker kept by Temporal across runs."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from tests.integration.control_support import init_repository, write_random
from tests.integration.fleet_support import Fleet, fleet, restore, server, snapshots, tree

__all__ = ["fleet", "server"]  # fixtures

PW = "env:KW_TEST_PASSWORD"


def _table(fleet: Fleet, sql: str) -> list[dict[str, Any]]:
    db = sqlite3.connect(fleet.history, timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(sql)]
    finally:
        db.close()


def _jobs(fleet: Fleet) -> list[dict[str, Any]]:
    proc = fleet.cli("fleet", "jobs", "-c", str(fleet.config), "--json")
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def _run(fleet: Fleet, name: str) -> tuple[int, dict[str, Any], str]:
    proc = fleet.cli("fleet", "run", name, "-c", str(fleet.config), "--wait", "--json")
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def test_backup_retention_replica_then_the_drill_each_a_step(fleet: Fleet) -> None:
    repo, replica = fleet.root / "repo", fleet.root / "replica"
    init_repository(repo)
    data = fleet.root / "data" / "orders"
    write_random(data / "a.bin", 200_000)
    fleet.write_config({
        "repositories": {"main": {"location": str(repo), "password": PW,
                                  "replica": {"location": str(replica)}}},
        "sources": {"orders": {"kind": "files", "repository": "main", "paths": [str(data)],
                               "site": "east", "retention": {"keep_last": 1}}},
        "drills": {"orders-check": {"source": "orders", "after_backup": True}},
    })
    fleet.worker("east")
    code, first, err = _run(fleet, "orders")
    assert code == 0, err
    write_random(data / "b.bin", 100_000)
    code, out, err = _run(fleet, "orders")
    assert code == 0, err
    assert out["status"] == "succeeded"
    steps = out["steps"]
    assert [(s["action"], s["status"]) for s in steps] == [
        ("backup", "succeeded"), ("retention", "succeeded"), ("replica", "succeeded"),
        ("drill", "succeeded")]
    backup = steps[0]
    assert steps[1]["details"]["forgotten"] == [first["steps"][0]["snapshot_id"][:8]]
    assert steps[2]["details"]["replica"]["copied"] > 0
    # retention kept the newest snapshot only; the replica holds the same and restores it
    assert [s["id"] for s in snapshots(fleet, repo)] == [backup["snapshot_id"]]
    assert [s["id"] for s in snapshots(fleet, replica)] == [backup["snapshot_id"]]
    assert restore(fleet, replica, backup["snapshot_id"], data) == tree(data)
    # the job history: both backups and both drills succeeded; the steps left their lines
    runs = fleet.runs()
    assert [(r["action"], r["status"]) for r in runs] == [
        ("backup", "succeeded"), ("drill", "succeeded")] * 2
    assert runs[2]["snapshot_id"] == backup["snapshot_id"]
    lines = [r["message"] for r in _table(fleet, f"SELECT * FROM run_log WHERE run_id = "
                                                 f"{runs[2]['id']} ORDER BY id")]
    assert any(line.startswith("retention succeeded") for line in lines), lines
    assert any(line.startswith("replica succeeded") for line in lines), lines
    # fleet jobs shows each step of the run with its status
    newest = _jobs(fleet)[0]
    assert newest["status"] == "completed"
    assert [(s["step"], s["status"]) for s in newest["steps"]] == [
        ("backup", "succeeded"), ("retention", "succeeded"), ("replica", "succeeded"),
        ("drill", "succeeded")]


def test_a_failed_replica_copy_leaves_the_backup_succeeded(fleet: Fleet) -> None:
    repo = fleet.root / "repo"
    init_repository(repo)
    data = fleet.root / "data" / "docs"
    write_random(data / "a.bin", 100_000)
    (fleet.root / "not-a-dir").write_text("a file where the replica should be")
    fleet.write_config({
        "retries": {"attempts": 2, "base": "1s", "cap": "1s"},
        "repositories": {"main": {"location": str(repo), "password": PW,
                                  "replica": {"location": str(fleet.root / "not-a-dir" / "r")}}},
        "sources": {"docs": {"kind": "files", "repository": "main", "paths": [str(data)],
                             "site": "east"}},
    })
    fleet.worker("east")
    code, out, err = _run(fleet, "docs")
    assert code == 3, err  # partial: the backup stands, its replica copy failed
    assert out["status"] == "partial"
    assert [(s["action"], s["status"]) for s in out["steps"]] == [
        ("backup", "succeeded"), ("replica", "failed")]
    assert "replica of docs failed" in out["steps"][1]["details"]["error"]
    runs = fleet.runs()
    assert [(r["action"], r["status"]) for r in runs] == [("backup", "succeeded")]
    lines = [r["message"] for r in _table(fleet, f"SELECT * FROM run_log WHERE run_id = "
                                                 f"{runs[0]['id']} ORDER BY id")]
    assert sum(line.startswith("replica failed (attempt") for line in lines) == 2, lines
    steps = _jobs(fleet)[0]["steps"]
    assert [(s["step"], s["status"], s["attempt"]) for s in steps] == [
        ("backup", "succeeded", 1), ("replica", "failed", 2), ("replica", "failed", 2)]
    assert [s["id"] for s in snapshots(fleet, repo)] == [out["steps"][0]["snapshot_id"]]


def test_breaker_opens_after_failed_runs_skips_then_a_trial_run_closes_it(fleet: Fleet) -> None:
    repo = fleet.root / "repo"  # not created yet: the repository is unreachable
    data = fleet.root / "data" / "db"
    write_random(data / "a.bin", 50_000)
    doc: dict[str, Any] = {
        "retries": {"attempts": 1, "base": "1s", "cap": "1s"},
        "circuit_breaker": {"failure_threshold": 2, "reset_after": "1h"},
        "repositories": {"main": {"location": str(repo), "password": PW}},
        "sources": {"db": {"kind": "files", "repository": "main", "paths": [str(data)],
                           "site": "east"}},
    }
    fleet.write_config(doc)
    fleet.worker("east")
    fleet.worker("east")  # runs of one source land on either: the breaker is on Temporal
    for _ in range(2):
        code, out, err = _run(fleet, "db")
        assert code == 1 and out["status"] == "failed", (code, out, err)
    code, out, err = _run(fleet, "db")
    assert code == 1, (code, out, err)
    assert out["status"] == "skipped" and out["error"] == "circuit open: the source is paused"
    assert out["retry_at"] is not None
    runs = fleet.runs()
    assert [(r["status"], r["error"] if r["status"] == "skipped" else "") for r in runs] == [
        ("failed", ""), ("failed", ""), ("skipped", "circuit open: the source is paused")]
    assert {r["pid"] for r in runs[:2]} <= {p.pid for p, _ in fleet.workers}
    [breaker] = _table(fleet, "SELECT * FROM breakers")
    assert (breaker["source"], breaker["state"], breaker["failures"]) == ("db", "open", 2)
    assert [a["kind"] for a in _table(fleet, "SELECT * FROM alerts WHERE resolved_at IS NULL")
            ] == ["circuit_open"]
    jobs = _jobs(fleet)
    assert jobs[0]["status"] == "skipped"
    assert [(s["step"], s["status"], s["reason"]) for s in jobs[0]["steps"]] == [
        ("backup", "skipped", "circuit open: the source is paused")]
    # the repository comes back and the cool-down is over (the policy travels with each run):
    # one trial run goes, succeeds and closes the breaker
    init_repository(repo)
    doc["circuit_breaker"]["reset_after"] = "0s"
    fleet.write_config(doc)
    code, out, err = _run(fleet, "db")
    assert code == 0, (code, out, err)
    trial = fleet.runs()[-1]
    assert (trial["status"], trial["trigger"]) == ("succeeded", "probe")
    [breaker] = _table(fleet, "SELECT * FROM breakers")
    assert (breaker["state"], breaker["failures"]) == ("closed", 0)
    assert _table(fleet, "SELECT * FROM alerts WHERE resolved_at IS NULL") == []
    code, out, err = _run(fleet, "db")
    assert code == 0 and fleet.runs()[-1]["trigger"] == "fleet", (code, out, err)
