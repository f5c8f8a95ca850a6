"""A standby from the archive in one command: it starts, replays, and follows WAL archived after
it started, as pgBackRest's ``restore --type=standby`` does."""

from __future__ import annotations

import json
import time

import pytest

from tests.servers.postgres import PgCluster, PgEnv, backed_up_cluster, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_standby_follows_the_archive(pg_env: PgEnv) -> None:
    c = backed_up_cluster(pg_env)
    c.sql("INSERT INTO marks SELECT generate_series(1, 100)")
    c.switch_wal()
    c.wait_archived()
    port = free_port()
    out = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "standby"),
                          "--standby", "--start", "--port", str(port), "--json")
    assert json.loads(out.stdout)["started"] is True
    s = PgCluster(pg_env.workdir, "standby", port=port)
    assert s.scalar("SELECT pg_is_in_recovery()") is True
    assert (s.datadir / "standby.signal").exists()
    assert not (s.datadir / "recovery.signal").exists()
    assert s.scalar("SELECT count(*) FROM marks") == 100

    # WAL archived after the standby started reaches it
    c.sql("INSERT INTO marks SELECT generate_series(101, 250)")
    c.switch_wal()
    c.wait_archived()
    deadline = time.monotonic() + 120
    while s.scalar("SELECT count(*) FROM marks") != 250:
        assert time.monotonic() < deadline, "the standby did not replay the new WAL"
        time.sleep(0.5)
    assert s.scalar("SELECT pg_is_in_recovery()") is True
    s.stop("immediate")

    refused = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "s2"),
                              "--standby", "--target-lsn", "0/1000000", check=False)
    assert refused.returncode != 0 and "no recovery target" in refused.stderr
