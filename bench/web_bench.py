"""How long the web dashboard takes to answer each page over a large job history.

Fills a job history with ``--jobs`` runs (10,000 by default) through the history API
(`keepwell.control.history.History`): four sources (two of files, two SQLite databases) backed
up over three months, a few percent of the runs failed, a daily restore drill of
two of them, two log lines per run. Then it starts a real ``keepwell web`` process and asks each
page ``--requests`` times in a row (after two warm-up requests, which count the empty repository
once: the inventory keeps its figures) on one loopback connection at a time. The time of a
request is from sending it to having read the whole answer: the server's render time plus a
loopback round trip. The target is a median and a p95 under 200 ms.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from web_screenshots import start_web  # noqa: E402

SOURCES = {"home": "files", "projects": "files", "app-db": "sqlite", "wiki-db": "sqlite"}
DRILLS = {"home-weekly": "home", "app-db-daily": "app-db"}
DAYS = 90
TARGET_MS = 200.0


def fill(history_path: str, jobs: int, seed: int = 7) -> dict[str, int]:
    """``jobs`` runs over the last DAYS days, oldest first; the id of one run per source."""
    from keepwell.control.history import History

    rng = random.Random(seed)
    history = History(history_path)
    end = time.time() - 600
    start = end - DAYS * 86400
    drills = DAYS * len(DRILLS)
    backups = jobs - drills
    step = (end - start) / backups
    sizes = {name: rng.randint(200, 4000) * 2**20 for name in SOURCES}
    names = list(SOURCES)
    drill_every = max(1, backups // drills)
    last_ids: dict[str, int] = {}
    made = 0
    drill_i = 0
    for i in range(backups):
        if made >= jobs:
            break
        at = start + i * step
        source = names[i % len(names)]
        sizes[source] += rng.randint(0, 4 * 2**20)
        failed = rng.random() < 0.03
        duration = rng.uniform(5, 120) if SOURCES[source] == "files" else rng.uniform(1, 20)
        job_id = f"backup:{source}:{int(at * 1000)}"
        run_id = history.start_run(job_id=job_id, name=source, source=source, action="backup",
                                   kind=SOURCES[source], attempt=1, trigger="schedule",
                                   scheduled_at=at, spec=None, started_at=at)
        history.add_log(run_id, "info", f"backup {source}: started (schedule)", at=at)
        if failed:
            history.finish_run(run_id, "failed", error="repository unreachable: timed out",
                               ended_at=at + duration)
            history.add_log(run_id, "error", "repository unreachable: timed out",
                            at=at + duration)
        else:
            stored = rng.randint(0, 8 * 2**20)
            history.finish_run(run_id, "succeeded", bytes_read=sizes[source],
                               bytes_stored=stored, bytes_uploaded=stored + 4096,
                               dedup_ratio=1 - stored / sizes[source],
                               snapshot_id=f"{rng.getrandbits(256):064x}", ended_at=at + duration)
            history.add_log(run_id, "info", f"backup {source}: succeeded", at=at + duration)
        last_ids[source] = run_id
        made += 1
        if i % drill_every == drill_every - 1 and made < jobs:
            drill = list(DRILLS)[drill_i % len(DRILLS)]
            drill_i += 1
            d_at = at + duration + 60
            run_id = history.start_run(job_id=f"drill:{drill}:{int(d_at * 1000)}", name=drill,
                                       source=DRILLS[drill], action="drill",
                                       kind=SOURCES[DRILLS[drill]], attempt=1,
                                       trigger="schedule", scheduled_at=d_at, spec=None,
                                       started_at=d_at)
            rto = rng.uniform(10, 300)
            history.finish_run(run_id, "succeeded", bytes_read=sizes[DRILLS[drill]], rto=rto,
                               rpo=rng.uniform(60, 86400), ended_at=d_at + rto)
            made += 1
    history.close()
    return last_ids


def measure(host: str, port: int, path: str, n: int) -> list[float]:
    times = []
    for i in range(n + 2):
        conn = http.client.HTTPConnection(host, port, timeout=60)
        t0 = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        elapsed = (time.perf_counter() - t0) * 1000
        conn.close()
        if resp.status != 200:
            raise SystemExit(f"{path}: HTTP {resp.status}")
        if i >= 2:
            times.append(elapsed)
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=50)
    args = ap.parse_args()
    os.environ.setdefault("KW_BENCH_PASSWORD", "bench")
    os.environ["KEEPWELL_TESTONLY_WEAK_KDF"] = "1"  # the repository is opened, not measured
    from keepwell.backends import open_backend
    from keepwell.control.history import History
    from keepwell.repository import Repository

    with tempfile.TemporaryDirectory(prefix="kw-web-bench-") as tmp:
        root = Path(tmp)
        Repository.init(open_backend(str(root / "repo")), "bench").close()
        sources = {}
        for name, kind in SOURCES.items():
            (root / "data" / name).mkdir(parents=True)
            sources[name] = ({"kind": "files", "repository": "main",
                              "paths": [str(root / "data" / name)], "schedule": "0 * * * *"}
                             if kind == "files" else
                             {"kind": "sqlite", "repository": "main",
                              "path": str(root / "data" / name / "db.sqlite"),
                              "schedule": "0 * * * *"})
        config = {"version": 1, "history": str(root / "history.db"),
                  "repositories": {"main": {"location": str(root / "repo"),
                                            "password": "env:KW_BENCH_PASSWORD"}},
                  "sources": sources,
                  "drills": {d: {"source": s, "schedule": "0 5 * * *"}
                             for d, s in DRILLS.items()}}
        (root / "keepwell.yaml").write_text(yaml.safe_dump(config))
        t0 = time.monotonic()
        last = fill(str(root / "history.db"), args.jobs)
        h = History(str(root / "history.db"))
        total = len(h.runs(limit=10 * args.jobs))
        h.close()
        print(f"history: {total} runs over {DAYS} days, filled in "
              f"{time.monotonic() - t0:.1f} s")
        proc, base = start_web(str(root / "keepwell.yaml"), root / "web.log")
        try:
            host, _, port = base.split("://", 1)[1].rpartition(":")
            pages = {"/": "overview", "/sources/home": "a source",
                     f"/runs/{last['home']}": "a run", "/repositories/main": "a repository",
                     "/drills": "drills", "/running": "running jobs",
                     "/api/v1/overview": "API: overview",
                     "/api/v1/sources/app-db": "API: a source"}
            print(f"\n{args.requests} requests per page, one at a time\n")
            print("| page | median | p95 | max |")
            print("|---|---|---|---|")
            slow = []
            for path, label in pages.items():
                times = sorted(measure(host, int(port), path, args.requests))
                median = statistics.median(times)
                p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
                if p95 > TARGET_MS:
                    slow.append(path)
                print(f"| `{path}` ({label}) | {median:.1f} ms | {p95:.1f} ms "
                      f"| {times[-1]:.1f} ms |")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        print()
        print(f"over {TARGET_MS:.0f} ms at p95: {', '.join(slow)}" if slow else
              f"every page under {TARGET_MS:.0f} ms at p95")
        return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
