"""PostgreSQL through the control plane, against a real cluster that archives its WAL into the
repository: `keepwell run` (physical), the PITR window in `status`/`status --json`/`/metrics`,
and `keepwell drill` into a temporary server (run as the unprivileged `postgres` user when the
test runs as root), which must fail and alert once the backup is corrupted.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import tests.servers.postgres as servers_pg
from tests.integration.control_support import WebhookSink, scrape
from tests.servers.postgres import PG_USER, PgCluster, PgEnv, as_pg_user, chown_pg

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLI = [servers_pg.PYTHON, "-m", "keepwell.cli.control"]


@pytest.fixture
def hook() -> Iterator[WebhookSink]:
    sink = WebhookSink()
    yield sink
    sink.close()


def _env(pg: PgEnv) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "KEEPWELL_"))}
    env.update(HOME=str(pg.workdir), KEEPWELL_TESTONLY_WEAK_KDF="1",
               PYTHONPATH=str(servers_pg.REPO_ROOT / "src"))
    return env


def _cli(pg: PgEnv, config: Path, *args: str, as_postgres: bool = False,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [*CLI, *args, "-c", str(config)]
    res = subprocess.run(as_pg_user(argv) if as_postgres else argv, env=_env(pg),
                         capture_output=True, text=True, timeout=600, cwd=str(pg.workdir))
    if check and res.returncode != 0:
        raise AssertionError(f"keepwell {' '.join(args)} exited {res.returncode}:\n"
                             f"{res.stdout}\n{res.stderr}")
    return res



def _metrics_port(log: Path, proc: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if '"metrics_listening"' in line:
                return int(json.loads(line)["address"].rsplit(":", 1)[1])
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no metrics endpoint:\n{log.read_text()[-2000:]}")


def _server_processes(path: Path) -> list[str]:
    res = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True)
    return [ln for ln in res.stdout.splitlines() if str(path) in ln and "postgres" in ln]


def test_physical_backup_pitr_window_and_drill_into_a_temporary_server(
        pg_env: PgEnv, hook: WebhookSink) -> None:
    c = PgCluster(pg_env.workdir).initdb()
    c.set_archive_command(pg_env.wal_hook_command("push", "%p"))
    c.start()
    c.sql("CREATE TABLE items (id int PRIMARY KEY, note text)")
    c.sql("INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 1000) g")
    state = pg_env.workdir / "state"
    state.mkdir()
    chown_pg(state)
    config = pg_env.workdir / "keepwell.yaml"
    doc: dict[str, Any] = {
        "history": str(state / "history.db"),
        "scratch": str(pg_env.workdir / "scratch"),
        "metrics": {"listen": "127.0.0.1:0"},
        "repositories": {"main": {"location": str(pg_env.repo),
                                  "password": f"file:{pg_env.password_file}"}},
        "sources": {"orders": {"kind": "postgres", "repository": "main", "mode": "physical",
                               "connection": {"host": "127.0.0.1", "port": c.port,
                                              "user": PG_USER, "database": "postgres"}}},
        "drills": {"orders-drill": {"source": "orders",
                                    "tables": {"public.items": 1500}}},
        "notifications": [{"webhook": hook.url}],
    }
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    chown_pg(config)

    # The backup runs as the cluster's owner, as archive_command does: both write the
    # repository.
    t_before = time.time()
    out = json.loads(_cli(pg_env, config, "run", "orders", "--json", as_postgres=True).stdout)
    assert out["status"] == "succeeded", out
    # Rows written after the backup reach the repository through archived WAL only.
    c.sql("INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1001, 1500) g")
    c.switch_wal()
    c.wait_archived()
    t_archived = time.time()

    # PITR window: from the backup's end to the newest archived WAL.
    status = json.loads(_cli(pg_env, config, "status", "--json").stdout)
    (src,) = status["sources"]
    w = src["pitr"]
    assert w["error"] is None and w["parts"] == 1, w
    assert t_before - 1 <= w["from"] <= w["to"] <= t_archived + 1
    assert w["to"] > w["from"], "the archived WAL reaches past the backup's end"
    assert w["seconds"] == pytest.approx(w["to"] - w["from"])
    text = _cli(pg_env, config, "status").stdout
    assert "point-in-time restore windows:" in text and "orders" in text.split("windows:")[1]

    # ... and as metrics of a running daemon.
    log = pg_env.workdir / "daemon.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([*CLI, "daemon", "-c", str(config), "--log-json"], env=_env(pg_env),
                                stdout=logf, stderr=logf)
        try:
            metrics = scrape(_metrics_port(log, proc))
        finally:
            proc.terminate()
            proc.wait(30)
    (span,) = [v for lab, v in metrics["keepwell_pitr_window_seconds"]
               if lab["source"] == "orders"]
    assert span == pytest.approx(w["seconds"], abs=1e-3)
    (end,) = [v for lab, v in metrics["keepwell_pitr_window_end_timestamp_seconds"]
              if lab["source"] == "orders"]
    assert end == pytest.approx(w["to"], abs=1e-3)

    # The drill (run as root here: its server runs as postgres) restores, replays the archived
    # WAL, checks with pg_amcheck and counts the rows.
    res = _cli(pg_env, config, "drill", "orders-drill", "--json")
    drill = json.loads(res.stdout)
    assert drill["status"] == "succeeded", drill
    d = drill["details"]
    assert d["mode"] == "physical" and d["row_counts"]["postgres.public.items"] == 1500
    has_amcheck = os.access(os.path.join(c.bindir, "pg_amcheck"), os.X_OK)
    assert d["amcheck"] == ("ok" if has_amcheck else "unavailable")
    if os.geteuid() == 0:
        assert d["server_user"] == PG_USER
    assert 0 < drill["rto"] < 300
    assert 0 <= drill["rpo"] <= time.time() - w["to"] + 5
    scratch = pg_env.workdir / "scratch"
    assert not list(scratch.iterdir()), "the drill's scratch space is removed"
    assert not _server_processes(scratch), "the drill's server is stopped"
    runs = json.loads(_cli(pg_env, config, "jobs", "--json").stdout)
    recorded = next(r for r in runs if r["action"] == "drill")
    assert recorded["status"] == "succeeded" and recorded["rto"] == drill["rto"]
    assert recorded["rpo"] == drill["rpo"]

    # A drill that wants more rows than the backup holds fails.
    doc["drills"]["orders-drill"]["tables"] = {"public.items": 1501}
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    short = _cli(pg_env, config, "drill", "orders-drill", check=False)
    assert short.returncode == 1 and "holds 1500 rows" in short.stderr
    assert [e["source"] for e in hook.of("alert", "drill_failed")] == ["orders"]
    doc["drills"]["orders-drill"]["tables"] = {"public.items": 1500}
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    _cli(pg_env, config, "drill", "orders-drill")
    assert [e["source"] for e in hook.of("resolved", "drill_failed")] == ["orders"]
    hook.events.clear()

    # Corrupt the stored data: the drill must fail, say why in one line, and alert.
    packs = [p for p in (pg_env.repo / "data").rglob("*") if p.is_file()]
    assert packs
    for pack in packs:
        data = bytearray(pack.read_bytes())
        for off in range(len(data) // 4, len(data), max(1, len(data) // 8)):
            data[off] ^= 0xFF
        pack.write_bytes(bytes(data))
    bad = _cli(pg_env, config, "drill", "orders-drill", check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: drill orders-drill failed")
    assert "corrupt" in errors[0]
    alerts = hook.of("alert", "drill_failed")
    assert len(alerts) == 1 and alerts[0]["source"] == "orders"
    status = json.loads(_cli(pg_env, config, "status", "--json").stdout)
    (src,) = status["sources"]
    assert src["drill_status"] == "failed" and "drill_failed" in src["alerts"]
    assert not list(scratch.iterdir()) and not _server_processes(scratch)


def test_logical_drill_restores_into_a_fresh_cluster(pg_env: PgEnv) -> None:
    c = PgCluster(pg_env.workdir).initdb().start()
    c.sql("CREATE DATABASE shop")
    c.sql("CREATE TABLE items (id int PRIMARY KEY, qty int)", dbname="shop")
    c.sql("INSERT INTO items SELECT g, g % 7 FROM generate_series(1, 2500) g", dbname="shop")
    c.sql("CREATE SCHEMA audit", dbname="shop")
    c.sql("CREATE TABLE audit.log AS SELECT g AS id FROM generate_series(1, 40) g",
          dbname="shop")
    state = pg_env.workdir / "state"
    state.mkdir()
    chown_pg(state)
    config = pg_env.workdir / "keepwell.yaml"
    # scratch space too deep for a socket's path (107 bytes): the server's socket goes elsewhere
    scratch = pg_env.workdir / ("deep-scratch-" * 8) / "scratch"
    scratch.mkdir(parents=True)
    for d in (scratch.parent, scratch):
        d.chmod(0o755)
    chown_pg(scratch)
    assert len(str(scratch / "sock" / ".s.PGSQL.65535")) > 107
    config.write_text(yaml.safe_dump({
        "history": str(state / "history.db"),
        "scratch": str(scratch),
        "repositories": {"main": {"location": str(pg_env.repo),
                                  "password": f"file:{pg_env.password_file}"}},
        "sources": {"shop": {"kind": "postgres", "repository": "main", "mode": "logical",
                             "connection": {"host": "127.0.0.1", "port": c.port,
                                            "user": PG_USER, "database": "postgres"}}},
    }, sort_keys=False))
    chown_pg(config)
    out = json.loads(_cli(pg_env, config, "run", "shop", "--json", as_postgres=True).stdout)
    assert out["status"] == "succeeded", out
    c.sql("INSERT INTO items VALUES (9999, 1)", dbname="shop")
    # Drilled by source name (no drill section): every user table is counted.
    drill = json.loads(_cli(pg_env, config, "drill", "shop", "--json").stdout)
    assert drill["status"] == "succeeded", drill
    d = drill["details"]
    assert d["mode"] == "logical"
    assert d["row_counts"] == {"shop.public.items": 2500, "shop.audit.log": 40}
    assert 0 < drill["rto"] < 300 and 0 <= drill["rpo"] < 300
    status = json.loads(_cli(pg_env, config, "status", "--json").stdout)
    (src,) = status["sources"]
    assert src["pitr"]["from"] is None and "no complete physical backup" in (
        src["pitr"]["problems"][0])
    assert not list(scratch.iterdir())
