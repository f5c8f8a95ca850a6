"""MariaDB through the control plane, against a real server: `keepwell run` and `keepwell drill`
into a temporary ``mariadbd`` (physical: mariabackup restore; logical: mariadb-install-db and
the dump), with CHECK TABLE and row counts, and a drill that fails on a corrupted backup.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.control_support import (
    CLI,
    PASSWORD,
    WebhookSink,
    env,
    init_repository,
)
from tests.servers.mariadb import ROOT_PASSWORD, MariaDBServer, fill_sample, mariadb_available

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEEPWELL = [sys.executable, "-m", "keepwell.cli.main"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MariaDBServer]:
    if not mariadb_available():
        pytest.skip("MariaDB is not installed")
    s = MariaDBServer(tmp_path / "server")
    (tmp_path / "server").mkdir()
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def hook() -> Iterator[WebhookSink]:
    sink = WebhookSink()
    yield sink
    sink.close()


def _cli(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    e = env()
    e["KW_DB_PASSWORD"] = ROOT_PASSWORD
    res = subprocess.run([*CLI, *args, "-c", str(config)], env=e, capture_output=True,
                         text=True, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"{args} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


@pytest.mark.parametrize("mode", ["physical", "logical"])
def test_drill_into_a_temporary_mariadb(server: MariaDBServer, tmp_path: Path, mode: str,
                                        hook: WebhookSink) -> None:
    fill_sample(server, "shop", rows=3000)
    repo = tmp_path / "repo"
    init_repository(repo)
    config = tmp_path / "keepwell.yaml"
    # scratch space too deep for a socket's path (107 bytes): the server's socket goes elsewhere
    scratch = tmp_path / ("deep-scratch-" * 6) / "scratch"
    assert len(str(scratch / "drill-shop-xxxxxxxx" / "data" / "mysqld.sock")) > 107
    doc: dict[str, Any] = {
        "history": str(tmp_path / "history.db"),
        "scratch": str(scratch),
        "repositories": {"main": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"shop": {"kind": "mysql", "repository": "main", "mode": mode,
                             "connection": {"host": "127.0.0.1", "port": server.port,
                                            "user": "root", "password": "env:KW_DB_PASSWORD"}}},
        "drills": {"shop-drill": {"source": "shop", "tables": {"shop.items": 3000}}},
        "notifications": [{"webhook": hook.url}],
    }
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = json.loads(_cli(config, "run", "shop", "--json").stdout)
    assert out["status"] == "succeeded", out
    status = json.loads(_cli(config, "status", "--json").stdout)
    assert status["sources"][0]["pitr"]["from"] is None, "no binlogs archived yet"
    server.sql("INSERT INTO shop.items VALUES (99999, 'after', 1, '')")
    # Archive the binlogs: the PITR window now runs from the base to the newest event.
    e = env()
    e.update(KEEPWELL_REPOSITORY=str(repo), KEEPWELL_PASSWORD=PASSWORD)
    subprocess.run([*KEEPWELL, "mysql", "binlog-push", "--flush", "--db-url", server.url],
                   env=e, check=True, capture_output=True, timeout=120)
    status = json.loads(_cli(config, "status", "--json").stdout)
    w = status["sources"][0]["pitr"]
    assert w["error"] is None and w["problems"] == [] and w["parts"] == 1, w
    assert w["from"] is not None and w["to"] >= w["from"]
    assert w["end_age"] < 120
    assert "point-in-time restore windows:" in _cli(config, "status").stdout

    drill = json.loads(_cli(config, "drill", "shop-drill", "--json").stdout)
    assert drill["status"] == "succeeded", drill
    d = drill["details"]
    assert d["mode"] == mode
    assert d["row_counts"] == {"shop.items": 3000}, "the backup's rows, not the later one"
    assert d["tables_checked"] == 2  # items and audit, each through CHECK TABLE
    assert 0 < drill["rto"] < 300 and drill["rpo"] >= 0
    assert not list(scratch.iterdir()), "the scratch space is removed"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(scratch) not in ps, "the temporary server is stopped"

    # Every table counted when the drill names none.
    doc["drills"]["shop-drill"].pop("tables")
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    every = json.loads(_cli(config, "drill", "shop-drill", "--json").stdout)["details"]
    assert every["row_counts"] == {"shop.audit": 0, "shop.items": 3000}

    # A corrupted backup fails the drill, in one line, with an alert.
    for pack in (p for p in (repo / "data").rglob("*") if p.is_file()):
        data = bytearray(pack.read_bytes())
        for off in range(len(data) // 4, len(data), max(1, len(data) // 8)):
            data[off] ^= 0xFF
        pack.write_bytes(bytes(data))
    bad = _cli(config, "drill", "shop-drill", check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "drill shop-drill failed" in errors[0]
    assert [e["source"] for e in hook.of("alert", "drill_failed")] == ["shop"]
    assert not list(scratch.iterdir())
