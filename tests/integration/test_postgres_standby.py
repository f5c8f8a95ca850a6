"""A standby from the archive in one command: it starts, replays, and follows WAL archived after
it started, as pgBackRest's ``restore --type=standby`` does."""

from __future__ import annotations

import json
import time

import pytest

from tests.servers.postgres import PgCluster, PgEnv, backed_up_cluster, free_port
from tests.waiting import wait_for

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


def test_a_restored_standby_leaves_the_live_standbys_promote_trigger_alone(
        pg_env: PgEnv) -> None:
    """A standby's configuration names its promote trigger file (PostgreSQL 15 and older):
    a restored copy that watched the same file would promote itself on the live standby's
    failover and delete the file, so the live standby would never see it."""
    trigger = pg_env.workdir / "promote.trigger"
    c = PgCluster(pg_env.workdir).initdb(archive_timeout=0,
                                         promote_trigger_file=f"'{trigger}'")
    c.set_archive_command(pg_env.wal_hook_command("push", "%p"))
    c.start()
    assert int(c.scalar("SHOW server_version_num")) < 160000, \
        "promote_trigger_file is a setting of PostgreSQL 15 and older (the one CI installs)"
    c.sql("CREATE TABLE marks (i int PRIMARY KEY)")
    pg_env.keepwell("backup", "--physical", "--db-url", c.url())
    c.switch_wal()
    c.wait_archived()
    port = free_port()
    pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "standby"), "--standby",
                    "--start", "--port", str(port))
    s = PgCluster(pg_env.workdir, "standby", port=port)
    c.run_as_pg(["touch", str(trigger)])  # the live standby's failover
    # WAL archived after the trigger appeared, replayed: the standby's startup process has
    # looked for a trigger between segments since then
    c.sql("INSERT INTO marks VALUES (1)")
    c.switch_wal()
    c.wait_archived()
    wait_for(lambda: s.scalar("SELECT count(*) FROM marks") == 1, "the standby to replay",
             timeout=120)
    assert trigger.exists(), "the restored standby took the live standby's trigger"
    assert s.scalar("SELECT pg_is_in_recovery()") is True
    assert s.scalar("SHOW promote_trigger_file") == ""
    s.stop("immediate")
