"""Fleet mode against a real Temporal dev server, with workers in separate processes.

The server is `keepwell fleet server` (the ``temporal`` binary of the ``fleet`` extra) on free
loopback ports with a temporary database; workers are real ``keepwell worker`` processes. Waits
are on events: a worker's ``worker_started`` log line, packs appearing in the repository, rows
of the job history, the end of a ``fleet run --wait`` process.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.integration.control_support import init_repository, write_random
from tests.integration.fleet_support import (
    MAIN,
    Fleet,
    MiB,
    budget_leases,
    files,
    fleet,
    restore,
    server,
    snapshots,
    start_server,
    tree,
)
from tests.servers import free_port
from tests.waiting import wait_for

__all__ = ["fleet", "server"]  # fixtures

def _two_sites(fleet: Fleet) -> tuple[Path, Path, Path]:
    repo = fleet.root / "repo"
    init_repository(repo)
    east, west = fleet.root / "data" / "east", fleet.root / "data" / "west"
    for i in range(3):
        write_random(east / f"f{i}.bin", 300_000 + i)
        write_random(west / f"g{i}.bin", 200_000 + i)
    fleet.write_config({
        "repositories": {"main": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {
            "a": {"kind": "files", "repository": "main", "paths": [str(east)], "site": "east"},
            "b": {"kind": "files", "repository": "main", "paths": [str(west)], "site": "west"},
        },
    })
    return repo, east, west


def test_run_wait_restores_exactly_and_sites_are_kept_apart(fleet: Fleet) -> None:
    repo, east, west = _two_sites(fleet)
    east_worker = fleet.worker("east")
    # b is pinned to site west, which has no worker yet: it waits in west's queue
    started = fleet.cli("fleet", "run", "b", "-c", str(fleet.config), "--json")
    assert started.returncode == 0, started.stderr
    proc = fleet.cli("fleet", "run", "a", "-c", str(fleet.config), "--wait", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "succeeded" and out["site"] == "east"
    step = out["steps"][0]
    assert step["worker"].startswith(f"east/{socket.gethostname()}/{east_worker.pid}")
    assert restore(fleet, repo, step["snapshot_id"], east) == tree(east)
    runs = fleet.runs()
    assert [(r["source"], r["status"], r["trigger"], r["pid"]) for r in runs] == [
        ("a", "succeeded", "fleet", east_worker.pid)]
    # a ran and finished on east while b was waiting: east's worker never took b
    west_worker = fleet.worker("west")
    done = wait_for(lambda: [r for r in fleet.runs() if r["source"] == "b"
                             and r["status"] == "succeeded"], "b on the west worker")
    assert done[0]["pid"] == west_worker.pid
    snap = next(s for s in snapshots(fleet, repo) if s["id"] == done[0]["snapshot_id"])
    assert restore(fleet, repo, snap["id"], west) == tree(west)
    status = fleet.cli("fleet", "status", "-c", str(fleet.config), "--json")
    assert status.returncode == 0, status.stderr
    workers = json.loads(status.stdout)["workers"]
    assert [w["identity"] for w in workers["east"]] == [
        f"east/{socket.gethostname()}/{east_worker.pid}"]
    assert [w["identity"] for w in workers["west"]] == [
        f"west/{socket.gethostname()}/{west_worker.pid}"]


def test_a_source_added_to_the_file_runs_on_the_running_workers(fleet: Fleet) -> None:
    repo, east, _ = _two_sites(fleet)
    fleet.worker("east")
    doc = yaml.safe_load(fleet.config.read_text())
    more = fleet.root / "data" / "more"
    write_random(more / "m.bin", 100_000)
    doc["sources"]["c"] = {"kind": "files", "repository": "main", "paths": [str(more)],
                           "site": "east"}
    fleet.config.write_text(yaml.safe_dump(doc))  # the worker was started before c existed
    proc = fleet.cli("fleet", "run", "c", "-c", str(fleet.config), "--wait", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    step = json.loads(proc.stdout)["steps"][0]
    assert restore(fleet, repo, step["snapshot_id"], more) == tree(more)
    # a file that no longer validates is refused: the worker keeps the last good one
    fleet.config.write_text(fleet.config.read_text() + "\nnot_a_setting: 1\n")
    proc = fleet.cli("fleet", "run", "a", "-c", str(fleet.config), "--wait", "--json")
    assert proc.returncode != 0  # the command line refuses the file itself
    good = fleet.root / "good.yaml"  # the same settings, valid
    good.write_text(yaml.safe_dump(doc))
    proc = fleet.cli("fleet", "run", "a", "-c", str(good), "--wait", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # run with the last good file
    log = fleet.workers[0][1].read_text()
    assert '"config_reloaded"' in log and '"config_refused"' in log


def test_apply_is_idempotent_and_removes_schedules(fleet: Fleet) -> None:
    _two_sites(fleet)
    doc = yaml.safe_load(fleet.config.read_text())
    doc["sources"]["a"]["schedule"] = "0 3 * * *"
    doc["sources"]["b"]["schedule"] = "30 4 * * * "
    doc["sources"]["b"]["timezone"] = "Europe/Paris"
    fleet.config.write_text(yaml.safe_dump(doc))

    def apply(*extra: str) -> list[tuple[str, str]]:
        proc = fleet.cli("fleet", "apply", "-c", str(fleet.config), "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        return [(s["op"], s["schedule_id"]) for s in json.loads(proc.stdout)["plan"]]

    assert apply("--dry-run") == [("create", "keepwell-backup-a"), ("create", "keepwell-backup-b")]
    assert apply() == [("create", "keepwell-backup-a"), ("create", "keepwell-backup-b")]
    assert apply() == [("unchanged", "keepwell-backup-a"), ("unchanged", "keepwell-backup-b")]
    doc["sources"]["a"]["schedule"] = "0 2 * * *"
    del doc["sources"]["b"]
    fleet.config.write_text(yaml.safe_dump(doc))
    assert apply() == [("update", "keepwell-backup-a"), ("delete", "keepwell-backup-b")]
    assert apply() == [("unchanged", "keepwell-backup-a")]
    status = fleet.cli("fleet", "status", "-c", str(fleet.config), "--json")
    assert [s["schedule_id"] for s in json.loads(status.stdout)["schedules"]] == [
        "keepwell-backup-a"]
    doc["sources"] = {}
    fleet.config.write_text(yaml.safe_dump(doc))
    assert apply() == [("delete", "keepwell-backup-a")]


def test_worker_killed_mid_backup_the_job_completes_on_another(fleet: Fleet) -> None:
    repo = fleet.root / "repo"
    init_repository(repo)
    data = fleet.root / "data" / "big"
    for i in range(6):
        write_random(data / f"part{i}.bin", 16 * MiB)
    fleet.write_config({
        # the retry's lease on the repository waits for the lost worker's lease to expire
        "limits": {"max_concurrent_per_repository": 1},
        "repositories": {"main": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"big": {"kind": "files", "repository": "main", "paths": [str(data)],
                            "site": "east", "upload_limit": "8MiB"}},
    })
    first = fleet.worker("east")
    waiter = subprocess.Popen([*MAIN, "fleet", "run", "big", "-c", str(fleet.config), "--wait",
                               "--json"], env=fleet.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    wait_for(lambda: [r for r in fleet.runs() if r["status"] == "running"], "the job to start")
    second = fleet.worker("east")
    # The first worker has the job (the second was not polling yet). Kill it once an index
    # object lists some of its packs (every 4 packs): a pack stored after the last index
    # object is an orphan, uploaded again by the retry.
    indexes = len(files(repo / "index"))
    wait_for(lambda: len(files(repo / "index")) > indexes, "the backup's first index object")
    assert fleet.runs()[0]["pid"] == first.pid
    uploaded_before = sum(p.stat().st_size for p in files(repo / "data"))
    first.send_signal(signal.SIGKILL)
    first.wait()
    stdout, stderr = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, stderr
    out = json.loads(stdout)
    step = out["steps"][0]
    assert step["attempt"] >= 2
    assert step["worker"] == f"east/{socket.gethostname()}/{second.pid}"
    snaps = [s for s in snapshots(fleet, repo)]
    assert len(snaps) == 1 and snaps[0]["id"] == step["snapshot_id"]
    assert restore(fleet, repo, step["snapshot_id"], data) == tree(data)
    runs = fleet.runs()
    assert [(r["status"], r["pid"]) for r in runs] == [("interrupted", first.pid),
                                                       ("succeeded", second.pid)]
    total = 6 * 16 * MiB
    retried = runs[1]["bytes_uploaded"]
    print(f"\nkilled after {uploaded_before} bytes of packs; the retry uploaded {retried} "
          f"bytes of {total} ({retried / total:.0%})")
    assert retried <= total - 16 * MiB  # the indexed packs of the lost worker were reused
    assert budget_leases(fleet, "keepwell-budget-repository-main") == []  # all released


def test_client_commands_exit_with_their_own_code(fleet: Fleet) -> None:
    _two_sites(fleet)
    for i in range(10):
        if i % 2:
            proc = fleet.cli("fleet", "jobs", "-c", str(fleet.config), "--json")
            assert proc.returncode == 0, (i, proc.returncode, proc.stderr)
            json.loads(proc.stdout)
        else:
            proc = fleet.cli("fleet", "run", "nosuch", "-c", str(fleet.config))
            assert proc.returncode == 2, (i, proc.returncode, proc.stderr)
            assert proc.stderr.count("\n") == 1 and "no source or drill named" in proc.stderr


def test_server_killed_and_restarted_mid_run_the_run_completes(tmp_path: Path) -> None:
    """SIGKILL the Temporal server in the middle of a backup and start it again on the same
    ports and database: the worker and the waiting client reconnect by themselves, the run
    completes with one snapshot that restores exactly."""
    server_root = tmp_path / "server"
    server_root.mkdir()
    ports = (free_port(), free_port(), free_port())
    proc = start_server(server_root, ports)
    (tmp_path / "ws").mkdir()
    fleet = Fleet(tmp_path / "ws", server_root / "server.log", f"127.0.0.1:{ports[0]}")
    try:
        repo = fleet.root / "repo"
        init_repository(repo)
        data = fleet.root / "data" / "big"
        for i in range(4):
            write_random(data / f"part{i}.bin", 16 * MiB)
        fleet.write_config({
            "repositories": {"main": {"location": str(repo),
                                      "password": "env:KW_TEST_PASSWORD"}},
            "sources": {"big": {"kind": "files", "repository": "main", "paths": [str(data)],
                                "site": "east", "upload_limit": "8MiB"}},
        })
        worker = fleet.worker("east")
        waiter = subprocess.Popen([*MAIN, "fleet", "run", "big", "-c", str(fleet.config),
                                   "--wait", "--json"], env=fleet.env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        wait_for(lambda: files(repo / "data"), "the backup's first pack")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = start_server(server_root, ports)
        stdout, stderr = waiter.communicate(timeout=180)
        assert waiter.returncode == 0, stderr
        out = json.loads(stdout)
        assert out["status"] == "succeeded"
        step = out["steps"][0]
        assert step["worker"] == f"east/{socket.gethostname()}/{worker.pid}"
        snaps = snapshots(fleet, repo)
        assert [s["id"] for s in snaps] == [step["snapshot_id"]]
        assert restore(fleet, repo, step["snapshot_id"], data) == tree(data)
        assert worker.poll() is None  # the worker lived through the outage
    finally:
        fleet.stop_workers()
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _run_all(fleet: Fleet, names: list[str]) -> list[dict[str, Any]]:
    """Start runs of ``names`` at once and wait for all of them to succeed."""
    waiters = [subprocess.Popen([*MAIN, "fleet", "run", name, "-c", str(fleet.config), "--wait",
                                 "--json"], env=fleet.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for name in names]
    outs = []
    for waiter in waiters:
        stdout, stderr = waiter.communicate(timeout=180)
        assert waiter.returncode == 0, stderr
        outs.append(json.loads(stdout))
    return outs


def test_repository_cap_holds_across_workers(fleet: Fleet) -> None:
    """Per-repository cap 1, three workers: two runs of sources on the same repository never run
    at once; a third on another repository is not held back by them."""
    repo, other = fleet.root / "repo", fleet.root / "other"
    init_repository(repo)
    init_repository(other)
    paths = {}
    for name in ("a", "b", "c"):
        paths[name] = fleet.root / "data" / name
        write_random(paths[name] / "f.bin", 3 * MiB)
    pw = "env:KW_TEST_PASSWORD"
    fleet.write_config({
        "limits": {"max_concurrent_per_repository": 1},
        "repositories": {"main": {"location": str(repo), "password": pw},
                         "other": {"location": str(other), "password": pw,
                                   "max_concurrent_jobs": 2}},
        "sources": {name: {"kind": "files", "repository": "other" if name == "c" else "main",
                           "paths": [str(path)], "site": "east", "upload_limit": "2MiB"}
                    for name, path in paths.items()},
    })
    workers = [fleet.worker("east") for _ in range(3)]
    outs = _run_all(fleet, ["a", "b", "c"])
    assert [o["status"] for o in outs] == ["succeeded"] * 3
    runs = {r["source"]: r for r in fleet.runs()}
    assert sorted(runs) == ["a", "b", "c"] and all(r["status"] == "succeeded"
                                                   for r in runs.values())
    first, second = sorted((runs["a"], runs["b"]), key=lambda r: r["started_at"])
    assert first["ended_at"] <= second["started_at"]  # one job at once on repository main
    assert len({r["pid"] for r in runs.values()}) >= 2  # the jobs did spread over the workers
    assert {r["pid"] for r in runs.values()} <= {w.pid for w in workers}
    for name, run in runs.items():
        restored = restore(fleet, other if name == "c" else repo, run["snapshot_id"],
                            paths[name])
        assert restored == tree(paths[name])


def test_a_worker_runs_max_concurrent_jobs_at_once_by_default(fleet: Fleet) -> None:
    """Without ``--max-jobs`` a worker takes ``limits.max_concurrent_jobs`` as its machine's cap,
    as the daemon does: with 1, two runs on two repositories (no budget between them) take turns."""
    pw = "env:KW_TEST_PASSWORD"
    repos, paths = {}, {}
    for name in ("a", "b"):
        repos[name] = fleet.root / f"repo-{name}"
        init_repository(repos[name])
        paths[name] = fleet.root / "data" / name
        write_random(paths[name] / "f.bin", 3 * MiB)
    fleet.write_config({
        "limits": {"max_concurrent_jobs": 1},
        "repositories": {name: {"location": str(repo), "password": pw}
                         for name, repo in repos.items()},
        "sources": {name: {"kind": "files", "repository": name, "paths": [str(path)],
                           "site": "east", "upload_limit": "2MiB"}
                    for name, path in paths.items()},
    })
    worker = fleet.worker("east", max_jobs=None)
    assert '"max_jobs": 1' in fleet.log(worker)
    outs = _run_all(fleet, ["a", "b"])
    assert [o["status"] for o in outs] == ["succeeded"] * 2
    first, second = sorted(fleet.runs(), key=lambda r: r["started_at"])
    assert first["ended_at"] <= second["started_at"]


def test_site_upload_budget_is_shared_by_the_sites_workers(fleet: Fleet) -> None:
    """``limits.upload`` is the site's budget: three workers' jobs together upload no faster."""
    repo = fleet.root / "repo"
    init_repository(repo)
    budget = 6 * MiB
    paths = {}
    for name in ("a", "b", "c"):
        paths[name] = fleet.root / "data" / name
        write_random(paths[name] / "f.bin", 12 * MiB)
    fleet.write_config({
        "limits": {"upload": budget},
        "repositories": {"main": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {name: {"kind": "files", "repository": "main", "paths": [str(path)],
                           "site": "east"} for name, path in paths.items()},
    })
    for _ in range(3):
        fleet.worker("east")
    outs = _run_all(fleet, ["a", "b", "c"])
    assert [o["status"] for o in outs] == ["succeeded"] * 3
    runs = fleet.runs()
    assert len(runs) == 3 and all(r["status"] == "succeeded" for r in runs)
    uploaded = sum(r["bytes_uploaded"] for r in runs)
    span = max(r["ended_at"] for r in runs) - min(r["started_at"] for r in runs)
    print(f"\n3 jobs uploaded {uploaded} bytes in {span:.2f} s "
          f"({uploaded / span / MiB:.1f} MiB/s; site budget {budget / MiB:.0f} MiB/s)")
    # the ceiling: the budget over the jobs' span, plus one second of burst per job while the
    # jobs' shares follow the holders (renewed every heartbeat)
    assert uploaded >= 36 * MiB
    assert uploaded <= budget * span + 3 * budget


def _streamer(fleet: Fleet, source: str) -> int | None:
    """The pid of the streamer the job history records for ``source``."""
    import sqlite3

    db = sqlite3.connect(fleet.history, timeout=30)
    try:
        row = db.execute("SELECT pid FROM streamers WHERE source=?", (source,)).fetchone()
    except sqlite3.OperationalError:  # no streamer has ever run: the table is not made yet
        row = None
    finally:
        db.close()
    return int(row[0]) if row else None


def _streamer_command(fleet: Fleet, source: str) -> list[str]:
    import sqlite3

    db = sqlite3.connect(fleet.history, timeout=30)
    try:
        row = db.execute("SELECT command FROM streamers WHERE source=?", (source,)).fetchone()
    finally:
        db.close()
    return list(json.loads(row[0])) if row else []


def _runs(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def test_a_continuous_source_is_watched_on_a_worker_of_its_site(fleet: Fleet) -> None:
    repo = fleet.root / "repo"
    init_repository(repo)
    data = fleet.root / "data" / "live"
    data.mkdir(parents=True)
    (data / "first.txt").write_text("one\n")
    doc: dict[str, Any] = {
        "repositories": {"main": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"live": {"kind": "files", "repository": "main", "paths": [str(data)],
                             "site": "east", "mode": "continuous", "max_delay": "200ms"}},
    }
    fleet.write_config(doc)

    def apply() -> list[tuple[str, str, str | None]]:
        proc = fleet.cli("fleet", "apply", "-c", str(fleet.config), "--json")
        assert proc.returncode == 0, proc.stderr
        return [(s["op"], s["schedule_id"], s["site"]) for s in json.loads(proc.stdout)["plan"]]

    def held(name: str) -> bool:
        proc = fleet.cli("-r", str(repo), "--password-file", str(fleet.root / "pw"), "ls",
                         "latest", "--json")
        return proc.returncode == 0 and any(
            row["path"] == f"{data}/{name}" for row in json.loads(proc.stdout))

    first = fleet.worker("east")
    assert apply() == [("start", "keepwell-stream-live", "east")]
    wait_for(lambda: held("first.txt"), "the watcher's first snapshot")
    assert apply() == [("unchanged", "keepwell-stream-live", "east")]

    def streams() -> list[dict[str, Any]]:
        proc = fleet.cli("fleet", "status", "-c", str(fleet.config), "--json")
        assert proc.returncode == 0, proc.stderr
        return list(json.loads(proc.stdout)["streams"])

    shown = wait_for(lambda: [s for s in streams() if (s["figures"] or {}).get("up")],
                     "fleet status showing the streamer up")
    assert [(s["source"], s["worker"].split("/")[0]) for s in shown] == [("live", "east")]
    watcher = _streamer(fleet, "live")
    assert watcher is not None and _runs(watcher)
    # its worker is killed: another worker of the site takes the streamer over, stopping the
    # watcher the killed one left behind
    first.send_signal(signal.SIGKILL)
    first.wait()
    fleet.worker("east")
    wait_for(lambda: _streamer(fleet, "live") not in (None, watcher), "the streamer moving")
    assert not _runs(watcher)
    (data / "second.txt").write_text("two\n")
    wait_for(lambda: held("second.txt"), "a change seen by the new worker's watcher")
    # a changed source restarts its streamer, with the file as it now is on the worker; a
    # removed one has it stopped
    assert "0.2s" in _streamer_command(fleet, "live")
    doc["sources"]["live"]["max_delay"] = "300ms"
    fleet.write_config(doc)
    assert apply() == [("restart", "keepwell-stream-live", "east")]
    wait_for(lambda: "0.3s" in _streamer_command(fleet, "live"), "the restarted streamer")
    watcher = _streamer(fleet, "live")
    assert watcher is not None
    doc["sources"]["live"]["mode"] = "scheduled"
    fleet.write_config(doc)
    assert apply() == [("stop", "keepwell-stream-live", None)]
    assert not _runs(watcher)  # stopped before apply returned
    assert _streamer(fleet, "live") is None
    assert apply() == []
    assert streams() == []


# a streamer whose lag grows past the alert's limit, then stays up until it is stopped
LAGGING = """
import json, signal
for i in range(5):
    print(json.dumps({"lag_seconds": 100 + 10 * i}), flush=True)
