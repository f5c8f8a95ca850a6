"""Throwaway PostgreSQL clusters for integration tests, run as the unprivileged `postgres` user.

PostgreSQL refuses to run as root, and CI runs as root: every server (and so every
``archive_command``/``restore_command`` that calls keepwell) runs as ``postgres`` through
``runuser``; keepwell commands that write a repository the server also writes run as that user
too (`PgEnv.keepwell`). Work directories live under /tmp, owned by ``postgres``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = REPO_ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
PG_USER = "postgres"
PASSWORD = "pg-test-password"


def pg_bindir() -> str | None:
    env = os.environ.get("KEEPWELL_PG_BINDIR")
    if env:
        return env
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return os.path.dirname(found[0]) if found else None


def pg_available() -> bool:
    bindir = pg_bindir()
    if bindir is None:
        return False
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        return os.geteuid() != 0
    return True


_PG_CAN_RUN: list[bool] = []


def ensure_pg_user_can_run_keepwell() -> None:
    """Let `postgres` traverse the directories to the interpreter and the checkout (as
    .ci/install.d/postgres.sh does), so archive_command can run keepwell; once per session."""
    if _PG_CAN_RUN or os.geteuid() != 0:
        return
    probe = ["runuser", "-u", PG_USER, "--", PYTHON, "-c", "import keepwell.sources.postgres"]
    if subprocess.run(probe, capture_output=True).returncode != 0:
        for start in (os.path.dirname(os.path.realpath(PYTHON)), str(REPO_ROOT / "src")):
            p = start
            while p not in ("/", ""):
                mode = os.stat(p).st_mode
                if not mode & 0o001:
                    os.chmod(p, mode | 0o001)
                p = os.path.dirname(p)
        res = subprocess.run(probe, capture_output=True, text=True)
        if res.returncode != 0:
            raise AssertionError(f"user {PG_USER} cannot run {PYTHON}: {res.stderr.strip()}")
    _PG_CAN_RUN.append(True)


def as_pg_user(argv: Sequence[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_USER, "--", *argv]
    return list(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_workdir(prefix: str = "kw-pg-") -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    if os.geteuid() == 0:
        pw = pwd.getpwnam(PG_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


def chown_pg(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", f"{PG_USER}:", str(path)], check=True)


def keepwell_argv(*args: str) -> list[str]:
    """``keepwell postgres ARGS`` (the group's own entry point when the top level is missing)."""
    code = (
        "import sys\n"
        "try:\n"
        "    from keepwell.cli.main import run\n"
        "    sys.argv = ['keepwell', 'postgres'] + sys.argv[1:]\n"
        "except ImportError:\n"
        "    from keepwell.cli.postgres import main as run\n"
        "    sys.argv = ['keepwell'] + sys.argv[1:]\n"
        "sys.exit(run())\n"
    )
    return [PYTHON, "-c", code, *args]


def wal_hook_argv() -> list[str]:
    script = VENV_BIN / "keepwell-wal"
    if script.exists():
        return [str(script)]
    return [PYTHON, "-m", "keepwell.sources.postgres.walcommand"]


FAST_PUSH_SOURCE = (Path(__file__).resolve().parents[2] / "src" / "keepwell" / "sources"
                    / "postgres" / "keepwell-wal-push")


def wal_push_argv(hook: str | None = None) -> list[str]:
    """The archive_command fast path (the shell script), as `archive-command` prints it;
    `hook` replaces the Python hook it falls back to."""
    hook = hook or wal_hook_argv()[0]
    installed = VENV_BIN / "keepwell-wal-push"
    if installed.exists() and hook == str(VENV_BIN / "keepwell-wal"):
        return [str(installed)]
    if not os.access(hook, os.X_OK):
        return [*wal_hook_argv(), "push"]
    return ["env", f"KEEPWELL_WAL_HOOK={hook}", "/bin/sh", str(FAST_PUSH_SOURCE)]


@dataclass
class PgEnv:
    """A work directory, a repository location in it and the environment keepwell needs."""

    workdir: Path
    repo: Path
    password_file: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("PG", "KEEPWELL_"))
        }
        env.update(
            KEEPWELL_REPOSITORY=str(self.repo),
            KEEPWELL_PASSWORD_FILE=str(self.password_file),
            HOME=str(self.workdir),
            KEEPWELL_TESTONLY_WEAK_KDF="1",
        )
        env.update(self.extra_env)
        return env

    def keepwell(self, *args: str, check: bool = True, timeout: float = 300,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``keepwell ARGS`` as the postgres user; returns the completed process."""
        full_env = self.env()
        full_env.update(env or {})
        res = subprocess.run(
            as_pg_user(keepwell_argv(*args)), env=full_env, capture_output=True, text=True,
            timeout=timeout, cwd=str(self.workdir),
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"keepwell {' '.join(args)} exited {res.returncode}\n"
                f"stdout: {res.stdout}\nstderr: {res.stderr}"
            )
        return res

    def wal_hook_command(self, *args: str) -> str:
        """A shell command line for archive_command/restore_command (env baked in)."""
        env = self.env()
        keep = ("KEEPWELL_REPOSITORY", "KEEPWELL_PASSWORD_FILE", "KEEPWELL_TESTONLY_WEAK_KDF")
        prefix = " ".join(f"{k}={env[k]}" for k in keep)
        return f"env {prefix} " + " ".join(wal_hook_argv()) + " " + " ".join(args)

    def wal_push_command(self, *args: str, hook: str | None = None) -> str:
        """archive_command through the shell fast path (env baked in)."""
        env = self.env()
        keep = ("KEEPWELL_REPOSITORY", "KEEPWELL_PASSWORD_FILE", "KEEPWELL_TESTONLY_WEAK_KDF")
        prefix = " ".join(f"{k}={env[k]}" for k in keep)
        return f"env {prefix} " + " ".join(wal_push_argv(hook)) + " " + " ".join(args)

    def start_restored(self, name: str, *args: str,
                       env: dict[str, str] | None = None) -> PgCluster:
        """``restore --target-dir WORKDIR/NAME ARGS --start`` on a free port: the server."""
        port = free_port()
        self.keepwell("restore", "--target-dir", str(self.workdir / name), *args, "--start",
                      "--port", str(port), env=env)
        return PgCluster(self.workdir, name, port=port)

    def python(self, code: str, *args: str) -> str:
        """Run Python `code` as the postgres user with `repo` bound to the open repository
        (and `sys.argv[1:]` = `args`); returns its stdout."""
        prelude = (
            "import os, sys\n"
            "from keepwell.repository import open_repository\n"
            "repo = open_repository(os.environ['KEEPWELL_REPOSITORY'],"
            " open(os.environ['KEEPWELL_PASSWORD_FILE']).read().strip())\n"
        )
        res = subprocess.run(as_pg_user([PYTHON, "-c", prelude + code, *args]), env=self.env(),
                             capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise AssertionError(f"repository script failed: {res.stderr}")
        return res.stdout

    def forget_wal(self, name: str) -> None:
        """Forget the archived WAL file `name` (a gap in the archive)."""
        self.python("ids = [s.id for s in repo.list_snapshots('postgres-wal')"
                    " if sys.argv[1] in s.source['files']]\nrepo.forget(ids)\n", name)

    def damage_wal(self, name: str) -> None:
        """Flip bytes of the stored first chunk of archived WAL file `name` (its page header
        makes that chunk its own), in the pack that holds it."""
        self.python(
            "from keepwell.repository.format import pack_object_name\n"
            "snap = next(s for s in repo.list_snapshots('postgres-wal')"
            " if sys.argv[1] in s.source['files'])\n"
            "node = repo.find_node(snap, snap.source['files'][sys.argv[1]]['path'])\n"
            "loc = repo.locate(node.content[0])\n"
            "path = os.path.join(os.environ['KEEPWELL_REPOSITORY'],"
            " pack_object_name(loc.pack_type, loc.pack.hex()))\n"
            "os.chmod(path, 0o600)\n"
            "with open(path, 'r+b') as f:\n"
            "    f.seek(loc.offset + loc.length // 2)\n"
            "    b = f.read(16)\n"
            "    f.seek(loc.offset + loc.length // 2)\n"
            "    f.write(bytes(x ^ 0xFF for x in b))\n", name)

    def unindex_wal(self, name: str) -> None:
        """Delete the index objects that list the pack holding WAL file `name`'s first chunk:
        the pack stays in storage, but no index points a reader at it."""
        self.python(
            "from keepwell.repository.format import KIND_INDEX\n"
            "from keepwell.repository.index import decode_index\n"
            "snap = next(s for s in repo.list_snapshots('postgres-wal')"
            " if sys.argv[1] in s.source['files'])\n"
            "node = repo.find_node(snap, snap.source['files'][sys.argv[1]]['path'])\n"
            "pack = repo.locate(node.content[0]).pack\n"
            "for info in repo.backend.list('index/'):\n"
            "    n = info.name.split('/', 1)[1]\n"
            "    if pack in [bytes(p) for p in"
            " decode_index(repo.get_object('index', n, KIND_INDEX)).packs]:\n"
            "        repo.backend.delete(info.name)\n", name)

    def init_repo(self, location: Path | None = None) -> None:
        """Initialise the repository (or another one at `location`, same password)."""
        code = (
            "import os\n"
            "from keepwell.backends.registry import open_backend\n"
            "from keepwell.repository import Repository\n"
            "Repository.init(open_backend(os.environ['KEEPWELL_REPOSITORY']),"
            " open(os.environ['KEEPWELL_PASSWORD_FILE']).read().strip()).close()\n"
        )
        env = self.env()
        if location is not None:
            env["KEEPWELL_REPOSITORY"] = str(location)
        res = subprocess.run(
            as_pg_user([PYTHON, "-c", code]), env=env, capture_output=True, text=True,
        )
        if res.returncode != 0:
            raise AssertionError(f"repository init failed: {res.stderr}")


def backed_up_cluster(env: PgEnv, table: str = "marks (i int PRIMARY KEY)") -> PgCluster:
    """A started cluster archiving synchronously through keepwell, with one table created, and
    a physical backup of it."""
    c = PgCluster(env.workdir).initdb(archive_timeout=0)
    c.set_archive_command(env.wal_hook_command("push", "%p"))
    c.start()
    c.sql(f"CREATE TABLE {table}")
    env.keepwell("backup", "--physical", "--db-url", c.url())
    return c


def control_config(env: PgEnv, cluster: PgCluster, *, mode: str = "physical",
                   drills: dict[str, Any] | None = None, source: str = "live") -> Path:
    """A control-plane config with one PostgreSQL source `source` for `cluster` and its drills,
    readable by the postgres user (``keepwell.cli.control ... -c`` it)."""
    import yaml

    state = env.workdir / "state"
    state.mkdir(exist_ok=True)
    chown_pg(state)
    config = env.workdir / "keepwell.yaml"
    config.write_text(yaml.safe_dump({
        "history": str(state / "history.db"),
        "scratch": str(env.workdir / "scratch"),
        "repositories": {"main": {"location": str(env.repo),
                                  "password": f"file:{env.password_file}"}},
        "sources": {source: {"kind": "postgres", "repository": "main", "mode": mode,
                             "connection": {"host": "127.0.0.1", "port": cluster.port,
                                            "user": PG_USER, "database": "postgres"}}},
        "drills": drills or {},
    }, sort_keys=False))
    chown_pg(config)
    return config


def control(env: PgEnv, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``keepwell ARGS -c CONFIG`` of the control plane, as this process's user."""
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "KEEPWELL_"))}
    run_env.update(HOME=str(env.workdir), KEEPWELL_TESTONLY_WEAK_KDF="1")
    return subprocess.run([PYTHON, "-m", "keepwell.cli.control", *args, "-c", str(config)],
                          env=run_env, capture_output=True, text=True, timeout=600,
                          cwd=str(env.workdir))


