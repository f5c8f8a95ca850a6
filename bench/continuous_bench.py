"""The measuring half of bench/continuous.sh: `keepwell watch` (and `restic backup` in a loop)
under a writer; RPO, CPU, memory, and losses after a clean stop and after kills.

Usage: continuous_bench.py [--files N] [--seconds S] [--rate R] [--backend local|s3|both]
                           [--kills K] [--restic] [--work DIR] [--keepwell COMMAND]

The tree: N small files (100-4,000 bytes, one directory per 100) and a 64 MiB log. The load, for
S seconds at R writes a second: half rewrite a file of the tree at random, half create or
rewrite a file under hot/ (a new directory every 500 writes, half of them nested in the last
one); the log grows by 4 KiB ten times a second.

For each backend (a local repository; SeaweedFS's S3 gateway, started here):
  1. keepwell watch --json --max-delay 500ms --quiet-time 100ms; its start scan, then 5 s idle
     (CPU and RSS of its process tree from /proc), then the load. RPO of a write: from its close()
     to the end of the first commit whose snapshot holds that path with that mtime or a newer
     one. The writer stops, the watcher gets SIGTERM (it commits what is pending), and the last
     snapshot is compared with the tree (every file's size and mtime): losses.
  2. With --kills K: the watcher is started again under the same load and SIGKILLed K times at
     random moments (half 0.1-6 s after a start, mostly in the start scan; half 0-2 s after the
     start scan's commit: in commits and between them), each time started again at once. After the last start the writer stops, the watcher commits (quiesce)
     and gets SIGTERM; the last snapshot is restored and compared with the tree byte for byte,
     and `keepwell check` runs.
  3. With --restic: `restic backup TREE` in a loop, on the same kind of repository, under the
     same load. A write is covered by the first run that started after its close(); its RPO is
     that run's end minus the close(). CPU: the runs' rusage over the loop's wall time; idle: the
     loop over the unchanged tree for 5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))
PASSWORD = "bench"
BIG = 64 * 1024 * 1024
IDLE_SECONDS = 5.0


# -- the watcher's process tree, from /proc --------------------------------------------------
def tree_pids(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, stack = [], [root]
    while stack:
        p = stack.pop()
        out.append(p)
        stack += kids.get(p, [])
    return out


def cpu_seconds(root: int) -> float:
    total = 0.0
    for p in tree_pids(root):
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            continue
    return total


def rss_mb(root: int) -> float:
    total = 0
    for p in tree_pids(root):
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


# -- the tree and the writer -----------------------------------------------------------------
def make_tree(tree: Path, files: int) -> None:
    rng = random.Random(1)
    for i in range(files):
        d = tree / "base" / f"d{i // 100}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        (d / f"f{i}").write_bytes(rng.randbytes(rng.randint(100, 4000)))
    (tree / "hot").mkdir()
    with open(tree / "hot" / "big.log", "wb") as f:
        for _ in range(BIG // (1 << 20)):
            f.write(rng.randbytes(1 << 20))


@dataclass
class Writer:
    """Writes at ``rate`` a second until stopped; records (path, time after close(), mtime)."""

    tree: Path
    files: int
    rate: float
    seed: int
    writes: list[tuple[str, float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    n: int = 0

    def run(self) -> None:
        rng = random.Random(self.seed)
        hot = self.tree / "hot"
        dirs = [hot]
        big = hot / "big.log"
        begin = time.time()
        tag = f"s{self.seed}"
        while not self.stop.is_set():
            due = begin + self.n / self.rate
            if (now := time.time()) < due:
                time.sleep(due - now)
            n = self.n
            if n % 500 == 0:
                nd = (dirs[-1] if rng.random() < 0.5 else hot) / f"{tag}n{n}"
                nd.mkdir()
                dirs.append(nd)
            if n % 100 == 0:
                with open(big, "ab") as f:
                    f.write(rng.randbytes(4096))
                self.writes.append((str(big), time.time(), os.stat(big).st_mtime_ns))
            if n % 2:
                i = rng.randrange(self.files)
                p = self.tree / "base" / f"d{i // 100}" / f"f{i}"
            else:
                p = rng.choice(dirs) / f"w{rng.randrange(300)}"
            with open(p, "wb") as f:
                f.write(rng.randbytes(rng.randint(50, 2000)))
            self.writes.append((str(p), time.time(), os.stat(p).st_mtime_ns))
            self.n += 1

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, daemon=True)
        t.start()
        return t


# -- reading snapshots -----------------------------------------------------------------------
class Snapshots:
    """Nodes of paths in snapshots, each tree loaded once."""

    def __init__(self, location: str) -> None:
        from keepwell.repository import open_repository

        self.repo = open_repository(location, PASSWORD)
        self._trees: dict[bytes, dict[str, Any]] = {}
        self._snaps: dict[str, Any] = {}

    def _tree(self, tid: bytes) -> dict[str, Any]:
        t = self._trees.get(tid)
        if t is None:
            t = self._trees[tid] = {n.name: n for n in self.repo.load_tree(tid)}
        return t

    def node(self, sid: str, path: str) -> Any:
        snap = self._snaps.get(sid)
        if snap is None:
            snap = self._snaps[sid] = self.repo.load_snapshot(sid)
        tid = bytes.fromhex(snap.tree)
        parts = path.strip("/").split("/")
        for i, part in enumerate(parts):
            node = self._tree(tid).get(part)
            if node is None or i == len(parts) - 1:
                return node
            if node.subtree is None:
                return None
            tid = node.subtree
        return None

    def files(self, sid: str, top: str) -> dict[str, tuple[int, int]]:
        snap = self.repo.load_snapshot(sid)
        return {"/" + p: (nd.size, nd.mtime_ns) for p, nd in self.repo.walk(snap)
                if nd.type == "file" and ("/" + p).startswith(top + "/")}

    def close(self) -> None:
        self.repo.close()


def tree_files(tree: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _dirs, names in os.walk(tree):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return out


def rpo_of(writes: list[tuple[str, float, int]], done: list[tuple[float, str]],
           holds: Any) -> tuple[list[float], int]:
    """The RPO of each write: the end of the first commit after its close() whose snapshot holds
    that path at that mtime or newer; and how many writes no commit held."""
    done = sorted(done)
    rpo: list[float] = []
    missing = 0
    for path, closed, mtime in writes:
        for at, sid in done:
            if at >= closed and holds(sid, path, mtime):
                rpo.append(at - closed)
                break
        else:
            missing += 1
    return rpo, missing


# -- keepwell watch --------------------------------------------------------------------------
class Watch:
    def __init__(self, command: list[str], tree: Path, log: Path, env: dict[str, str]) -> None:
        self.log = log
        self.out = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            command + ["-q", "watch", "--json", "--max-delay", "500ms", "--quiet-time", "100ms",
                       "--notify", env.get("KEEPWELL_BENCH_NOTIFY", "auto"), str(tree)],
            stdout=self.out, stderr=subprocess.DEVNULL, env=env)
        self.size0 = log.stat().st_size

    def commits(self) -> list[dict[str, Any]]:
        with open(self.log, "rb") as f:
            f.seek(self.size0)
            lines = f.read().splitlines()
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if "event" not in doc:  # a commit, not a failure or a catching up
                    out.append(doc)
        return out

    def wait_commit(self, after: float = 0.0, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not any(c["at"] > after for c in self.commits()):
            if self.proc.poll() is not None:
                raise SystemExit(f"the watcher exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise SystemExit("the watcher made no commit in time")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait()
        self.out.close()
        return rc


def all_commits(log: Path) -> list[tuple[float, str]]:
    out = []
    for line in log.read_bytes().splitlines():
        with contextlib.suppress(ValueError):
            c = json.loads(line)
            if c.get("snapshot"):
                out.append((float(c["at"]), str(c["snapshot"])))
    return out


def keepwell_run(a: argparse.Namespace, name: str, location: str, env: dict[str, str],
                 tree: Path, work: Path, seed: int) -> dict[str, str]:
    command = shlex.split(a.keepwell)
    env = {**env, "KEEPWELL_REPOSITORY": location, "KEEPWELL_CACHE_DIR": str(work / "cache")}
    subprocess.run(command + ["-q", "init"], env=env, check=True, stdout=subprocess.DEVNULL)
    log = work / "watch.jsonl"
    log.touch()
    t0 = time.monotonic()
    w = Watch(command, tree, log, env)
    w.wait_commit()
    start_scan = time.monotonic() - t0
    time.sleep(1)
    c0 = cpu_seconds(w.proc.pid)
    time.sleep(IDLE_SECONDS)
    idle_cpu = (cpu_seconds(w.proc.pid) - c0) / IDLE_SECONDS
    idle_rss = peak_rss = rss_mb(w.proc.pid)

    writer = Writer(tree, a.files, a.rate, seed)
    c0 = cpu_seconds(w.proc.pid)
    begin = time.time()
    thread = writer.start()
    while time.time() < begin + a.seconds:
        time.sleep(0.25)
        peak_rss = max(peak_rss, rss_mb(w.proc.pid))
    writer.stop.set()
    thread.join()
    wrote = time.time() - begin
    load_cpu = (cpu_seconds(w.proc.pid) - c0) / wrote
    w.wait_commit(after=time.time())
    rc = w.stop()
    if rc != 0:
        raise SystemExit(f"the watcher exited with {rc} on SIGTERM")

    snaps = Snapshots(location)
    commits = all_commits(log)
    loaded = [c for c in w.commits() if c["at"] >= begin]
    durations = [float(c["seconds"]) for c in loaded]

    def holds(sid: str, path: str, mtime: int) -> bool:
        nd = snaps.node(sid, path)
        return nd is not None and nd.mtime_ns >= mtime

    rpo, missing = rpo_of(writer.writes, commits, holds)
    held = snaps.files(commits[-1][1], str(tree))
    now = tree_files(tree)
    lost = sum(1 for p, v in now.items() if held.get(p) != v) + len(held.keys() - now.keys())
    snaps.close()
    print(f"keepwell {name}: {len(writer.writes)} writes in {wrote:.1f}s, {len(commits)} snapshots, "
          f"start scan {start_scan:.1f}s, RPO p50/p99/max {pct(rpo, .5):.3f}/{pct(rpo, .99):.3f}/"
          f"{max(rpo):.3f}s, never committed {missing}, files differing {lost}", flush=True)
    res = {
        "RPO p50 / p99 / max": f"{pct(rpo, .5) * 1000:.0f} / {pct(rpo, .99) * 1000:.0f} / "
                               f"{max(rpo) * 1000:,.0f} ms",
        "writes (per second)": f"{len(writer.writes):,} ({len(writer.writes) / wrote:,.0f}/s)",
        "snapshots during the load": f"{sum(1 for at, _ in commits if at >= begin):,}",
        "writes never committed": f"{missing}",
        "commit p50 / max (keepwell's own count)": f"{pct(durations, .5) * 1000:.0f} / "
                                                   f"{max(durations) * 1000:,.0f} ms",
        "changes per commit, median": f"{pct([float(c['changes']) for c in loaded], .5):.0f}",
        "files differing from the last snapshot": f"{lost}",
        "CPU idle / under load (of one core)": f"{idle_cpu * 100:.1f} % / {load_cpu * 100:.0f} %",
        "RSS idle / peak": f"{idle_rss:.0f} / {peak_rss:.0f} MB",
        "first snapshot (start scan)": f"{start_scan:.1f} s",
    }
    return res


def kill_run(a: argparse.Namespace, name: str, location: str, env: dict[str, str], tree: Path,
             work: Path, seed: int) -> dict[str, str]:
    command = shlex.split(a.keepwell)
    env = {**env, "KEEPWELL_REPOSITORY": location, "KEEPWELL_CACHE_DIR": str(work / "cache")}
    log = work / "watch.jsonl"
    rng = random.Random(seed)
    writer = Writer(tree, a.files, a.rate, seed)
    thread = writer.start()
    in_scan = 0
    w = Watch(command, tree, log, env)
    for k in range(a.kills):
        if k % 2:  # in the start scan, or soon after it
            time.sleep(rng.uniform(0.1, 6.0))
        else:  # after the start scan: in a commit, or between commits
            w.wait_commit()
            time.sleep(rng.uniform(0.0, 2.0))
        if not w.commits():
            in_scan += 1  # killed before its start scan committed
        rc = w.stop(signal.SIGKILL)
        if rc != -signal.SIGKILL:
            raise SystemExit(f"the watcher exited by itself ({rc}) before its kill")
        w = Watch(command, tree, log, env)
    writer.stop.set()
    thread.join()
    stopped = time.time()
    w.wait_commit(after=stopped)  # quiesce: a commit that started after the last write
    rc = w.stop()
    if rc != 0:
        raise SystemExit(f"the watcher exited with {rc} on SIGTERM after the kills")
    target = work / "restored"
    subprocess.run(command + ["-q", "restore", "latest", "--target", str(target)], env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    restored = target / str(tree).lstrip("/")
    now = tree_files(tree)
    back = tree_files(restored)
    differ = len(now.keys() ^ {str(tree) + p[len(str(restored)):] for p in back})
    for p in now:
        q = str(restored) + p[len(str(tree)):]
        try:
            with open(p, "rb") as f, open(q, "rb") as g:
                if f.read() != g.read():
                    differ += 1
        except FileNotFoundError:
            pass  # counted above
    shutil.rmtree(target)
    check = subprocess.run(command + ["-q", "check"], env=env, capture_output=True, text=True)
    print(f"keepwell {name}: {a.kills} kills ({in_scan} before the start scan's commit), "
          f"{len(writer.writes)} writes; after the quiesce {differ} of {len(now):,} files differ "
          f"from the last snapshot; check: exit {check.returncode}", flush=True)
    if check.returncode != 0:
        print(check.stdout + check.stderr)
    return {
        f"after {a.kills} SIGKILLs under load: files whose content differs": f"{differ} of {len(now):,}",
        "`keepwell check` after the kills": "passed" if check.returncode == 0 else f"FAILED ({check.returncode})",
    }


# -- restic backup in a loop -----------------------------------------------------------------
@dataclass
class ResticLoop:
    argv: list[str]
    env: dict[str, str]
    runs: list[tuple[float, float, str]] = field(default_factory=list)  # start, end, snapshot id
    cpu: float = 0.0
    peak_rss: float = 0.0
    stop_after: float | None = None  # stop once a run that started after this time has ended

    def run(self) -> None:
        while True:
            start = time.time()
            p = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL)
            chunks: list[bytes] = []
            reader = threading.Thread(target=lambda p=p: chunks.append(p.stdout.read()))  # type: ignore[union-attr]
            reader.start()
            # its peak RSS from /proc while it runs (rusage's would count this script's pages
            # copied at the fork)
            while True:
                pid, status, ru = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    break
                with contextlib.suppress(OSError, ValueError):
                    for line in open(f"/proc/{p.pid}/status"):
                        if line.startswith("VmHWM:"):
                            self.peak_rss = max(self.peak_rss, int(line.split()[1]) / 1024)
                time.sleep(0.05)
            end = time.time()
            reader.join()
            out = b"".join(chunks)
            p.returncode = os.waitstatus_to_exitcode(status)
            self.cpu += ru.ru_utime + ru.ru_stime
            sid = ""
            for line in out.splitlines():
                with contextlib.suppress(ValueError):
                    msg = json.loads(line)
                    if msg.get("message_type") == "summary":
                        sid = msg.get("snapshot_id", "")
            if p.returncode == 0 and sid:
                self.runs.append((start, end, sid))
            if self.stop_after is not None and start >= self.stop_after:
                return

    def measure(self, seconds: float, writer: Writer | None) -> tuple[float, float]:
        """Run for ``seconds`` (with the writer, if any); the CPU share and the wall time."""
        self.cpu = 0.0
        self.stop_after = None
        t = threading.Thread(target=self.run, daemon=True)
        begin = time.time()
        t.start()
        wt = writer.start() if writer is not None else None
        time.sleep(seconds)
        if writer is not None and wt is not None:
            writer.stop.set()
            wt.join()
        writing = self.stop_after = time.time()
        t.join()  # until a run that started after the last write has ended
        return self.cpu / (time.time() - begin), writing - begin


def restic_run(a: argparse.Namespace, name: str, location: str, env: dict[str, str],
               tree: Path, work: Path, seed: int) -> dict[str, str]:
    env = {**env, "RESTIC_REPOSITORY": location, "RESTIC_PASSWORD": PASSWORD,
           "RESTIC_CACHE_DIR": str(work / "restic-cache")}
    subprocess.run(["restic", "-q", "init"], env=env, check=True, stdout=subprocess.DEVNULL)
    argv = ["restic", "backup", "--json", str(tree)]
    t0 = time.monotonic()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    first = time.monotonic() - t0
    loop = ResticLoop(argv, env)
    idle_cpu, _ = loop.measure(IDLE_SECONDS, None)
    idle_runs = len(loop.runs)
    loop.runs.clear()
    writer = Writer(tree, a.files, a.rate, seed)
    load_cpu, wrote = loop.measure(a.seconds, writer)
    rpo: list[float] = []
    missing = 0
    for _path, closed, _mtime in writer.writes:
        end = next((e for s, e, _ in loop.runs if s >= closed), None)
        if end is None:
            missing += 1
        else:
            rpo.append(end - closed)
    print(f"restic {name}: {len(writer.writes)} writes in {wrote:.1f}s, {len(loop.runs)} snapshots "
          f"({idle_runs} in {IDLE_SECONDS:.0f}s idle), RPO p50/p99/max {pct(rpo, .5):.3f}/"
          f"{pct(rpo, .99):.3f}/{max(rpo, default=0):.3f}s, never covered {missing}", flush=True)
    return {
        "RPO p50 / p99 / max": f"{pct(rpo, .5) * 1000:,.0f} / {pct(rpo, .99) * 1000:,.0f} / "
                               f"{max(rpo, default=0) * 1000:,.0f} ms",
        "writes (per second)": f"{len(writer.writes):,} ({len(writer.writes) / wrote:,.0f}/s)",
        "snapshots during the load": f"{len(loop.runs):,}",
        "writes never committed": f"{missing}",
        "CPU idle / under load (of one core)": f"{idle_cpu * 100:.0f} % / {load_cpu * 100:.0f} %",
        "RSS idle / peak": f"– / {loop.peak_rss:.0f} MB (one run)",
        "first snapshot (start scan)": f"{first:.1f} s",
    }


# -- the run ---------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--backend", choices=["local", "s3", "both"], default="local")
    ap.add_argument("--kills", type=int, default=0)
    ap.add_argument("--restic", action="store_true")
    ap.add_argument("--notify", choices=["auto", "inotify", "fanotify"], default="auto",
                    help="how the watcher captures changes (keepwell watch --notify)")
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "continuous"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--keepwell", default=f"{sys.executable} -m keepwell.cli.main")
    a = ap.parse_args()
    work = Path(a.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tree = work / "tree"
    env = {**os.environ, "KEEPWELL_PASSWORD": PASSWORD, "KEEPWELL_BENCH_NOTIFY": a.notify,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    os.environ["KEEPWELL_PASSWORD"] = PASSWORD
    print(f"{a.files:,} files + a {BIG >> 20} MiB log; {a.rate:.0f} writes/s for {a.seconds:g}s; "
          f"backend {a.backend}; kills {a.kills}; restic {'yes' if a.restic else 'no'}; "
          f"notify {a.notify}; "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    make_tree(tree, a.files)
    columns: dict[str, dict[str, str]] = {}
    backends = ["local", "s3"] if a.backend == "both" else [a.backend]
    server = None
    try:
        for i, b in enumerate(backends):
            if b == "s3":
                from tests.servers.seaweed import SeaweedServer

                server = SeaweedServer(work / "weed").start()
                for bucket in ("kw-bench", "restic-bench"):
                    server.create_bucket(bucket)
                server.warm_up("kw-bench")
                env.update(server.env())
                os.environ.update(server.env())
                kw_loc, restic_loc = "s3://kw-bench/repo", f"s3:{server.endpoint}/restic-bench/repo"
            else:
                kw_loc, restic_loc = str(work / "kw-repo"), str(work / "restic-repo")
            sub = work / f"kw-{b}"
            sub.mkdir()
            kw = columns[f"keepwell watch, {b}"] = {"files in the tree": f"{len(tree_files(tree)):,}"}
            kw.update(keepwell_run(a, b, kw_loc, env, tree, sub, 10 * i + 2))
            if a.restic:  # before the kills, which grow the tree
                rsub = work / f"restic-{b}"
                rsub.mkdir()
                rc = columns[f"restic loop, {b}"] = {"files in the tree": f"{len(tree_files(tree)):,}"}
                rc.update(restic_run(a, b, restic_loc, env, tree, rsub, 10 * i + 3))
            if a.kills:
                kw.update(kill_run(a, b, kw_loc, env, tree, sub, 10 * i + 4))
    finally:
        if server is not None:
            server.stop()
    rows: list[str] = []
    for col in columns.values():
        rows += [k for k in col if k not in rows]
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end; peak RSS of this script "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB\n")
    print("| | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for row in rows:
        print(f"| {row} | " + " | ".join(c.get(row, "–") for c in columns.values()) + " |")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
