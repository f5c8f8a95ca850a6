"""The driver of bench/mysql.sh: generate, back up, restore, change, back up again; print a table.

Every tool runs against the same throwaway server (started like the integration tests' servers)
and restores into a second one; sizes are bytes on disk after the tool finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from keepwell.sources.mysql.restore import prepare_memory
from tests.servers.mariadb import PYTHON, ROOT_PASSWORD, MariaDBServer

WORK = Path(__file__).resolve().parent / "work" / "mysql"
REPO_PW = "bench-password"
CLI = (
    "import sys\n"
    "try:\n"
    "    from keepwell.cli.main import run\n"
    "except ImportError:\n"
    "    from keepwell.cli.mysql import main\n"
    "    sys.argv = ['keepwell'] + sys.argv[2:]\n"
    "    run = main\n"
    "sys.exit(run())\n"
)
SERVER_ARGS = ("--innodb-buffer-pool-size=768M", "--innodb-log-file-size=512M",
               "--innodb-flush-log-at-trx-commit=2", "--max-allowed-packet=1G")


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sh(cmd: str, env: dict[str, str] | None = None) -> float:
    t = time.monotonic()
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, env=env)
    return time.monotonic() - t


def keepwell(*args: str, repo: Path) -> float:
    env = dict(os.environ, KEEPWELL_REPOSITORY=str(repo), KEEPWELL_PASSWORD=REPO_PW)
    t = time.monotonic()
    subprocess.run([PYTHON, "-c", CLI, "mysql", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return time.monotonic() - t


def init_repo(path: Path) -> None:
    from keepwell.backends.registry import open_backend
    from keepwell.repository import Repository

    shutil.rmtree(path, ignore_errors=True)
    Repository.init(open_backend(str(path)), REPO_PW).close()


def generate(s: MariaDBServer, tables: int, rows: int) -> int:
    s.sql("CREATE DATABASE IF NOT EXISTS sbtest")
    for i in range(1, tables + 1):
        s.sql(f"CREATE TABLE sbtest.sbtest{i} (id INT NOT NULL AUTO_INCREMENT PRIMARY KEY, "
              "k INT NOT NULL DEFAULT 0, c CHAR(120) NOT NULL DEFAULT '', "
              "pad CHAR(60) NOT NULL DEFAULT '', KEY k_1 (k)) ENGINE=InnoDB")
        # every table and row distinct (identical tables would deduplicate unrealistically)
        s.sql(f"INSERT INTO sbtest{i} (k, c, pad) SELECT FLOOR(RAND({i} * {rows} + seq) * "
              f"{rows}), CONCAT_WS('-', MD5(CONCAT({i}, 'a', seq)), MD5(CONCAT({i}, 'b', seq)), "
              f"MD5(CONCAT({i}, 'c', seq)), LEFT(MD5(CONCAT({i}, 'd', seq)), 20)), "
              f"CONCAT_WS('-', MD5(CONCAT({i}, 'e', seq)), LEFT(MD5(CONCAT({i}, 'f', seq)), 27)) "
              f"FROM seq_1_to_{rows}", "sbtest")
    (size,) = s.sql("SELECT SUM(data_length + index_length) FROM information_schema.tables "
                    "WHERE table_schema = 'sbtest'")[0]
    return int(size)


def workload(s: MariaDBServer, tables: int, rows: int, *, scattered: bool = False) -> None:
    """A day of writes per table: 2% of rows updated, 1% inserted, 0.5% deleted.

    By default updates hit 10 random ranges of neighbouring rows and deletes take the oldest
    rows, as OLTP days usually do; ``scattered`` spreads updates and deletes uniformly (every
    33rd / 200th row), which touches every page and every dump chunk: the worst case for any
    deduplication."""
    import random

    rnd = random.Random(42)
    for i in range(1, tables + 1):
        t = f"sbtest{i}"
        if scattered:
            s.sql(f"UPDATE {t} SET k = k + 1, c = MD5(RAND()) WHERE id % 50 = 0", "sbtest")
            s.sql(f"DELETE FROM {t} WHERE id % 200 = 7", "sbtest")
        else:
            span = rows // 500
            for _ in range(10):
                a = rnd.randrange(1, rows - span)
                s.sql(f"UPDATE {t} SET k = k + 1, c = MD5(RAND()) WHERE id BETWEEN {a} AND "
                      f"{a + span}", "sbtest")
            s.sql(f"DELETE FROM {t} WHERE id <= {rows // 200}", "sbtest")
        s.sql(f"INSERT INTO {t} (k, c, pad) SELECT seq, MD5(CONCAT({i}, 'n', seq)), MD5(RAND()) "
              f"FROM seq_1_to_{rows // 100}", "sbtest")


def fresh_target(name: str) -> MariaDBServer:
    d = WORK / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return MariaDBServer(d, server_id=2, name=name, extra_args=SERVER_ARGS).start()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", type=int, default=8)
    ap.add_argument("--rows-per-table", type=int, default=720_000)
    ap.add_argument("--no-restore", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--scattered", action="store_true",
                    help="Spread the second day's writes uniformly (the worst case).")
    ap.add_argument("--pairs", type=int, default=0,
                    help="Also time N back-to-back pairs (tool, then keepwell into a fresh "
                         "repository) of each backup and report the median ratio: steadier "
                         "than single runs on a shared machine.")
    args = ap.parse_args()
    os.environ["KEEPWELL_TESTONLY_WEAK_KDF"] = "0"
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    src = MariaDBServer(WORK, server_id=1, name="src", extra_args=SERVER_ARGS).start()
    cnf = WORK / "client.cnf"
    cnf.write_text(f"[client]\nhost=127.0.0.1\nport={src.port}\nuser=root\n"
                   f"password={ROOT_PASSWORD}\n")
    results: list[dict[str, object]] = []
    try:
        t = time.monotonic()
        size = generate(src, args.tables, args.rows_per_table)
        print(f"generated {size / 1e9:.2f} GB (InnoDB data + indexes) in "
              f"{time.monotonic() - t:.0f} s", file=sys.stderr)
        dump_opts = "--single-transaction --master-data=2 --gtid --routines --triggers --events"
        # the same copy as keepwell's physical backup (one copy thread, the tool's default)
        mb_opts = f"--defaults-file={cnf} --backup --stream=xbstream --target-dir={WORK}/mbtmp"
        (WORK / "mbtmp").mkdir()
        day1: dict[str, float] = {}

        def row(name: str, backup_s: float, stored: int, restore_s: float | None) -> None:
            results.append({"tool": name, "backup_s": round(backup_s, 1), "stored": stored,
                            "restore_s": None if restore_s is None else round(restore_s, 1)})
            print(json.dumps(results[-1]), file=sys.stderr)

        # -- logical ------------------------------------------------------------------------------
        dump = WORK / "dump.sql.zst"
        b = sh(f"mariadb-dump --defaults-file={cnf} {dump_opts} --databases sbtest "
               f"| zstd -q -T2 -3 -o {dump}")
        r = None
        if not args.no_restore:
            tgt = fresh_target("t1")
            r = sh(f"zstd -q -dc {dump} | mariadb --defaults-file={cnf} --port={tgt.port}")
            tgt.stop()
        row("mariadb-dump \\| zstd -3", b, du(dump), r)
        day1["dump"] = du(dump)

        if shutil.which("mydumper"):
            out = WORK / "mydumper"
            login = f"-h 127.0.0.1 -u root -p {ROOT_PASSWORD}"
            b = sh(f"mydumper {login} -P {src.port} -B sbtest -t 2 -c -o {out}")
            r = None
            if not args.no_restore:
                tgt = fresh_target("t2")
                r = sh(f"myloader {login} -P {tgt.port} -t 2 -d {out}")
                tgt.stop()
            row("mydumper -c (2 threads)", b, du(out), r)

        repo = WORK / "repo"
        init_repo(repo)
        b = keepwell("backup", "--logical", "--database", "sbtest", "--defaults-file", str(cnf),
                     repo=repo)
        r = None
        if not args.no_restore:
            tgt = fresh_target("t3")
            r = keepwell("restore", "--target-db-url", tgt.url, repo=repo)
            tgt.stop()
        day1["kw_logical"] = du(repo)
        row("keepwell mysql backup --logical", b, du(repo), r)

        # -- physical -----------------------------------------------------------------------------
        xb = WORK / "backup.xb.zst"
        b = sh(f"mariabackup {mb_opts} 2>/dev/null | zstd -q -T2 -3 -o {xb}")
        r = None
        if not args.no_restore:
            ex = WORK / "xb-restore"
            r = sh(f"mkdir -p {ex} && zstd -q -dc {xb} | mbstream -x -C {ex} && mariabackup "
                   f"--no-defaults --prepare --target-dir={ex} --use-memory={prepare_memory()} "
                   f"2>/dev/null && mariabackup "
                   f"--no-defaults --move-back --target-dir={ex} --datadir={WORK}/xb-data "
                   "2>/dev/null")
            shutil.rmtree(ex, ignore_errors=True)
            shutil.rmtree(WORK / "xb-data", ignore_errors=True)
        row("mariabackup --stream \\| zstd -3", b, du(xb), r)
        day1["xb"] = du(xb)

        prepo = WORK / "repo-physical"
        init_repo(prepo)
        b = keepwell("backup", "--physical", "--defaults-file", str(cnf), repo=prepo)
        r = None
        if not args.no_restore:
            r = keepwell("restore", "--target-dir", str(WORK / "kw-data"), "--owner", "root",
                         repo=prepo)
            shutil.rmtree(WORK / "kw-data", ignore_errors=True)
        day1["kw_physical"] = du(prepo)
        row("keepwell mysql backup --physical", b, du(prepo), r)

        # -- paired runs ----------------------------------------------------------------------------
        pairs: dict[str, list[tuple[float, float]]] = {"logical": [], "physical": []}
        for i in range(args.pairs):
            pr = WORK / f"repo-pair-{i}"
            init_repo(pr)
            tool = sh(f"mariadb-dump --defaults-file={cnf} {dump_opts} --databases sbtest "
                      f"| zstd -q -T2 -3 -o {WORK}/pair.sql.zst -f")
            kw = keepwell("backup", "--logical", "--database", "sbtest", "--defaults-file",
                          str(cnf), repo=pr)
            pairs["logical"].append((tool, kw))
            shutil.rmtree(pr)
            init_repo(pr)
            shutil.rmtree(WORK / "mbtmp-pair", ignore_errors=True)
            tool = sh(f"mariabackup {mb_opts.replace('mbtmp', 'mbtmp-pair')} 2>/dev/null "
                      f"| zstd -q -T2 -3 -o {WORK}/pair.xb.zst -f")
            kw = keepwell("backup", "--physical", "--defaults-file", str(cnf), repo=pr)
            pairs["physical"].append((tool, kw))
            shutil.rmtree(pr)
            print(f"pair {i}: " + json.dumps({k: v[-1] for k, v in pairs.items()}),
                  file=sys.stderr)

        # -- the second day -----------------------------------------------------------------------
        t = time.monotonic()
        workload(src, args.tables, args.rows_per_table, scattered=args.scattered)
        print(f"workload: {time.monotonic() - t:.0f} s", file=sys.stderr)
        growth = {}
        b2 = keepwell("backup", "--logical", "--database", "sbtest", "--defaults-file", str(cnf),
                      repo=repo)
        growth["keepwell logical"] = (b2, du(repo) - day1["kw_logical"])
        b2 = keepwell("backup", "--physical", "--defaults-file", str(cnf), repo=prepo)
        growth["keepwell physical"] = (b2, du(prepo) - day1["kw_physical"])
        dump2 = WORK / "dump2.sql.zst"
        b2 = sh(f"mariadb-dump --defaults-file={cnf} {dump_opts} --databases sbtest "
                f"| zstd -q -T2 -3 -o {dump2}")
        growth["mariadb-dump \\| zstd (a new full)"] = (b2, du(dump2))
        xb2 = WORK / "backup2.xb.zst"
        b2 = sh(f"mariabackup {mb_opts.replace('mbtmp', 'mbtmp2')} 2>/dev/null "
                f"| zstd -q -T2 -3 -o {xb2}")
        growth["mariabackup \\| zstd (a new full)"] = (b2, du(xb2))

        print(f"\nDatabase: {args.tables} sysbench-style tables x {args.rows_per_table:,} rows = "
              f"{size / 1e9:.2f} GB of InnoDB data + indexes; MariaDB 10.11; 2 cores.\n")
        print("| tool | backup | restore | stored |")
        print("|---|---:|---:|---:|")
        for x in results:
            rs = "-" if x["restore_s"] is None else f"{x['restore_s']} s"
            print(f"| {x['tool']} | {x['backup_s']} s | {rs} | "
                  f"{int(x['stored']) / 2**20:,.0f} MiB |")  # type: ignore[call-overload]
        kind = "scattered" if args.scattered else "clustered"
        print(f"\n| second day ({kind} writes: 2% updated, 1% inserted, 0.5% deleted) "
              "| backup | added to storage |")
        print("|---|---:|---:|")
        for name, (secs, added) in growth.items():
            print(f"| {name} | {secs:.1f} s | {added / 2**20:,.0f} MiB |")
        if args.pairs:
            import statistics

            print(f"\n| {args.pairs} back-to-back pairs | tool (median) | keepwell (median) "
                  "| keepwell / tool (median of pairs) |")
            print("|---|---:|---:|---:|")
            for kind, runs in pairs.items():
                name = ("mariadb-dump \\| zstd -3 vs keepwell --logical" if kind == "logical"
                        else "mariabackup \\| zstd -3 vs keepwell --physical")
                print(f"| {name} | {statistics.median(t for t, _ in runs):.1f} s | "
                      f"{statistics.median(k for _, k in runs):.1f} s | "
                      f"{statistics.median(k / t for t, k in runs):.2f} |")
    finally:
        src.stop()
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
