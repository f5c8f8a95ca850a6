"""Drive a real ``keepwell daemon`` through many tiny file jobs and measure its own overhead.

Per job, the daemon's overhead is the time it adds around the job's work:

* dispatch latency: from the schedule's firing time to the job's start (timer, queue, slot,
  thread start, history insert);
* bookkeeping: the run's recorded duration minus the time spent in the job kind's function
  (history update, anomaly judgement, logging).

Memory is the daemon's resident set size, sampled every 100 jobs. It warms up over the first
several hundred jobs (allocator arenas of the jobs' worker threads, and a repository whose index
grows with every backup) and then stays flat; the verdict compares the second half of the run.
Latency figures depend on the machine's load: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--sources", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=10)
    args = ap.parse_args()
    os.environ["KEEPWELL_TESTONLY_WEAK_KDF"] = "1"
    os.environ["KW_BENCH_PASSWORD"] = "bench"
    from keepwell.backends import open_backend
    from keepwell.repository import Repository

    with tempfile.TemporaryDirectory(prefix="kw-control-bench-") as tmp:
        root = Path(tmp)
        Repository.init(open_backend(str(root / "repo")), "bench").close()
        sources = {}
        for i in range(args.sources):
            d = root / "data" / f"s{i}"
            d.mkdir(parents=True)
            (d / "tiny.txt").write_text(f"tiny file {i}\n")
            sources[f"s{i}"] = {"kind": "files", "repository": "main", "paths": [str(d)],
                                "schedule": "* * * * * *",
                                "retention": {"keep_last": 3}}
        config = {
            "history": str(root / "history.db"),
            "repositories": {"main": {"location": str(root / "repo"),
                                      "password": "env:KW_BENCH_PASSWORD"}},
            "sources": sources,
            "limits": {"max_concurrent_jobs": args.concurrency},
            "metrics": {"listen": None},
        }
        (root / "keepwell.yaml").write_text(yaml.safe_dump(config))
        log = open(root / "daemon.log", "wb")  # noqa: SIM115 - open while the daemon runs
        proc = subprocess.Popen([sys.executable, "-m", "keepwell.cli.control", "daemon", "-c",
                                 str(root / "keepwell.yaml"), "--log-json"],
                                stdout=log, stderr=log)
        db_path = root / "history.db"
        samples: list[tuple[int, int]] = []
        next_mark = 100
        t0 = time.monotonic()
        done = 0
        try:
            while done < args.jobs:
                time.sleep(0.2)
                if proc.poll() is not None:
                    print((root / "daemon.log").read_text()[-2000:])
                    return 1
                if not db_path.exists():
                    continue
                db = sqlite3.connect(db_path, timeout=30)
                try:
                    done = db.execute(
                        "SELECT count(*) FROM runs WHERE status='succeeded'").fetchone()[0]
                except sqlite3.OperationalError:
                    done = 0
                db.close()
                if done >= next_mark:
                    samples.append((done, rss_kib(proc.pid)))
                    next_mark += 100
            wall = time.monotonic() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            log.close()
        db = sqlite3.connect(db_path)
        rows = db.execute("SELECT scheduled_at, started_at, ended_at, details, status FROM runs"
                          " ORDER BY id").fetchall()
        db.close()
        ok = [r for r in rows if r[4] == "succeeded"][: args.jobs]
        dispatch = [(r[1] - r[0]) * 1000 for r in ok]
        bookkeeping = [((r[2] - r[1]) - json.loads(r[3])["elapsed"]) * 1000 for r in ok]
        work = [json.loads(r[3])["elapsed"] * 1000 for r in ok]
        overhead = [a + b for a, b in zip(dispatch, bookkeeping, strict=True)]

        def q(values: list[float], p: float) -> float:
            return sorted(values)[min(len(values) - 1, int(p * len(values)))]

        print(f"jobs: {len(ok)} succeeded of {len(rows)} runs in {wall:.1f} s "
              f"({args.sources} sources every second, {args.concurrency} slots)")
        print(f"job work (in the files source): median {statistics.median(work):.1f} ms")
        for name, vals in (("dispatch latency", dispatch), ("bookkeeping", bookkeeping),
                           ("overhead per job", overhead)):
            print(f"{name:>18}: median {statistics.median(vals):6.2f} ms   "
                  f"p95 {q(vals, 0.95):6.2f} ms   max {max(vals):6.2f} ms")
        print("daemon RSS by jobs done: " + ", ".join(f"{n}: {kib / 1024:.1f} MiB"
                                                      for n, kib in samples))
        if len(samples) >= 2:
            half = next(s for s in samples if s[0] >= samples[-1][0] // 2)
            growth = (samples[-1][1] - half[1]) / 1024
            print(f"RSS growth over the second half ({half[0]} to {samples[-1][0]} jobs): "
                  f"{growth:+.1f} MiB")
        else:
            growth = 0.0
            print("RSS growth: too few jobs to sample (RSS is sampled every 100 jobs)")
        median_overhead = statistics.median(overhead)
        verdict = median_overhead < 50 and growth < 10
        print("PASS" if verdict else "FAIL",
              "(median overhead < 50 ms per job; RSS grows < 10 MiB over the second half)")
        return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