signal.pause()
"""


def test_a_streamers_lag_alert_and_a_worker_with_another_file(fleet: Fleet) -> None:
    """A streamer on a worker raises its source's lag alert as the daemon's does; a worker
    whose file gives the source other settings than the file applied refuses the stream, and
    it runs on a worker with the right file."""
    repo = fleet.root / "repo"
    init_repository(repo)
    script = fleet.root / "lagging.py"
    script.write_text(LAGGING)
    alerts = fleet.root / "alerts.jsonl"
    notify = [sys.executable, "-c",
              f"import sys; open({str(alerts)!r}, 'a').write(sys.stdin.read() + '\\n')"]
    stream = {"command": [sys.executable, str(script)], "restart_base": "0.2s",
              "lag_alert": "60s"}
    doc: dict[str, Any] = {
        "repositories": {"main": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"pg": {"kind": "postgres", "repository": "main", "site": "east",
                           "connection": {"host": "127.0.0.1", "port": 1}, "stream": stream}},
        "notifications": [{"command": notify}],
    }
    fleet.write_config(doc)
    stale = fleet.root / "stale.yaml"
    stale.write_text(fleet.config.read_text().replace("lag_alert: 60s", "lag_alert: 30s"))
    assert stale.read_text() != fleet.config.read_text()
    other = fleet.worker("east", config=stale)
    proc = fleet.cli("fleet", "apply", "-c", str(fleet.config))
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: fleet.log(other).count('"stream_refused"') >= 2,
             "the worker with another file refusing the stream, twice")
    assert _streamer(fleet, "pg") is None and not alerts.exists()
    other.send_signal(signal.SIGKILL)
    other.wait()
    fleet.worker("east")
    wait_for(lambda: alerts.exists() and '"log_lag"' in alerts.read_text(),
             "the lag alert from the streamer on the right worker")
    events = [json.loads(line) for line in alerts.read_text().splitlines() if line]
    [alert] = [e for e in events if e.get("kind") == "log_lag"]
    assert alert["event"] == "alert" and alert["source"] == "pg"
    assert "streaming lag of pg" in alert["message"]
