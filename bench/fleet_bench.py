"""Drive fleet mode through many tiny scheduled file jobs and measure what it adds per job.

A ``keepwell fleet server`` (the dev server, its state in a file), one repository per site, one
tiny file source per host spread over the sites, every source scheduled at the same second
(``fleet apply``), then ``keepwell worker`` processes (one or more per site). Figures:

* schedule lateness: from the Schedules' firing time to the job's start on a worker (schedule,
  workflow task, activity task, queueing behind the site's workers, history insert);
* overhead per job: a worker's time per job while the queue is full (the span from the first
  job's start to the last one's end, times the workers, over the jobs) minus the job's own
  recorded duration (workflow and activity tasks, the activity's set-up, completion round trips);
* the resident memory of the server and of each worker at the end.

Jobs queue behind each site's workers (``--max-jobs 1``): lateness grows with the sources per
worker. Latency figures depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

MAIN = [sys.executable, "-m", "keepwell.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", type=int, default=1000)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--workers-per-site", type=int, default=1)
    ap.add_argument("--lead", type=float, default=None,
                    help="seconds from the start to the schedules' second (default 30 + "
                         "sources / 4: apply creates a few Schedules a second on a busy machine)")
    ap.add_argument("--weak-kdf", action="store_true",
                    help="cheap key derivation (isolates the fleet's own cost from the KDF's)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kw-fleet-bench-"))
    env = dict(os.environ, KW_BENCH_PASSWORD="bench", KEEPWELL_CACHE_DIR=str(root / "cache"))
    if args.weak_kdf:
        env["KEEPWELL_TESTONLY_WEAK_KDF"] = "1"
        os.environ["KEEPWELL_TESTONLY_WEAK_KDF"] = "1"
    from keepwell.backends import open_backend
    from keepwell.repository import Repository

    port = free_port()
    address = f"127.0.0.1:{port}"
    env["KEEPWELL_FLEET_ADDRESS"] = address
    procs: list[subprocess.Popen[bytes]] = []
    server_log = open(root / "server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen([*MAIN, "fleet", "server", "--listen", address, "--db",
                               str(root / "temporal.db"), "--http-port", str(free_port()),
                               "--metrics-port", str(free_port())],
                              stdout=server_log, stderr=server_log, env=env)
    procs.append(server)
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        sites = [f"site{i}" for i in range(args.sites)]
        repos = {}
        for site in sites:
            Repository.init(open_backend(str(root / "repos" / site)), "bench").close()
            repos[site] = {"location": str(root / "repos" / site),
                           "password": "env:KW_BENCH_PASSWORD"}
        # the same second for every source, far enough ahead for apply and the workers
        lead = args.lead if args.lead is not None else 30 + args.sources / 4
        fire = int(time.time() + lead)
        at = datetime.fromtimestamp(fire, UTC)
        sources = {}
        for i in range(args.sources):
            data = root / "data" / f"h{i}"
            data.mkdir(parents=True)
            (data / "f.txt").write_bytes(os.urandom(2048))
            site = sites[i % len(sites)]
            sources[f"h{i}"] = {"kind": "files", "repository": site, "paths": [str(data)],
                                "site": site, "timezone": "UTC",
                                "schedule": f"{at.second} {at.minute} {at.hour} * * *"}
        config = root / "keepwell.yaml"
        config.write_text(yaml.safe_dump({
            "history": str(root / "history.db"), "scratch": str(root / "scratch"),
            "metrics": {"listen": None}, "fleet": {"heartbeat_timeout": "30s"},
            "repositories": repos, "sources": sources}))
        t0 = time.time()
        applied = subprocess.run([*MAIN, "fleet", "apply", "-c", str(config), "--json"], env=env,
                                 capture_output=True, text=True, check=True)
        print(f"{args.sources} sources over {args.sites} sites, "
              f"{args.workers_per_site} worker(s) per site (--max-jobs 1); "
              f"apply: {len(json.loads(applied.stdout)['plan'])} schedules in "
              f"{time.time() - t0:.1f} s", flush=True)
        logs = []
        for site in sites:
            for w in range(args.workers_per_site):
                log = root / f"worker-{site}-{w}.log"
                logs.append(log)
                with open(log, "wb") as out:
                    procs.append(subprocess.Popen(
                        [*MAIN, "worker", "-c", str(config), "--site", site, "--max-jobs", "1",
                         "--log-json"], stdout=out, stderr=out, env=env))
        while not all('"worker_started"' in p.read_text(errors="replace") for p in logs):
            time.sleep(0.2)
        if time.time() > fire - 2:
            print("the workers started too late for the schedules' second; run again with a "
                  "longer --lead")
            return 1
        print(f"workers up; the schedules fire at {at.isoformat()} (in {fire - time.time():.0f} s)",
              flush=True)
        rows: list[sqlite3.Row] = []
        while time.time() < fire + 1800:
            time.sleep(1)
            if not (root / "history.db").exists():
                continue
            db = sqlite3.connect(root / "history.db", timeout=30)
            db.row_factory = sqlite3.Row
            try:
                rows = list(db.execute("SELECT * FROM runs WHERE status != 'running'"))
            except sqlite3.OperationalError:
                rows = []
            finally:
                db.close()
            if len(rows) >= args.sources:
                break
        failed = [r for r in rows if r["status"] != "succeeded"]
        late = [r["started_at"] - fire for r in rows]
        durations = [r["ended_at"] - r["started_at"] for r in rows]
        makespan = max(r["ended_at"] for r in rows) - min(r["started_at"] for r in rows)
        workers_n = args.sites * args.workers_per_site
        per_job = makespan * workers_n / len(rows)
        print(f"jobs: {len(rows)} ({len(failed)} failed); from the first job's start to the "
              f"last one's end {makespan:.1f} s")
        print(f"schedule lateness to job start: p50 {pct(late, .5):.2f} s, "
              f"p99 {pct(late, .99):.2f} s, max {max(late):.2f} s")
        print(f"job duration: p50 {pct(durations, .5) * 1000:.0f} ms, mean "
              f"{statistics.mean(durations) * 1000:.0f} ms; worker time per job (that span x "
              f"workers / jobs) {per_job * 1000:.0f} ms: overhead per job "
              f"{(per_job - statistics.mean(durations)) * 1000:.0f} ms")
        workers = [rss_mib(p.pid) for p in procs[1:]]
        print(f"memory: server {rss_mib(server.pid):.0f} MiB, workers "
              f"{min(workers):.0f}-{max(workers):.0f} MiB")
        return 0 if not failed and len(rows) >= args.sources else 1
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()


if __name__ == "__main__":
    raise SystemExit(main())
