"""Make tests/data/compat-v1: a repository written by keepwell's first released format.

tests/integration/test_format_compat.py proves that the current code opens this repository,
checks it clean and restores every snapshot in it. That proof is worth something only if the
repository was written by the *released* code (commit bf364a0, format version 1), never by the
code of the checkout: run this script with the released tree first on the import path.

    git worktree add /tmp/kw-released bf364a0
    PYTHONPATH=/tmp/kw-released/src .venv/bin/python tests/data/make_compat_v1.py
    git worktree remove /tmp/kw-released

Run it as root on a machine set up for the integration tests (PostgreSQL 15 and MariaDB, see
tests/servers): the PostgreSQL server and every keepwell command it drives run as ``postgres``.
The script refuses to run with the keepwell of this checkout.

It replaces what tests/data/compat-v1/ holds but its README:

- ``repo/``: the repository. The key is made with the weak test KDF (t=1, 8 KiB); the chunker
  has small sizes (min 16 KiB, average 64 KiB, max 256 KiB) so a file of a few hundred KiB is
  several blobs; compression is the released default.
- ``password``: its password.
- ``manifest.json``: what each snapshot must restore to: for the files snapshot every entry
  (type, mode, size, sha256, mtime, symlink target, hard-link group), for stdin and SQLite the
  bytes or rows, for the databases the row counts at the backup and at each point-in-time
  target, with the positions to restore to.

Snapshots, in the order they are made: ``files`` (a tree with several modes, an empty file, a
multi-blob file of fixed pseudo-random bytes, a compressible file, symlinks, a hard-link pair,
subdirectories and a name that is not UTF-8), ``stdin``, ``sqlite``, ``mysql-logical``,
``mysql-binlog`` (rows written after the dump, for a replay to a GTID), ``postgres-logical``,
``postgres-physical`` with its ``postgres-wal`` archive (1 MiB segments) and a
``postgres-restore-point``. The PostgreSQL cluster holds one database, ``postgres``: the
templates are dropped, since each adds about 1 MB of catalogs to the physical copy.

File contents, names and times are fixed, so two runs give the same manifest apart from snapshot
ids, times and database positions; the repository itself differs (random keys and salts).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(1, str(REPO_ROOT))  # the tests package (servers, support), not keepwell itself

from tests.integration.compat_support import (  # noqa: E402
    describe_tree,
    mariadb_counts,
    pg_counts,
    sha256,
    sqlite_facts,
)

RELEASED = "bf364a0"
OUT = REPO_ROOT / "tests" / "data" / "compat-v1"
WORK = Path("/tmp/keepwell-compat-v1")  # fixed: the files snapshot records absolute paths
PASSWORD = "compat-v1 password"
CHUNKER = {"seed": 0x2B7E151628AED2A6 >> 2, "min": 16 * 1024, "avg": 64 * 1024,
           "max": 256 * 1024}
MTIME = 1_796_472_000  # 2026-12-05 12:00:00 UTC
MY_HOST = "compat-mariadb"


def released_tree() -> Path:
    """The tree keepwell is imported from; refuses this checkout's own code."""
    import keepwell

    src = Path(keepwell.__file__).resolve().parents[1]
    if src == (REPO_ROOT / "src").resolve():
        sys.exit("make_compat_v1: keepwell is imported from this checkout; put the released "
                 f"tree first (PYTHONPATH=<worktree of {RELEASED}>/src)")
    return src.parent


def released_commit(tree: Path) -> str:
    res = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=True)
    commit = res.stdout.strip()
    if not commit.startswith(RELEASED):
        sys.exit(f"make_compat_v1: {tree} is at {commit[:12]}, not the released {RELEASED}")
    return commit


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "KEEPWELL_"))}
    out.update(KEEPWELL_REPOSITORY=str(WORK / "repo"),
               KEEPWELL_PASSWORD_FILE=str(WORK / "password"),
               KEEPWELL_TESTONLY_WEAK_KDF="1", HOME=str(WORK),
               PYTHONPATH=str(released_tree() / "src"))
    return out


CLI = "import sys\nfrom keepwell.cli.main import run\nsys.argv[0] = 'keepwell'\nrun()\n"


