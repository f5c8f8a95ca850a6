"""Drills, anomaly alerts, streamers and metrics, through real processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.control_support import WebhookSink, Workspace, write_random
from tests.waiting import gone, wait_for

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


def _families(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _corrupt_packs(repo: Path) -> int:
    n = 0
    for pack in (repo / "data").rglob("*"):
        if pack.is_file() and pack.stat().st_size > 1000:
            os.chmod(pack, 0o644)
            with open(pack, "r+b") as f:
                f.seek(pack.stat().st_size // 2)
                chunk = f.read(64)
                f.seek(pack.stat().st_size // 2)
                f.write(bytes(b ^ 0xFF for b in chunk))
            n += 1
    return n


def test_drill_passes_then_detects_a_corrupted_pack(ws: Workspace, hook: WebhookSink) -> None:
    repo = ws.repository("r")
    write_random(ws.root / "docs" / "a.bin", 300_000)
    (ws.root / "docs" / "sub").mkdir()
    (ws.root / "docs" / "sub" / "note.txt").write_text("keep me\n")
    ws.write_config({
        "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"docs": {"kind": "files", "repository": "r", "paths": ["docs"]}},
        "drills": {"docs-drill": {"source": "docs", "schedule": "* * * * * *"}},
        "notifications": [{"webhook": hook.url}],
    })
    ws.cli("run", "docs", check=True)
    good = json.loads(ws.cli("drill", "docs-drill", "--json", check=True).stdout)
    assert good["status"] == "succeeded"
    assert good["details"]["files"] == 2
    assert good["rto"] >= 0 and 0 <= good["rpo"] < 60

    assert _corrupt_packs(repo) >= 1
    d = ws.daemon()
    port = d.metrics_port()
    d.wait_for(lambda: len(ws.runs("action='drill' AND status='failed'")) >= 3, timeout=20,
               what="three failed scheduled drills")
    fams = _families(port)
    assert d.stop() == 0
    failed = ws.runs("action='drill' AND status='failed'")[0]
    assert "IntegrityError" in json.loads(failed["details"])["error_type"] or \
        "integrity" in (failed["error"] or "").lower()
    # One notification for the failure, however many drills failed after it.
    assert len(hook.of("alert", "drill_failed")) == 1
    samples = {s.name: s for s in fams["keepwell_drill_last_failed"].samples}  # type: ignore[attr-defined]
    assert samples["keepwell_drill_last_failed"].value == 1.0
    alerts = [s.labels for s in fams["keepwell_alert_active"].samples]  # type: ignore[attr-defined]
    assert {"source": "docs", "kind": "drill_failed"} in alerts
    status = json.loads(ws.cli("status", "--json", check=True).stdout)
    assert status["sources"][0]["drill_status"] == "failed"
    assert "drill_failed" in status["sources"][0]["alerts"]
    bad = ws.cli("drill", "docs-drill")
    assert bad.returncode == 1 and "drill docs-drill failed" in bad.stderr


def test_anomaly_alert_fires_for_an_abnormal_backup_only(ws: Workspace, tmp_path: Path) -> None:
    repo = ws.repository("r")
    hook_log = tmp_path / "notified.jsonl"
    hook_cmd = [sys.executable, "-c",
                f"import sys; open({str(hook_log)!r}, 'a').write(sys.stdin.read() + '\\n')"]
    ws.write_config({
        "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"app": {"kind": "files", "repository": "r", "paths": ["app"]}},
        "alerts": {"min_history": 5, "threshold": 5, "min_bytes_change": "256KiB"},
        "notifications": [{"command": hook_cmd}],
    })
    data = ws.root / "app" / "current.bin"
    # Normal variation: each day about 1 MiB of new data, +-15 %.
    for size in (1.0, 1.15, 0.9, 1.05, 0.85, 1.1, 0.95):
        write_random(data, int(size * MiB))
        ws.cli("run", "app", check=True)
    assert not hook_log.exists()
    status = json.loads(ws.cli("status", "--json", check=True).stdout)
    assert status["alerts"] == []
    # Then a day with twenty times as much.
    write_random(data, 20 * MiB)
    ws.cli("run", "app", check=True)
    events = [json.loads(line) for line in hook_log.read_text().splitlines() if line]
    kinds = {e["kind"] for e in events if e["event"] == "alert"}
    assert "anomaly_changed" in kinds and "anomaly_size" in kinds
    assert "anomaly_duration" not in kinds
    status = json.loads(ws.cli("status", "--json", check=True).stdout)
    assert {a["kind"] for a in status["alerts"]} >= {"anomaly_changed", "anomaly_size"}
    # Back to normal: the alerts resolve (and say so once).
    write_random(data, MiB)
    ws.cli("run", "app", check=True)
    events = [json.loads(line) for line in hook_log.read_text().splitlines() if line]
    assert {e["kind"] for e in events if e["event"] == "resolved"} >= {"anomaly_changed"}


STREAMER = """
import json, sys, time
lag = float(sys.argv[1])
for i in range(4):
    print(json.dumps({"lag_seconds": lag + 10 * i, "spool_depth": i}), flush=True)
    time.sleep(0.1)