def make_env(workdir: Path) -> PgEnv:
    pw = workdir / "password"
    pw.write_text(PASSWORD + "\n")
    chown_pg(pw)
    os.chmod(pw, 0o600)
    return PgEnv(workdir=workdir, repo=workdir / "repo", password_file=pw)


class PgCluster:
    """One PostgreSQL cluster in `datadir`, listening on 127.0.0.1:`port`."""

    def __init__(self, workdir: Path, name: str = "pg", port: int | None = None,
                 datadir: Path | None = None) -> None:
        self.workdir = workdir
        self.name = name
        self.datadir = datadir or workdir / name
        self.port = port or free_port()
        self.logfile = workdir / f"{name}.log"
        self.sockdir = workdir / "sock"
        self.bindir = pg_bindir() or ""

    def bin(self, program: str) -> str:
        return os.path.join(self.bindir, program)

    def run_as_pg(self, argv: Sequence[str], check: bool = True, timeout: float = 120,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            as_pg_user(argv), capture_output=True, text=True, timeout=timeout, env=env,
            cwd=str(self.workdir),
        )
        if check and res.returncode != 0:
            raise AssertionError(f"{argv[0]} failed: {res.stdout}\n{res.stderr}")
        return res

    def initdb(self, waldir: Path | None = None, **settings: Any) -> PgCluster:
        """`waldir`: pg_wal there, linked from the data directory (``initdb --waldir``)."""
        self.sockdir.mkdir(exist_ok=True)
        chown_pg(self.sockdir)
        self.run_as_pg([
            self.bin("initdb"), "-D", str(self.datadir), "-A", "trust", "-U", PG_USER,
            "--no-sync", "-E", "UTF8", "--locale=C",
            *(["--waldir", str(waldir)] if waldir else []),
        ])
        base = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.sockdir}'",
            "wal_level": "replica",
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "fsync": "off",
            "full_page_writes": "on",
            "shared_buffers": "'32MB'",
            "max_connections": 40,
            "log_min_messages": "'info'",
        }
        base.update(settings)
        self.configure(**base)
        return self

    def configure(self, **settings: Any) -> None:
        """Append settings to postgresql.conf (as the postgres user owns it, via tee)."""
        text = "".join(f"{k} = {v}\n" for k, v in settings.items())
        subprocess.run(
            as_pg_user(["tee", "-a", str(self.datadir / "postgresql.conf")]),
            input=text, text=True, check=True, capture_output=True,
        )

    def set_archive_command(self, command: str) -> None:
        escaped = command.replace("'", "''")
        self.configure(archive_mode="on", archive_command=f"'{escaped}'")

    def start(self, timeout: float = 60) -> PgCluster:
        self.run_as_pg([
            self.bin("pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
            "-o", f"-p {self.port}", "-w", "-t", str(int(timeout)), "start",
        ], timeout=timeout + 10)
        return self

    def stop(self, mode: str = "fast") -> None:
        self.run_as_pg(
            [self.bin("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"], check=False,
        )

    def running(self) -> bool:
        res = self.run_as_pg([self.bin("pg_ctl"), "-D", str(self.datadir), "status"], check=False)
        return res.returncode == 0

    @property
    def conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.port} user={PG_USER} dbname=postgres"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(
            f"host=127.0.0.1 port={self.port} user={PG_USER} dbname={dbname}", autocommit=True,
        )

    def sql(self, query: str, params: Sequence[Any] | None = None,
            dbname: str = "postgres") -> list[tuple[Any, ...]]:
        with self.connect(dbname) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def scalar(self, query: str, params: Sequence[Any] | None = None,
               dbname: str = "postgres") -> Any:
        rows = self.sql(query, params, dbname)
        return rows[0][0] if rows else None

    def switch_wal(self) -> str:
        return str(self.scalar("SELECT pg_switch_wal()::text"))

    def wait_archived(self, timeout: float = 60) -> None:
        """Wait until the server has archived every finished segment (archive_status empty)."""
        deadline = time.monotonic() + timeout
        status = self.datadir / "pg_wal" / "archive_status"
        while time.monotonic() < deadline:
            if not list(status.glob("*.ready")):
                return
            time.sleep(0.1)
        raise AssertionError(f"WAL not archived within {timeout} s; see {self.logfile}")

    def pgbench_init(self, scale: int = 1, dbname: str = "postgres") -> None:
        subprocess.run(
            [self.bin("pgbench"), "-i", "-q", "-s", str(scale), "-h", "127.0.0.1",
             "-p", str(self.port), "-U", PG_USER, dbname],
            check=True, capture_output=True,
        )

    @contextlib.contextmanager
    def pgbench_load(self, seconds: int = 30, clients: int = 2,
                     dbname: str = "postgres") -> Iterator[subprocess.Popen[bytes]]:
        """A pgbench run in the background for the duration of the block."""
        proc = subprocess.Popen(
            [self.bin("pgbench"), "-n", "-c", str(clients), "-j", "1", "-T", str(seconds),
             "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, dbname],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- pytest fixtures (tests/conftest.py registers this module as a plugin) -----------------------
try:
    import pytest
except ImportError:  # pragma: no cover - the fixtures module is also used by scripts
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def pg_env() -> Iterator[PgEnv]:
        """A work directory owned by postgres with an initialised (weak-KDF) repository."""
        if not pg_available():
            pytest.skip("PostgreSQL binaries or the postgres user are not available")
        ensure_pg_user_can_run_keepwell()
        workdir = make_workdir()
        env = make_env(workdir)
        env.init_repo()
        clusters: list[PgCluster] = []
        env.extra_env["_KW_TEST"] = "1"
        try:
            yield env
        finally:
            for c in clusters:
                c.stop("immediate")
            stop_all_in(workdir)
            remove_workdir(workdir)


def stop_all_in(workdir: Path) -> None:
    """Stop every server whose data directory lives in `workdir` (test teardown)."""
    for pid_file in workdir.glob("*/postmaster.pid"):
        bindir = pg_bindir() or ""
        subprocess.run(
            as_pg_user([os.path.join(bindir, "pg_ctl"), "-D", str(pid_file.parent), "-m",
                        "immediate", "-w", "stop"]),
            capture_output=True,
        )
    # uploaders and streamers started by hooks hold no server, but may still run: end them
    for lock in workdir.glob("**/uploader.lock"):
        try:
            pid = int(lock.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"keepwell.sources.postgres.walcommand" in cmdline and str(workdir).encode() in cmdline:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