def keepwell_cli(*args: str, as_postgres: bool = False, stdin: bytes | None = None) -> str:
    """Run the released ``keepwell ARGS`` (as the postgres user: what the server also writes)."""
    from tests.servers.postgres import as_pg_user

    argv = [sys.executable, "-c", CLI, *args]
    if as_postgres:
        argv = as_pg_user(argv)
    res = subprocess.run(argv, env=env(), input=stdin, capture_output=True, cwd=str(WORK))
    if res.returncode != 0:
        raise SystemExit(f"keepwell {' '.join(args)} failed ({res.returncode}):\n"
                         f"{res.stdout.decode(errors='replace')}\n"
                         f"{res.stderr.decode(errors='replace')}")
    return res.stdout.decode()


def fixed_bytes(label: str, size: int) -> bytes:
    """Pseudo-random bytes that every run reproduces: BLAKE3's extended output of a label."""
    import blake3

    return blake3.blake3(f"keepwell compat-v1 {label}".encode()).digest(length=size)


# -- files ------------------------------------------------------------------------------------
TEXT = "".join(f"{i:05d} the quick brown fox jumps over the lazy dog\n" for i in range(1200))


def file_specs() -> list[tuple[bytes, str, int, bytes | None]]:
    """(path under files/, type, mode, content or link target), parents before children."""
    return [
        (b"", "dir", 0o755, None),
        (b"README.txt", "file", 0o644, b"A small tree written by keepwell's first format.\n"),
        (b"run.sh", "file", 0o755, b"#!/bin/sh\necho compat-v1\n"),
        (b"private.key", "file", 0o600, b"not a secret, but kept like one\n"),
        (b"readonly.txt", "file", 0o444, b"read only\n"),
        (b"empty", "file", 0o644, b""),
        (b"random.bin", "file", 0o640, fixed_bytes("random.bin", 320 * 1024 + 123)),
        (b"lines.txt", "file", 0o644, TEXT.encode()),
        (b"caf\xe9 \xff.txt", "file", 0o644, b"a name that is not UTF-8\n"),
        (b"hard-a", "file", 0o644, b"one inode, two names\n"),
        (b"link-to-readme", "symlink", 0o777, b"README.txt"),
        (b"link-to-note", "symlink", 0o777, b"sub/deeper/note.md"),
        (b"sub", "dir", 0o750, None),
        (b"sub/deeper", "dir", 0o700, None),
        (b"sub/deeper/note.md", "file", 0o644, b"# nested\n\ntwo levels down\n"),
        (b"sub/hard-b", "hardlink", 0o644, b"hard-a"),
    ]


def make_files(root: Path) -> list[dict[str, Any]]:
    """Create the tree; returns its description (`describe_tree`)."""
    base = os.fsencode(root)
    specs = file_specs()
    for rel, kind, _mode, content in specs:
        path = os.path.join(base, rel) if rel else base
        if kind == "dir":
            os.mkdir(path)
        elif kind == "file":
            with open(path, "wb") as f:
                f.write(content or b"")
        elif kind == "symlink":
            assert content is not None
            os.symlink(content, path)
        else:
            assert content is not None
            os.link(os.path.join(base, content), path)
    # modes and times last, children first, so that making a child does not touch its parent
    for rel, kind, mode, _content in reversed(specs):
        path = os.path.join(base, rel) if rel else base
        if kind != "symlink":
            os.chmod(path, mode)
        os.utime(path, ns=(MTIME * 10**9, MTIME * 10**9), follow_symlinks=False)
    return describe_tree(root)


# -- SQLite -----------------------------------------------------------------------------------
def make_sqlite(path: Path) -> dict[str, Any]:
    con = sqlite3.connect(path)
    with con:
        con.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER)")
        con.executemany("INSERT INTO items VALUES (?, ?, ?)",
                        [(i, f"item-{i}", i % 17) for i in range(1, 501)])
        con.execute("CREATE TABLE tags (item INTEGER REFERENCES items(id), tag TEXT)")
        con.executemany("INSERT INTO tags VALUES (?, ?)",
                        [(i, ("red", "green", "blue")[i % 3]) for i in range(1, 61)])
        con.execute("CREATE INDEX tags_by_item ON tags(item)")
    con.close()
    return sqlite_facts(path)