sys.exit(3)
"""


def test_streamer_is_restarted_with_backoff_and_lag_alerts(ws: Workspace,
                                                          hook: WebhookSink) -> None:
    repo = ws.repository("r")
    script = ws.root / "streamer.py"
    script.write_text(STREAMER)
    ws.write_config({
        "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"pg": {"kind": "postgres", "repository": "r",
                           "connection": {"host": "127.0.0.1", "port": 1},
                           "stream": {"command": [sys.executable, str(script), "100"],
                                      "restart_base": "0.2s", "restart_cap": "1s",
                                      "lag_alert": "60s"}}},
        "notifications": [{"webhook": hook.url}],
    })
    d = ws.daemon()
    port = d.metrics_port()
    d.wait_for(lambda: len(d.events("stream_exited")) >= 3, timeout=20,
               what="three restarts of the streamer")
    fams = _families(port)
    assert d.stop() == 0
    exits = d.events("stream_exited")
    assert all(e["code"] == 3 for e in exits)
    assert all(0 <= e["restart_in"] <= min(1.0, 0.2 * 2 ** i) + 1e-6
               for i, e in enumerate(exits))
    restarts = fams["keepwell_stream_restarts"].samples  # type: ignore[attr-defined]
    assert restarts[0].value >= 2
    lag = fams["keepwell_stream_lag_seconds"].samples  # type: ignore[attr-defined]
    assert lag[0].labels == {"source": "pg"} and lag[0].value >= 100
    assert len(hook.of("alert", "log_lag")) == 1


def test_replica_mirrors_the_repository_after_each_backup(ws: Workspace) -> None:
    repo = ws.repository("r")
    replica = ws.root / "repos" / "replica"
    write_random(ws.root / "data" / "a.bin", 200_000)
    ws.write_config({
        "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD",
                               "replica": {"location": str(replica)}}},
        "sources": {"data": {"kind": "files", "repository": "r", "paths": ["data"],
                             "retention": {"keep_last": 1}}},
    })
    for _ in range(2):
        write_random(ws.root / "data" / "a.bin", 200_000)
        out = json.loads(ws.cli("run", "data", "--json", check=True).stdout)
    assert out["details"]["replica"]["copied"] >= 1
    assert out["details"]["replica"]["deleted"] >= 1  # the forgotten snapshot

    from keepwell.backends import open_backend
    from keepwell.repository import Repository
    from tests.integration.control_support import PASSWORD

    with Repository.open(open_backend(str(replica)), PASSWORD) as mirror:
        (snap,) = mirror.list_snapshots()
        assert snap.id == out["snapshot_id"]
        restored = b"".join(mirror.iter_file(snap, next(
            p for p, n in mirror.walk(snap) if p.endswith("a.bin"))))
    assert restored == (ws.root / "data" / "a.bin").read_bytes()


DUMPER = """
import os, sys
from keepwell.backends import open_backend
from keepwell.repository import Repository
repo = Repository.open(open_backend(os.environ["KEEPWELL_REPOSITORY"]),
                       os.environ["KEEPWELL_PASSWORD"])
dump = ("host=%s port=%s user=%s password=%s\\n" % (
    os.environ["PGHOST"], os.environ["PGPORT"], os.environ["PGUSER"],
    os.environ["PGPASSWORD"])).encode() * 1000
with repo.new_snapshot("postgres-logical", ["dump.sql"], tags=[sys.argv[1]]) as w:
    w.add_bytes("dump.sql", dump)
    w.commit()
