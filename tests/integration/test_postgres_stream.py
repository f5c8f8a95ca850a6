"""WAL streaming with pg_receivewal: what the repository restores trails the server < 1 s."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from datetime import datetime

import pytest

from tests.servers.postgres import (
    PgCluster,
    PgEnv,
    as_pg_user,
    free_port,
    keepwell_argv,
)
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_streaming_rpo_under_a_second_after_immediate_stop(pg_env: PgEnv) -> None:
    c = PgCluster(pg_env.workdir).initdb().start()
    c.pgbench_init(1)
    c.sql("CREATE TABLE ticks (n int, t timestamptz DEFAULT clock_timestamp())")
    stream_dir = pg_env.workdir / "stream"
    streamer = subprocess.Popen(
        as_pg_user(keepwell_argv("wal-stream", "--dir", str(stream_dir), "--db-url", c.url(),
                                 "--interval", "0.2", "--exit-on-disconnect")),
        env=pg_env.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not c.scalar("SELECT count(*) FROM pg_stat_replication"):
            assert time.monotonic() < deadline and streamer.poll() is None, streamer.stderr
            time.sleep(0.1)
        pg_env.keepwell("backup", "--physical", "--db-url", c.url(), "--wait-timeout", "60")

        acked: list[datetime] = []
        stop = threading.Event()

        def ticker() -> None:
            n = 0
            with c.connect() as conn:
                while not stop.is_set():
                    try:
                        row = conn.execute("INSERT INTO ticks (n) VALUES (%s) RETURNING t",
                                           (n,)).fetchone()
                        assert row is not None
                        t = row[0]
                    except Exception:  # the server went away: stop ticking
                        return
                    acked.append(t)
                    n += 1
                    time.sleep(0.02)

        thread = threading.Thread(target=ticker)
        with c.pgbench_load(seconds=30):
            thread.start()
            wait_for(lambda: len(acked) >= 50, "commits acknowledged under load")
            c.stop("immediate")
        stop.set()
        thread.join(10)
        streamer.wait(60)
    finally:
        if streamer.poll() is None:
            streamer.kill()
            streamer.wait()
    newest_acked = max(acked)

    port = free_port()
    out = pg_env.keepwell("restore", "--target-dir", str(pg_env.workdir / "restored"),
                          "--start", "--port", str(port), "--json")
    assert json.loads(out.stdout)["started"]
    r = PgCluster(pg_env.workdir, "restored", port=port)
    newest_restored = r.scalar("SELECT max(t) FROM ticks")
    lag = (newest_acked - newest_restored).total_seconds()
    assert lag <= 1.0, (newest_acked, newest_restored)
    r.stop("immediate")
