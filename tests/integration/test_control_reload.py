"""Hot reload of a real daemon: SIGHUP and --watch-config add and remove sources without
stopping running jobs, refuse an invalid file (the configuration in force stays), and are
counted in the metrics."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.control_support import Workspace, scrape, write_random

MiB = 1024 * 1024


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    w = Workspace(tmp_path)
    yield w
    w.close()


def _source(path: str, **more: Any) -> dict[str, Any]:
    return {"kind": "files", "repository": "r", "paths": [path], "schedule": "* * * * * *",
            **more}


def _config(ws: Workspace, repo: Path, sources: dict[str, Any]) -> dict[str, Any]:
    doc = {"repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
           "sources": sources}
    ws.write_config(doc)
    return doc


def _reloads(port: int) -> dict[str, float]:
    return {labels["result"]: value
            for labels, value in scrape(port).get("keepwell_config_reloads_total", [])}


def test_sighup_adds_a_source_and_removes_one_whose_running_job_finishes(
        ws: Workspace) -> None:
    repo = ws.repository("r")
    write_random(ws.root / "fast" / "a.bin", 64 * 1024)
    write_random(ws.root / "slow" / "a.bin", 3 * MiB)
    write_random(ws.root / "new" / "a.bin", 64 * 1024)
    _config(ws, repo, {"fast": _source("fast"),
                       "slow": _source("slow", upload_limit="512KiB")})
    d = ws.daemon()
    port = d.metrics_port()
    d.wait_for(lambda: ws.runs("source='slow' AND status='running'"), what="slow to run")
    (running,) = ws.runs("source='slow' AND status='running'")

    _config(ws, repo, {"fast": _source("fast"), "new": _source("new")})
    d.proc.send_signal(signal.SIGHUP)
    (event,) = d.wait_for(lambda: d.events("config_reloaded"), what="the reload")
    assert event["added"] == "new" and event["removed"] == "slow"
    assert _reloads(port) == {"ok": 1.0, "refused": 0.0}

    # the new source runs; the removed source's running job finishes, it is not killed
    d.wait_for(lambda: ws.runs("source='new' AND status='succeeded'"), timeout=30,
               what="a backup of the new source")
    finished = d.wait_for(lambda: ws.runs("id=? AND status != 'running'", (running["id"],)),
                          timeout=60, what="the running job of the removed source to end")
    assert finished[0]["status"] == "succeeded"
    # ... and is not scheduled again: later backups of the other sources, none of it
    after = finished[0]["ended_at"]
    d.wait_for(lambda: len(ws.runs("source='fast' AND started_at > ?", (after,))) >= 2,
               timeout=30, what="later backups of the remaining source")
    assert d.stop() == 0
    assert ws.runs("source='slow' AND started_at > ?", (event["time"],)) == []
    assert [r["id"] for r in ws.runs("source='slow'")] == [running["id"]]


def test_invalid_or_restart_only_change_is_refused_and_the_old_schedule_runs_on(
        ws: Workspace) -> None:
    repo = ws.repository("r")
    write_random(ws.root / "fast" / "a.bin", 64 * 1024)
    doc = _config(ws, repo, {"fast": _source("fast")})
    d = ws.daemon()
    port = d.metrics_port()
    d.wait_for(lambda: ws.runs("source='fast' AND status='succeeded'"), what="a first backup")

    good = ws.config_path.read_text()
    bad = good.replace("'* * * * * *'", "'every tuesday'")
    assert bad != good
    ws.config_path.write_text(bad)
    expected = ws.cli("config", "check")  # the error the daemon would give at start
    assert expected.returncode == 2
    d.proc.send_signal(signal.SIGHUP)
    (refused,) = d.wait_for(lambda: d.events("config_reload_refused"), what="the refusal")
    assert refused["error"] in expected.stderr
    assert "sources.fast.schedule" in refused["error"]
    assert _reloads(port) == {"ok": 0.0, "refused": 1.0}
    d.wait_for(lambda: ws.runs("source='fast' AND status='succeeded' AND started_at > ?",
                               (refused["time"],)),
               what="the schedule in force to run on")

    # a setting bound at start is refused with what to do
    ws.write_config({**doc, "metrics": {"listen": "127.0.0.1:1"}})
    d.proc.send_signal(signal.SIGHUP)
    second = d.wait_for(lambda: d.events("config_reload_refused")[1:], what="a second refusal")
    assert "restart the daemon to change metrics.listen" in second[0]["error"]
    assert _reloads(port) == {"ok": 0.0, "refused": 2.0}
    assert d.events("config_reloaded") == []
    assert d.stop() == 0


def test_watch_config_picks_up_a_change_without_a_signal(ws: Workspace) -> None:
    repo = ws.repository("r")
    write_random(ws.root / "fast" / "a.bin", 64 * 1024)
    write_random(ws.root / "new" / "a.bin", 64 * 1024)
    _config(ws, repo, {"fast": _source("fast", schedule="0 0 1 1 *")})
    d = ws.daemon("--watch-config")
    port = d.metrics_port()
    d.wait_for(lambda: d.events("daemon_started"), what="the daemon to start")

    _config(ws, repo, {"fast": _source("fast", schedule="0 0 1 1 *"), "new": _source("new")})
    (event,) = d.wait_for(lambda: d.events("config_reloaded"), what="the file to be reloaded")
    assert event["reason"] == "file changed" and event["added"] == "new"
    d.wait_for(lambda: ws.runs("source='new' AND status='succeeded'"), timeout=30,
               what="a backup of the new source")
    assert _reloads(port)["ok"] == 1.0
    assert ws.runs("source='fast'") == []
    assert d.stop() == 0