# -- MariaDB ----------------------------------------------------------------------------------
def make_mariadb() -> dict[str, Any]:
    from tests.servers.mariadb import MariaDBServer, fill_sample

    workdir = WORK / "mariadb"
    workdir.mkdir()
    server = MariaDBServer(workdir, server_id=7, name="compat")
    server.start()
    try:
        fill_sample(server, "shop", rows=300)
        server.sql("CREATE DATABASE other")
        server.sql("CREATE TABLE other.notes (id INT PRIMARY KEY, body TEXT)")
        server.sql("INSERT INTO other.notes SELECT seq, REPEAT('n', seq % 300) FROM seq_1_to_40",
                   "other")
        at_base = mariadb_counts(server)
        logical = json.loads(keepwell_cli("mysql", "backup", "--logical", "--db-url", server.url,
                                          "--server-name", MY_HOST, "--json"))
        # after the dump: rows a replay must bring back, up to a GTID and no further
        server.sql("INSERT INTO shop.items SELECT seq, CONCAT('late-', seq), 1, NULL "
                   "FROM seq_301_to_340", "shop")
        target_gtid = str(server.sql("SELECT @@gtid_binlog_pos")[0][0])
        at_target = mariadb_counts(server)
        server.sql("INSERT INTO shop.items SELECT seq, CONCAT('later-', seq), 2, NULL "
                   "FROM seq_341_to_360", "shop")
        at_end = mariadb_counts(server)
        pushed = json.loads(keepwell_cli("mysql", "binlog-push", "--flush", "--db-url",
                                         server.url, "--server-name", MY_HOST, "--json"))
        version = str(server.sql("SELECT VERSION()")[0][0])
    finally:
        server.stop()
    return {
        "server_name": MY_HOST, "version": version, "logical_snapshot": logical["snapshot"],
        "databases": sorted(logical["source"]["databases"]),
        "binlog_file": logical["source"]["binlog_file"],
        "binlog_pos": logical["source"]["binlog_pos"], "gtid": logical["source"]["gtid"],
        "rows_at_base": at_base, "binlogs": pushed["stored"],
        "target_gtid": target_gtid, "rows_at_target_gtid": at_target, "rows_at_end": at_end,
    }


# -- PostgreSQL -------------------------------------------------------------------------------
def make_postgres() -> dict[str, Any]:
    from tests.servers import postgres as pgs

    workdir = WORK / "pg"
    workdir.mkdir()
    pgs.chown_pg(workdir)
    pgs.ensure_pg_user_can_run_keepwell()
    cluster = pgs.PgCluster(workdir, "data")
    cluster.run_as_pg([cluster.bin("initdb"), "-D", str(cluster.datadir), "-A", "trust", "-U",
                       pgs.PG_USER, "--no-sync", "-E", "UTF8", "--locale=C", "--wal-segsize=1"])
    e = env()
    push = " ".join([
        "env", *(f"{k}={e[k]}" for k in ("PYTHONPATH", "KEEPWELL_REPOSITORY",
                                          "KEEPWELL_PASSWORD_FILE", "KEEPWELL_TESTONLY_WEAK_KDF")),
        sys.executable, "-m", "keepwell.sources.postgres.walcommand", "push", "%p",
    ])
    # no Unix socket: its directory would be recorded in the copy, and be gone when it is
    # restored
    cluster.configure(listen_addresses="'127.0.0.1'", unix_socket_directories="''",
                      wal_level="replica",
                      max_wal_senders=4, fsync="off", shared_buffers="'16MB'",
                      archive_mode="on", archive_command="'" + push.replace("'", "''") + "'")
    cluster.start()
    try:
        for db in ("template0", "template1"):
            cluster.sql(f"ALTER DATABASE {db} IS_TEMPLATE false")
            cluster.sql(f"DROP DATABASE {db}")
        cluster.sql("CREATE ROLE compat_reader LOGIN")
        cluster.sql("CREATE TABLE events (id int PRIMARY KEY, phase text NOT NULL, body text)")
        cluster.sql("INSERT INTO events SELECT g, 'base', md5(g::text) FROM"
                    " generate_series(1, 200) g")
        cluster.sql("GRANT SELECT ON events TO compat_reader")
        at_base = pg_counts(cluster)
        url = cluster.url()
        logical = json.loads(keepwell_cli("postgres", "backup", "--logical", "--db-url", url,
                                          "--json", as_postgres=True))
        physical = json.loads(keepwell_cli("postgres", "backup", "--physical", "--db-url", url,
                                           "--json", as_postgres=True))
        cluster.sql("INSERT INTO events SELECT g, 'after-base', md5(g::text) FROM"
                    " generate_series(201, 260) g")
        point = json.loads(keepwell_cli("postgres", "restore-point", "compat-v1-point",
                                        "--db-url", url, "--json", as_postgres=True))
        at_point = pg_counts(cluster)
        cluster.sql("INSERT INTO events SELECT g, 'after-point', md5(g::text) FROM"
                    " generate_series(261, 300) g")
        at_end = pg_counts(cluster)
        end_lsn = str(cluster.scalar("SELECT pg_current_wal_lsn()::text"))
        cluster.scalar("SELECT pg_switch_wal()::text")
        cluster.wait_archived()
        facts = cluster.sql("SELECT (SELECT system_identifier FROM pg_control_system())::text,"
                            " current_setting('server_version_num')")[0]
    finally:
        cluster.stop()
    return {
        "cluster": "main", "system_identifier": facts[0], "version_num": int(facts[1]),
        "segment_size": 1024 * 1024, "databases": logical["databases"],
        "logical_snapshot": logical["snapshot"], "physical_snapshot": physical["snapshot"],
        "timeline": physical["timeline"], "start_lsn": physical["start_lsn"],
        "stop_lsn": physical["stop_lsn"], "method": physical["method"],
        "restore_point": {"name": point["name"], "lsn": point["lsn"]},
        "end_lsn": end_lsn, "role": "compat_reader",
        "rows_at_base": at_base, "rows_at_restore_point": at_point, "rows_at_end": at_end,
    }