"""

CHECKER = """
import os, sys
snap = os.environ["KEEPWELL_DRILL_SNAPSHOT"]
assert os.path.isdir(os.environ["KEEPWELL_DRILL_SCRATCH"])
sys.exit(0 if len(snap) == 64 else 5)
"""


def test_database_kinds_run_the_sources_own_commands(ws: Workspace) -> None:
    repo = ws.repository("r")
    (ws.root / "dumper.py").write_text(DUMPER)
    (ws.root / "checker.py").write_text(CHECKER)
    (ws.root / "pg.pass").write_text("s3cret\n")
    ws.write_config({
        "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"orders": {
            "kind": "postgres", "repository": "r",
            "connection": {"host": "db1.internal", "port": 6432, "user": "backup",
                           "password": f"file:{ws.root / 'pg.pass'}"},
            "backup_command": [sys.executable, str(ws.root / "dumper.py"), "source:orders"],
            "drill_command": [sys.executable, str(ws.root / "checker.py")],
        }},
    })
    out = json.loads(ws.cli("run", "orders", "--json", check=True).stdout)
    assert out["status"] == "succeeded" and out["bytes_stored"] > 0
    drill = json.loads(ws.cli("drill", "orders", "--json", check=True).stdout)
    assert drill["status"] == "succeeded" and drill["snapshot_id"] == out["snapshot_id"]

    from keepwell.backends import open_backend
    from keepwell.repository import Repository
    from tests.integration.control_support import PASSWORD

    with Repository.open(open_backend(str(repo)), PASSWORD) as r:
        snap = r.find_snapshot("latest", tags=["source:orders"])
        dump = b"".join(r.iter_file(snap, "dump.sql"))
    assert dump.startswith(b"host=db1.internal port=6432 user=backup password=s3cret\n")


def test_retention_keeps_to_the_snapshots_of_its_own_host(ws: Workspace) -> None:
    """Two machines back up a source of the same name into one repository: each one's
    retention acts on its own host's snapshots only."""
    from keepwell.backends import open_backend
    from keepwell.repository import Repository
    from keepwell.sources.files.archiver import backup_paths
    from tests.integration.control_support import PASSWORD

    repo = ws.repository("r")
    write_random(ws.root / "data" / "a.bin", 4096)
    write_random(ws.root / "other" / "b.bin", 4096)
    ws.write_config({
        "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"docs": {"kind": "files", "repository": "r",
                             "paths": [str(ws.root / "data")], "retention": {"keep_last": 1}}},
    })
    with Repository.open(open_backend(str(repo)), PASSWORD) as r:
        other = backup_paths(r, [str(ws.root / "other")], tags=["source:docs"],
                             host="another-machine").snapshot.id
    ws.cli("run", "docs", check=True)
    second = json.loads(ws.cli("run", "docs", "--json", check=True).stdout)["snapshot_id"]
    with Repository.open(open_backend(str(repo)), PASSWORD) as r:
        left = {s.id for s in r.list_snapshots()}
    assert left == {second, other}, "the other machine's only snapshot is not forgotten"


def _docs_config(ws: Workspace, repo: Path, password: str = "env:KW_TEST_PASSWORD",
                 **extra: object) -> None:
    """keepwell.yaml with repository ``r`` and the files source ``docs`` of ws/data."""
    ws.write_config({
        "repositories": {"r": {"location": str(repo), "password": password}},
        "sources": {"docs": {"kind": "files", "repository": "r",
                             "paths": [str(ws.root / "data")]}},
        **extra,
    })


