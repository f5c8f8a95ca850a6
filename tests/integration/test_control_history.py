"""The job history's cases against both stores: SQLite and a real PostgreSQL.

The cases are those of tests/unit/test_control_history.py, collected here again with
``history_at`` parametrized over a SQLite file and a fresh database in a PostgreSQL cluster
started for this module (as the unprivileged ``postgres`` user, as every test server).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.control_support import pg_history_cluster
from tests.servers.postgres import PgCluster
from tests.unit.test_control_history import (  # noqa: F401 - collected here for both stores
    test_a_live_writer_is_not_taken_for_a_crash,
    test_alert_notifies_once_while_active,
    test_an_acknowledged_alert_stays_active_until_resolved_and_reopens,
    test_breaker_states_persist,
    test_concurrent_writers_lose_nothing,
    test_runs_are_recorded_with_their_figures,
    test_runs_keep_their_log_lines,
    test_runs_of_a_dead_process_are_found_as_interrupted,
)

pytestmark = [pytest.mark.integration]

_NAMES = itertools.count()


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    with pg_history_cluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgres"])
def history_at(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "h.db")
    cluster: PgCluster = request.getfixturevalue("pg")
    name = f"history_{os.getpid()}_{next(_NAMES)}"
    cluster.sql(f"CREATE DATABASE {name}")
    return cluster.url(name)


def test_password_by_reference_and_errors(pg: PgCluster, tmp_path: Path) -> None:
    """A history that needs a password reads it from history_password (env:/file:); a wrong
    one is one clear line, with no password in it."""
    cluster = pg
    cluster.sql("CREATE DATABASE history_auth")
    cluster.sql("CREATE ROLE kwhist LOGIN PASSWORD 'hist-secret'")
    cluster.sql("GRANT ALL ON DATABASE history_auth TO kwhist")
    cluster.sql("ALTER DATABASE history_auth OWNER TO kwhist")
    repo = tmp_path / "repo"
    cfg = tmp_path / "keepwell.yaml"
    url = f"postgresql://kwhist@127.0.0.1:{cluster.port}/history_auth"
    cfg.write_text(f"history: {url}\nhistory_password: env:KW_HIST_PW\n"
                   f"repositories: {{r: {{location: {repo}, password: env:KW_TEST_PASSWORD}}}}\n")
    env = dict(os.environ, KW_HIST_PW="hist-secret", KEEPWELL_TESTONLY_WEAK_KDF="1")
    cli = [sys.executable, "-m", "keepwell.cli.control"]
    ok = subprocess.run([*cli, "jobs", "--json", "-c", str(cfg)], env=env, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "[]"
    bad = subprocess.run([*cli, "jobs", "-c", str(cfg)], env={**env, "KW_HIST_PW": "wrong"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "cannot open the job history" in bad.stderr
    assert "wrong" not in bad.stderr and "Traceback" not in bad.stderr
    inline = cfg.read_text().replace("kwhist@", "kwhist:hist-secret@")
    cfg.write_text(inline)
    refused = subprocess.run([*cli, "config", "check", "-c", str(cfg)], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "history_password" in refused.stderr


def test_jobs_of_a_name_the_file_does_not_hold_is_a_usage_error(tmp_path: Path) -> None:
    """``jobs --source`` with a typo says so and lists the names, instead of an empty list
    that reads as "never ran"; ``-n`` below 1 is refused."""
    cfg = tmp_path / "keepwell.yaml"
    cfg.write_text(f"history: {tmp_path / 'history.db'}\n"
                   f"repositories: {{main: {{location: {tmp_path / 'repo'}, "
                   "password: env:KW_TEST_PASSWORD}}\n"
                   f"sources: {{docs: {{kind: files, repository: main, paths: [{tmp_path}]}}}}\n")
    cli = [sys.executable, "-m", "keepwell.cli.control"]

    def jobs(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, "jobs", "-c", str(cfg), *args], capture_output=True,
                              text=True, timeout=60)

    assert jobs("--source", "docs", "--json").stdout.strip() == "[]"
    typo = jobs("--source", "dcos")
    assert typo.returncode == 2 and "named 'dcos'" in typo.stderr and "docs" in typo.stderr
    assert typo.stderr.count("\n") == 1 and "Traceback" not in typo.stderr
    assert jobs("-n", "0").returncode == 2
    assert jobs("-n", "-1").returncode == 2