# -- the whole ----------------------------------------------------------------------------------
def init_repository() -> None:
    from keepwell.backends.registry import open_backend
    from keepwell.chunker import ChunkerParams
    from keepwell.crypto import KdfParams
    from keepwell.repository import Repository

    params = ChunkerParams(seed=CHUNKER["seed"], min_size=CHUNKER["min"],
                           avg_size=CHUNKER["avg"], max_size=CHUNKER["max"])
    Repository.init(open_backend(str(WORK / "repo")), PASSWORD, chunker=params,
                    kdf=KdfParams(time_cost=1, memory_kib=8, parallelism=1)).close()


def main() -> None:
    import keepwell
    from tests.servers.postgres import chown_pg

    if os.geteuid() != 0:
        sys.exit("make_compat_v1: run as root (the PostgreSQL server runs as 'postgres')")
    commit = released_commit(released_tree())
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(mode=0o755)
    (WORK / "password").write_text(PASSWORD + "\n")
    os.chmod(WORK / "password", 0o644)  # the postgres user reads it too
    init_repository()

    entries = make_files(WORK / "files")
    files = json.loads(keepwell_cli("backup", str(WORK / "files"), "--host", "compat-v1",
                                    "--json"))["snapshot"]
    stdin_data = TEXT.replace("fox", "cat").encode() * 2
    stdin = json.loads(keepwell_cli("backup", "--stdin", "--stdin-filename", "notes.txt",
                                    "--host", "compat-v1", "--json", stdin=stdin_data))["snapshot"]
    sqlite_facts_ = make_sqlite(WORK / "app.db")
    sqlite = json.loads(keepwell_cli("sqlite", "backup", str(WORK / "app.db"), "--json"))
    mariadb = make_mariadb()

    chown_pg(WORK / "repo")
    postgres = make_postgres()
    subprocess.run(["chown", "-R", "root:root", str(WORK / "repo")], check=True)

    snapshots = json.loads(keepwell_cli("snapshots", "--json"))
    manifest = {
        "about": "tests/data/make_compat_v1.py wrote this with the released code; "
                 "tests/integration/test_format_compat.py reads it",
        "written_by": {"commit": commit, "program_version": keepwell.__version__},
        "password_file": "password",
        "chunker": CHUNKER,
        "snapshots": [{"id": s["id"], "kind": s["kind"]} for s in snapshots],
        "files": {"snapshot": files["id"], "path": str(WORK / "files"), "entries": entries},
        "stdin": {"snapshot": stdin["id"], "filename": "notes.txt", "size": len(stdin_data),
                  "sha256": sha256(stdin_data)},
        "sqlite": {"snapshot": sqlite["id"], "database": str(WORK / "app.db"), **sqlite_facts_},
        "mariadb": mariadb,
        "postgres": postgres,
    }
    shutil.rmtree(OUT / "repo", ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copytree(WORK / "repo", OUT / "repo")
    shutil.copy(WORK / "password", OUT / "password")
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(WORK, ignore_errors=True)
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({size / 1e6:.2f} MB, {len(snapshots)} snapshots)")


if __name__ == "__main__":
    main()