def test_a_wrong_repository_password_names_the_configured_reference(
        ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = ws.repository("r")
    write_random(ws.root / "data" / "a.bin", 1024)
    _docs_config(ws, repo, "env:KW_WRONG_PASSWORD")
    monkeypatch.setenv("KW_WRONG_PASSWORD", "not-the-password")
    out = ws.cli("run", "docs")
    assert out.returncode == 1
    assert "wrong password" in out.stderr and "repositories.r.password" in out.stderr
    assert "env:KW_WRONG_PASSWORD" in out.stderr and "--password-file" not in out.stderr


def test_a_failed_notification_is_logged_without_its_secret_url(ws: Workspace) -> None:
    repo = ws.repository("r")
    write_random(ws.root / "data" / "a.bin", 1024)
    _docs_config(ws, repo, notifications=[
        {"webhook": "http://127.0.0.1:9/services/T0/B0/s3cr3tt0ken", "timeout": "2s"},
        {"command": [sys.executable, "-c", "raise SystemExit(4)"]}])
    out = ws.cli("drill", "docs")  # nothing to restore yet: the drill fails and alerts
    assert out.returncode == 1
    failed = [ln for ln in out.stderr.splitlines() if "notification_failed" in ln]
    assert len(failed) == 2, out.stderr
    assert "http://127.0.0.1:9" in failed[0] and "exit 4" in failed[1]
    assert "s3cr3tt0ken" not in out.stderr


def test_a_hanging_notification_channel_does_not_hold_up_the_schedules(ws: Workspace) -> None:
    repo = ws.repository("r")
    write_random(ws.root / "data" / "a.bin", 1024)
    hanging = socket.socket()  # accepts connections (the backlog) and never answers
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(16)
    try:
        ws.write_config({
            "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
            "sources": {
                "fast": {"kind": "files", "repository": "r", "paths": [str(ws.root / "data")],
                         "schedule": "* * * * * *"},
                **{f"late{i}": {"kind": "files", "repository": "r",
                                "paths": [str(ws.root / "data")], "expect_success_within": "1s"}
                   for i in range(3)},
            },
            "notifications": [{"webhook": f"http://127.0.0.1:{hanging.getsockname()[1]}/hook",
                               "timeout": "3s"}],
        })
        d = ws.daemon()
        d.wait_for(lambda: len(ws.runs("source='fast' AND status='succeeded'")) >= 3,
                   timeout=7, what="backups on schedule while three stale alerts are sent")
        assert d.stop() == 0
    finally:
        hanging.close()


SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(120)
"""


def test_a_timed_out_backup_command_is_killed_with_its_children(ws: Workspace) -> None:
    repo = ws.repository("r")
    (ws.root / "spawner.py").write_text(SPAWNER)
    pid_file = ws.root / "child.pid"
    ws.write_config({
        "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"orders": {
            "kind": "postgres", "repository": "r", "connection": {"host": "db1.internal"},
            "backup_command": [sys.executable, str(ws.root / "spawner.py"), str(pid_file)],
            "timeout": "2s",
        }},
    })
    out = json.loads(ws.cli("run", "orders", "--json").stdout)
    assert out["status"] == "timeout"
    child = int(pid_file.read_text())
    try:
        wait_for(lambda: gone(child), "the backup command's child to be killed with the job",
                 timeout=5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


LONG_STREAMER = """
import json, time
print(json.dumps({"lag_seconds": 1.0, "spool_depth": 0}), flush=True)
time.sleep(120)  # quiet from now on, so losing its reader does not end it
"""


def test_a_killed_daemons_streamer_is_stopped_by_the_next_daemon(ws: Workspace) -> None:
    repo = ws.repository("r")
    script = ws.root / "long_streamer.py"
    script.write_text(LONG_STREAMER)
    ws.write_config({
        "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"db": {"kind": "mysql", "repository": "r",
                           "stream": {"command": [sys.executable, str(script)]}}},
    })
    d = ws.daemon()
    port = d.metrics_port()
    first = d.wait_for(lambda: d.events("stream_started"), what="the streamer")[0]["pid"]
    # Kill the daemon only once the streamer has spoken (and gone quiet).
    d.wait_for(lambda: _families(port)["keepwell_stream_lag_seconds"].samples,  # type: ignore[attr-defined]
               what="a lag report")
    d.kill()
    assert Path(f"/proc/{first}").exists()  # the streamer outlived its daemon
    d2 = ws.daemon()
    try:
        d2.wait_for(lambda: d2.events("stream_orphan_stopped"), what="the orphan to be stopped")
        second = d2.wait_for(lambda: d2.events("stream_started"), what="a new streamer")
        assert second[0]["pid"] != first
        d2.wait_for(lambda: gone(first), what="the orphan to exit")
    finally:
        assert d2.stop() == 0
        with contextlib.suppress(OSError):
            os.killpg(first, signal.SIGKILL)  # never leave a test's process behind
    assert not Path(f"/proc/{second[0]['pid']}").exists() or \
        "Z" in Path(f"/proc/{second[0]['pid']}/stat").read_text().split()[2]
