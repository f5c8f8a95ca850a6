"""The driver of bench/limits.sh: what a backup with hard limits uses, and what it costs a
database beside it.

1. A files backup of ``--data-mb`` of text-like files (read from disk: the files are dropped
   from the page cache first) runs unlimited and then limited to half a core and 20 MB/s of
   reads; the kernel's accounting of the job's cgroup gives its CPU time and bytes read, divided
   by the wall time. "Unlimited" runs in a cgroup too (all cores, no practical read limit), so
   that the same accounting measures it.
2. pgbench runs against a PostgreSQL cluster on the same disk for ``--seconds``, alone, then
   with the backup running (again and again, into a fresh repository each time) unlimited, then
   limited; its transactions per second are reported.

Repositories use the test-only weak key derivation (a bench of backups, not of key setup).
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("KEEPWELL_TESTONLY_WEAK_KDF", "1")

from keepwell.backends import open_backend  # noqa: E402
from keepwell.control.config import JobLimits, parse_config  # noqa: E402
from keepwell.control.jobs import JobContext, build_job  # noqa: E402
from keepwell.control.runner import execute  # noqa: E402
from keepwell.repository import Repository  # noqa: E402
from tests.servers.postgres import PG_USER, PgCluster, make_workdir, stop_all_in  # noqa: E402

PASSWORD = "bench-password"
LIMITED = {"cpu": 0.5, "io": {"read": "20M"}}
UNLIMITED = {"cpu": float(os.cpu_count() or 2), "io": {"read": "100G"}}


def make_data(root: Path, megabytes: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(megabytes // 4):
        with open(root / f"part{i:04d}.txt", "wb") as f:
            f.write(base64.b64encode(os.urandom(3 * 1024 * 1024)))  # 4 MiB, compressible 3:4
            f.flush()
            os.fsync(f.fileno())


def drop_cache(root: Path) -> None:
    for path in root.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def backup_once(work: Path, data: Path, limits: dict[str, Any]) -> dict[str, Any]:
    repo = Path(tempfile.mkdtemp(prefix="repo-", dir=work))
    Repository.init(open_backend(str(repo)), PASSWORD).close()
    os.environ["KW_BENCH_PW"] = PASSWORD
    text = (f"history: {work / 'history.db'}\n"
            f"repositories: {{main: {{location: {repo}, password: 'env:KW_BENCH_PW'}}}}\n"
            f"sources: {{data: {{kind: files, repository: main, paths: [{data}]}}}}\n")
    cfg = parse_config(text, work / "keepwell.yaml")
    cfg = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"by_kind": {
        "files": JobLimits.model_validate(limits)}})})
    drop_cache(data)
    spec = build_job(cfg, "backup", "data", time.time())
    started = time.monotonic()
    outcome = execute(spec, JobContext(timeout=3600))
    wall = time.monotonic() - started
    shutil.rmtree(repo)
    if outcome.status != "succeeded":
        raise SystemExit(f"backup failed: {outcome.error}")
    usage = outcome.details["confinement"]["usage"]
    return {"wall": wall, "cpu": usage.get("cpu_usec", 0) / 1e6,
            "read": usage.get("read_bytes", 0), "source": outcome.bytes_read or 0}


def pgbench(cluster: PgCluster, seconds: int) -> float:
    out = subprocess.run(
        [cluster.bin("pgbench"), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", PG_USER,
         "-c", "2", "-j", "2", "-n", "-T", str(seconds), "bench"],
        capture_output=True, text=True, check=True).stdout
    m = re.search(r"tps = ([0-9.]+)", out)
    assert m, out
    return float(m[1])


def beside(cluster: PgCluster, seconds: int, work: Path, data: Path,
           limits: dict[str, Any] | None) -> tuple[float, int]:
    stop = threading.Event()
    runs = [0]

    def loop() -> None:
        while not stop.is_set():
            backup_once(work, data, limits or {})
            runs[0] += 1

    thread = threading.Thread(target=loop) if limits is not None else None
    if thread is not None:
        thread.start()
    try:
        tps = pgbench(cluster, seconds)
    finally:
        stop.set()
        if thread is not None:
            thread.join()
    return tps, runs[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-mb", type=int, default=200)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=15)
    args = ap.parse_args()
    work = make_workdir("kw-limits-")
    try:
        data = work / "data"
        make_data(data, args.data_mb)
        print(f"data: {args.data_mb} MB in {args.data_mb // 4} files; {os.cpu_count()} cores")
        print("| backup | wall s | CPU s | cores used | read MB | read MB/s |")
        print("|---|---|---|---|---|---|")
        for name, limits in (("unlimited", UNLIMITED), ("cpu 0.5, read 20 MB/s", LIMITED)):
            r = backup_once(work, data, limits)
            print(f"| {name} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['cpu'] / r['wall']:.2f} |"
                  f" {r['read'] / 1e6:.0f} | {r['read'] / 1e6 / r['wall']:.1f} |", flush=True)
        cluster = PgCluster(work).initdb(fsync="on", shared_buffers="'64MB'").start()
        try:
            cluster.sql("CREATE DATABASE bench")
            subprocess.run([cluster.bin("pgbench"), "-h", "127.0.0.1", "-p", str(cluster.port),
                            "-U", PG_USER, "-i", "-q", "-s", str(args.scale), "bench"],
                           check=True, capture_output=True)
            print(f"\npgbench -c 2 -j 2 -T {args.seconds}, scale {args.scale}")
            print("| beside pgbench | tps | backups run meanwhile |")
            print("|---|---|---|")
            for name, limits in (("nothing", None), ("backup, unlimited", UNLIMITED),
                                 ("backup, cpu 0.5, read 20 MB/s", LIMITED)):
                tps, runs = beside(cluster, args.seconds, work, data, limits)
                print(f"| {name} | {tps:.0f} | {runs if limits is not None else '-'} |",
                      flush=True)
        finally:
            cluster.stop()
    finally:
        stop_all_in(work)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
