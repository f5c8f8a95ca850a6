"""The web app's JSON API against real processes (``keepwell web``, ``keepwell daemon``) and a
real job history with real backups; its guard (host, token, session, CSRF, login limits)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from keepwell.control.history import History
from tests.integration.control_support import Workspace, env
from tests.integration.web_support import Client, WebProcess, files_workspace, web_address
from tests.servers import free_port


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    w = Workspace(tmp_path)
    yield w
    w.close()


def _web(ws: Workspace, *args: str) -> WebProcess:
    proc = WebProcess(ws.config_path, ws.root / f"web-{len(ws.daemons)}.log", *args)
    ws.daemons.append(proc)
    return proc


def _wait_job(proc: Any, client: Client, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        runs = client.get(f"/api/v1/jobs/{job_id}")
        return runs[-1] if runs and runs[-1]["status"] != "running" else None
    return proc.wait_for(done, timeout=60, what=f"job {job_id} to end")  # type: ignore[no-any-return]


def test_api_shows_the_history_and_runs_a_backup_now(ws: Workspace) -> None:
    files_workspace(ws)
    ws.cli("run", "docs", check=True)
    (ws.root / "data" / "docs" / "b.bin").write_bytes(os.urandom(32 * 1024))
    ws.cli("run", "docs", check=True)
    history = History(str(ws.history))
    history.raise_alert("docs:stale", "docs", "stale", "no successful backup of docs")
    history.close()

    proc = _web(ws)
    client = Client(proc.address())
    client.session()

    overview = client.get("/api/v1/overview")
    order = [s["source"] for s in overview["sources"]]
    assert order == ["docs", "photos"]  # docs has an open alert: red before never-run photos
    docs = overview["sources"][0]
    assert docs["state"] == "red" and docs["open_alerts"] == ["stale"]
    assert docs["last_success"] is not None and docs["last_status"] == "succeeded"
    assert overview["sources"][1]["state"] == "late"
    assert [d["drill"] for d in overview["drills"]] == ["docs-drill"]

    source = client.get("/api/v1/sources/docs")
    assert len(source["backups"]) == 2
    assert source["backups"][0]["time"] < source["backups"][1]["time"]
    assert all(p["bytes_read"] and p["duration"] is not None for p in source["backups"])
    assert len(source["snapshots"]) == 2
    assert len(client.get("/api/v1/sources/docs/snapshots")) == 2
    run = client.get(f"/api/v1/runs/{source['runs'][0]['id']}")
    messages = [line["message"] for line in run["log"]]
    assert messages[0].startswith("backup of docs started")
    assert messages[-1].startswith("backup succeeded, snapshot ")

    (repo,) = client.get("/api/v1/repositories")
    assert repo["snapshots"] == 2 and repo["stored_bytes"] > 96 * 1024
    assert repo["dedup_ratio"] > 1.0  # the second backup read docs' first file again
    assert repo["compression_ratio"] is not None
    assert "password" not in json.dumps(repo)
    growth = client.get("/api/v1/repositories/main")["growth"]
    assert [g["total"] for g in growth] == sorted(g["total"] for g in growth)

    spec = client.get("/api/v1/openapi.json")
    for path in ("/api/v1/sources/{name}", "/api/v1/runs/{id}", "/api/v1/actions/backup",
                 "/api/v1/alerts/{key}/acknowledge", "/api/v1/events"):
        assert path in spec["paths"]

    # an action without the CSRF token is refused; with it, the backup runs and succeeds
    status, doc = client.post("/api/v1/actions/backup", {"source": "photos"}, csrf=False)
    assert status == 403 and "CSRF" in doc["error"]
    status, doc = client.post("/api/v1/actions/backup", {"source": "photos"})
    assert status == 202, doc
    run = _wait_job(proc, client, doc["job_id"])
    assert run["status"] == "succeeded" and run["trigger"] == "manual"
    log = client.get(f"/api/v1/runs/{run['id']}")["log"]
    assert "by web:operator:loopback@127.0.0.1" in log[0]["message"]
    status, doc = client.post("/api/v1/actions/backup", {"source": "nope"})
    assert status == 404

    # acknowledging clears the alert from the open ones; it stays active until resolved
    status, doc = client.post("/api/v1/alerts/docs%3Astale/acknowledge")
    assert status == 200, doc
    (alert,) = client.get("/api/v1/alerts")
    assert alert["open"] is False and alert["acknowledged_by"] == "web:operator:loopback@127.0.0.1"
    assert client.get("/api/v1/overview")["open_alerts"] == []
    status, _ = client.post("/api/v1/alerts/docs%3Astale/acknowledge")
    assert status == 404

    # a page of another site reaching the loopback server through a rebound name is refused
    status, _h, _b = client.request("GET", "/api/v1/overview", headers={"Host": "evil.test:80"})
    assert status == 421
    assert proc.stop() == 0


def test_the_daemon_serves_the_web_and_runs_a_backup_and_a_drill_now(ws: Workspace) -> None:
    files_workspace(ws)
    daemon = ws.daemon()
    client = Client(web_address(daemon))
    client.session()
    status, doc = client.post("/api/v1/actions/backup", {"source": "docs"})
    assert status == 202, doc
    assert _wait_job(daemon, client, doc["job_id"])["status"] == "succeeded"
    status, doc = client.post("/api/v1/actions/drill", {"drill": "docs-drill"})
    assert status == 202, doc
    drill = _wait_job(daemon, client, doc["job_id"])
    assert drill["status"] == "succeeded" and drill["rto"] is not None
    (entry,) = client.get("/api/v1/drills")
    assert entry["last_status"] == "succeeded" and len(entry["series"]) == 1
    assert any(e.get("event") == "job_requested" for e in daemon.events())
    assert daemon.stop() == 0


def test_beyond_loopback_needs_a_token(ws: Workspace) -> None:
    files_workspace(ws, web={"listen": "0.0.0.0:9378"})
    proc = ws.cli("config", "check")
    assert proc.returncode == 2
    assert "needs a token" in proc.stderr and "Traceback" not in proc.stderr


def test_token_session_csrf_and_login_limits(ws: Workspace) -> None:
    (ws.root / "web.token").write_text("s3cret-token\n")
    files_workspace(ws, web={"listen": "127.0.0.1:0", "token": f"file:{ws.root / 'web.token'}"})
    proc = _web(ws)
    address = proc.address()
    anon = Client(address)
    status, headers, _b = anon.request("GET", "/")
    assert status == 303 and headers["location"] == "/login"
    status, _h, _b = anon.request("GET", "/api/v1/overview")
    assert status == 401
    status, _h, _b = anon.request("GET", "/api/v1/overview",
                                  headers={"Authorization": "Bearer wrong"})
    assert status == 401
    bearer = {"Authorization": "Bearer s3cret-token"}
    status, _h, body = anon.request("GET", "/api/v1/overview", headers=bearer)
    assert status == 200 and b"s3cret" not in body
    status, doc = anon.post("/api/v1/actions/backup", {"source": "docs"}, headers=bearer)
    assert status == 202, doc  # a bearer token is no ambient credential: no CSRF token needed

    browser = Client(address)
    status, headers, _b = browser.request("POST", "/login", form={"token": "s3cret-token"})
    assert status == 303
    assert "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
    assert browser.session()["csrf"]
    status, doc = browser.post("/api/v1/actions/backup", {"source": "photos"}, csrf=False)
    assert status == 403
    status, doc = browser.post("/api/v1/actions/backup", {"source": "photos"})
    assert status == 202, doc

    guesser = Client(address)
    codes = [guesser.request("POST", "/login", form={"token": f"guess{i}"})[0]
             for i in range(7)]
    assert codes[:5] == [403] * 5 and codes[5:] == [429, 429]
    # the right token is refused too while the address is limited
    assert guesser.request("POST", "/login", form={"token": "s3cret-token"})[0] == 429
    assert proc.stop() == 0


def test_a_viewer_sees_everything_and_may_not_act_an_operator_may(ws: Workspace) -> None:
    (ws.root / "op.token").write_text("operator-token\n")
    (ws.root / "view.token").write_text("viewer-token\n")
    files_workspace(ws, web={"listen": "127.0.0.1:0", "token": f"file:{ws.root / 'op.token'}",
                             "viewer_token": f"file:{ws.root / 'view.token'}"})
    ws.cli("run", "docs", check=True)
    history = History(str(ws.history))
    history.raise_alert("docs:stale", "docs", "stale", "no successful backup of docs")
    history.close()
    proc = _web(ws)
    address = proc.address()

    viewer = Client(address)
    assert viewer.request("POST", "/login", form={"token": "viewer-token"})[0] == 303
    session = viewer.get("/api/v1/session")
    assert session["role"] == "viewer" and session["csrf"] is None
    assert [s["source"] for s in viewer.get("/api/v1/sources")] == ["docs", "photos"]
    run_id = viewer.get("/api/v1/runs")[0]["id"]
    for path in ("/", "/sources/docs", f"/runs/{run_id}", "/repositories/main", "/drills",
                 "/running"):
        status, _h, body = viewer.request("GET", path)
        assert status == 200, path
        assert b'class="act"' not in body and b"keepwell-csrf" not in body, path
        assert b"viewer: read only" in body
    # every action is refused with a clear message, with or without a CSRF token
    operator_session = Client(address)
    operator_session.request("POST", "/login", form={"token": "operator-token"})
    csrf = operator_session.session()["csrf"]
    for path, body in (("/api/v1/actions/backup", {"source": "photos"}),
                       ("/api/v1/actions/drill", {"drill": "docs-drill"}),
                       ("/api/v1/alerts/docs%3Astale/acknowledge", {})):
        for headers in ({}, {"X-Keepwell-CSRF": csrf}):
            status, doc = viewer.post(path, body, headers=headers)
            assert status == 403, (path, doc)
            assert "viewer role may look but not act" in doc["error"]
        status, doc = viewer.post(path, body, headers={"Authorization": "Bearer viewer-token"})
        assert status == 403 and "viewer role" in doc["error"]
    assert viewer.get("/api/v1/runs?source=photos") == []
    assert viewer.get("/api/v1/alerts")[0]["open"] is True

    # the operator acts; the history records who asked and in what role
    status, _h, body = operator_session.request("GET", "/")
    assert b'class="act"' in body and b"read only" not in body
    assert operator_session.session()["role"] == "operator"
    status, doc = operator_session.post("/api/v1/actions/backup", {"source": "photos"})
    assert status == 202, doc
    run = _wait_job(proc, operator_session, doc["job_id"])
    assert run["status"] == "succeeded"
    log = operator_session.get(f"/api/v1/runs/{run['id']}")["log"]
    assert "by web:operator:session@127.0.0.1" in log[0]["message"]
    status, doc = operator_session.post("/api/v1/alerts/docs%3Astale/acknowledge")
    assert status == 200 and doc["acknowledged_by"] == "web:operator:session@127.0.0.1"
    status, doc = Client(address).post("/api/v1/actions/backup", {"source": "docs"},
                                       headers={"Authorization": "Bearer operator-token"})
    assert status == 202 and doc["requested_by"] == "web:operator:token@127.0.0.1"
    assert proc.stop() == 0


def test_a_viewer_token_needs_an_operator_token_of_its_own(ws: Workspace) -> None:
    (ws.root / "view.token").write_text("viewer-token\n")
    files_workspace(ws, web={"listen": "127.0.0.1:0",
                             "viewer_token": f"file:{ws.root / 'view.token'}"})
    proc = ws.cli("config", "check")
    assert proc.returncode == 2 and "viewer_token needs token" in proc.stderr
    assert "Traceback" not in proc.stderr
    doc = yaml.safe_load(ws.config_path.read_text())
    doc["web"]["token"] = doc["web"]["viewer_token"]
    ws.write_config(doc)
    proc = ws.cli("config", "check")
    assert proc.returncode == 2 and "different secrets" in proc.stderr


def test_web_listen_must_be_host_and_port(ws: Workspace) -> None:
    files_workspace(ws)
    proc = ws.cli("web", "--listen", "nonsense")
    assert proc.returncode == 2 and "HOST:PORT" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_repository_shows_its_last_check_from_the_history(ws: Workspace) -> None:
    files_workspace(ws)
    ws.cli("run", "docs", check=True)
    proc = _web(ws)
    client = Client(proc.address())
    client.session()
    (repo,) = client.get("/api/v1/repositories")
    assert repo["last_check"] is None
    status, _h, page = client.request("GET", "/repositories/main")
    assert status == 200 and b"never checked" in page

    out = ws.cli("check-repository", "main", "--read-data-subset", "1/1", check=True)
    assert "no errors were found" in out.stdout
    last = client.get("/api/v1/repositories/main")["last_check"]
    assert last["ok"] and last["status"] == "succeeded" and last["errors"] == 0
    assert last["read_data"] == "1/1" and last["packs_read"] >= 1
    status, _h, page = client.request("GET", "/repositories/main")
    assert b"no errors" in page and b"data read: 1/1" in page

    packs = sorted(p for p in (ws.root / "repos" / "main" / "data").rglob("*") if p.is_file())
    blob = bytearray(packs[0].read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    packs[0].write_bytes(bytes(blob))
    failed = ws.cli("check-repository", "main")  # structure only: the damage is not seen
    assert failed.returncode == 0, failed.stderr
    failed = ws.cli("check-repository", "main", "--read-data")
    assert failed.returncode == 1 and "errors found" in failed.stderr
    (repo,) = client.get("/api/v1/repositories")  # the same web process sees the new run
    last = repo["last_check"]
    assert not last["ok"] and last["status"] == "failed" and last["errors"] >= 1
    assert last["read_data"] == "all"
    run = client.get(f"/api/v1/runs/{last['run']}")
    assert run["action"] == "check" and run["source"] == "main"
    status, _h, page = client.request("GET", "/repositories/main")
    assert f"{last['errors']} errors".encode() in page and b"data read: all" in page


def test_running_shows_the_fleet_only_when_configured(ws: Workspace) -> None:
    files_workspace(ws)
    script = ("import sys\n"
              "from keepwell.control.config import load_config\n"
              "from keepwell.control.history import open_history\n"
              "from keepwell.control.runner import BackgroundJobs\n"
              "from keepwell.web.views import Dashboard\n"
              f"loaded = load_config({str(ws.config_path)!r})\n"
              "h = open_history(loaded.config)\n"
              "d = Dashboard(loaded, h, BackgroundJobs(loaded, h, None))\n"
              "print(d.running()['fleet'], 'temporalio' in sys.modules)\n")
    e = env()
    e.pop("KEEPWELL_FLEET_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", script], env=e, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.split() == ["None", "False"]  # no fleet section: the SDK is not loaded
    proc = _web(ws)
    client = Client(proc.address())
    client.session()
    assert client.get("/api/v1/running")["fleet"] is None
    status, _h, page = client.request("GET", "/running")
    assert status == 200 and b"Fleet workers" not in page

    port = free_port()  # nothing listens there
    doc = yaml.safe_load(ws.config_path.read_text())
    ws.config_path.write_text(yaml.safe_dump({**doc, "fleet": {"address": f"127.0.0.1:{port}"}}))
    proc = _web(ws)
    client = Client(proc.address())
    client.session()
    fleet = client.get("/api/v1/running")["fleet"]
    assert fleet["address"] == f"127.0.0.1:{port}" and "workers" not in fleet
    assert fleet["error"].startswith("fleet unreachable: ")
    status, _h, page = client.request("GET", "/running")
    assert status == 200 and b'id="fleet-error">fleet unreachable: ' in page
    proc.proc.send_signal(signal.SIGTERM)  # the SDK's client does not spoil a clean stop
    assert proc.proc.wait(timeout=60) == 0
