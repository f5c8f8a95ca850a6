"""Throwaway MariaDB servers for integration tests and the benchmark.

`MariaDBServer` runs ``mariadb-install-db`` into a temporary datadir and starts ``mariadbd
--no-defaults`` on a free port and a private socket, with the binary log on (ROW format), as
root with an explicit ``--user=root``. It never touches the machine's own MariaDB service.
`WriteLoad` is a background writer that records the longest pause it saw between two commits.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pymysql

from tests.servers import free_port

ROOT_PASSWORD = "kw-root-pw"


def mariadb_available() -> bool:
    return all(shutil.which(t) for t in ("mariadbd", "mariadb-install-db", "mariadb-dump"))


def _mariadbd() -> str:
    return shutil.which("mariadbd") or "/usr/sbin/mariadbd"


class MariaDBServer:
    """One mariadbd on loopback with its own datadir, socket and port."""

    def __init__(self, workdir: Path, *, server_id: int = 1, name: str = "db",
                 datadir: Path | None = None, install: bool = True,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.name = name
        self.datadir = datadir or workdir / f"{name}-data"
        self.socket = str(workdir / f"{name}.sock")
        self.port = free_port()
        self.server_id = server_id
        self.extra_args = extra_args
        self.install = install
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{name}.err"

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> MariaDBServer:
        if self.install and not (self.datadir / "mysql").exists():
            self.datadir.mkdir(parents=True, exist_ok=True)
            res = subprocess.run(
                ["mariadb-install-db", "--no-defaults", "--user=root",
                 f"--datadir={self.datadir}", "--auth-root-authentication-method=normal",
                 "--skip-test-db"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False,
            )
            if res.returncode != 0:
                raise RuntimeError(f"mariadb-install-db failed ({res.returncode}) in "
                                   f"{self.datadir}:\n{res.stdout[-3000:]}")
        argv = [
            _mariadbd(), "--no-defaults", "--user=root", f"--datadir={self.datadir}",
            f"--socket={self.socket}", f"--port={self.port}", "--bind-address=127.0.0.1",
            f"--log-bin={self.datadir}/binlog", f"--server-id={self.server_id}",
            "--binlog-format=ROW", f"--log-error={self.log}",
            f"--pid-file={self.workdir}/{self.name}.pid",
            "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=48M",
            "--skip-name-resolve", "--max-connections=200",
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready()
        if self.install:
            self._set_root_password()
        return self

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                log = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"mariadbd exited: {log}")
            if os.path.exists(self.socket):
                try:
                    self._connect_socket_any().close()
                    return
                except pymysql.err.OperationalError:
                    pass
            time.sleep(0.1)
        raise TimeoutError(f"mariadbd did not start: {self.log}")

    def _connect_socket_any(self) -> pymysql.connections.Connection[Any]:
        for pw in ("", ROOT_PASSWORD):
            try:
                return pymysql.connect(unix_socket=self.socket, user="root", password=pw)
            except pymysql.err.OperationalError as exc:
                if exc.args[0] != 1045:
                    raise
        raise pymysql.err.OperationalError(1045, "access denied")

    def _set_root_password(self) -> None:
        conn = self._connect_socket_any()
        with conn.cursor() as cur:
            for host in ("localhost", "127.0.0.1"):
                cur.execute(f"CREATE USER IF NOT EXISTS root@'{host}'")
                cur.execute(f"ALTER USER root@'{host}' IDENTIFIED BY %s", (ROOT_PASSWORD,))
                cur.execute(f"GRANT ALL ON *.* TO root@'{host}' WITH GRANT OPTION")
        conn.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> MariaDBServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- use --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"mysql://root:{ROOT_PASSWORD}@127.0.0.1:{self.port}/"

    def connect(self, database: str | None = None,
                **kw: Any) -> pymysql.connections.Connection[Any]:
        return pymysql.connect(host="127.0.0.1", port=self.port, user="root",
                               password=ROOT_PASSWORD, database=database, autocommit=True, **kw)

    def sql(self, statement: str, database: str | None = None) -> list[tuple[Any, ...]]:
        conn = self.connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
                return list(cur.fetchall())
        finally:
            conn.close()

    def checksums(self, databases: list[str]) -> dict[str, Any]:
        """CHECKSUM TABLE of every base table of the given databases."""
        out: dict[str, Any] = {}
        for db in databases:
            tables = self.sql(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = "
                f"'{db}' AND table_type = 'BASE TABLE' ORDER BY table_name")
            for (t,) in tables:
                out[f"{db}.{t}"] = self.sql(f"CHECKSUM TABLE `{db}`.`{t}` EXTENDED")[0][1]
        return out


@contextmanager
def mariadb_server(prefix: str = "kw-my-", **kw: Any) -> Iterator[MariaDBServer]:
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    server = MariaDBServer(workdir, **kw)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


class WriteLoad:
    """Inserts one row per transaction into ``db.table`` until stopped; measures stalls.

    ``max_pause`` is the longest time one INSERT+COMMIT took (what a writer would feel as a
    stall); ``committed`` counts the rows the server acknowledged.
    """

    def __init__(self, server: MariaDBServer, db: str, table: str = "load",
                 interval: float = 0.002) -> None:
        self.server = server
        self.db = db
        self.table = table
        self.interval = interval
        self.max_pause = 0.0
        self.committed = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WriteLoad:
        self.server.sql(
            f"CREATE TABLE IF NOT EXISTS `{self.db}`.`{self.table}` (id BIGINT AUTO_INCREMENT "
            "PRIMARY KEY, v VARCHAR(64), t TIMESTAMP(6) DEFAULT CURRENT_TIMESTAMP(6)) "
            "ENGINE=InnoDB")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        try:
            conn = self.server.connect(self.db)
            with conn.cursor() as cur:
                while not self._stop.is_set():
                    t0 = time.monotonic()
                    cur.execute(f"INSERT INTO `{self.table}` (v) VALUES (%s)",
                                (f"row-{self.committed}",))
                    self.max_pause = max(self.max_pause, time.monotonic() - t0)
                    self.committed += 1
                    if self.interval:
                        time.sleep(self.interval)
            conn.close()
        except BaseException as exc:  # reported by the test that owns the load
            self.error = exc


def fill_sample(server: MariaDBServer, db: str, rows: int = 2000) -> None:
    """A small database with the features a logical dump must carry: routines, triggers,
    events, views, a user with grants."""
    server.sql(f"CREATE DATABASE IF NOT EXISTS `{db}`")
    stmts = [
        "CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(100), qty INT, "
        "note TEXT) ENGINE=InnoDB",
        f"INSERT INTO items SELECT seq, CONCAT('item-', seq), seq % 97, REPEAT('x', seq % 50) "
        f"FROM seq_1_to_{rows}",
        "CREATE TABLE audit (id INT AUTO_INCREMENT PRIMARY KEY, item INT, at DATETIME) "
        "ENGINE=InnoDB",
        "CREATE TRIGGER items_ai AFTER INSERT ON items FOR EACH ROW "
        "INSERT INTO audit (item, at) VALUES (NEW.id, NOW())",
        "CREATE FUNCTION double_it(x INT) RETURNS INT DETERMINISTIC RETURN x * 2",
        "CREATE PROCEDURE count_items(OUT n INT) SELECT COUNT(*) INTO n FROM items",
        "CREATE VIEW big_items AS SELECT id, name FROM items WHERE qty > 50",
        "CREATE EVENT IF NOT EXISTS nightly ON SCHEDULE EVERY 1 DAY DISABLE DO "
        "DELETE FROM audit WHERE at < NOW() - INTERVAL 30 DAY",
    ]
    for s in stmts:
        server.sql(s, db)
    server.sql("CREATE USER IF NOT EXISTS 'reporter'@'%' IDENTIFIED BY 'rep-pw'")
    server.sql(f"GRANT SELECT ON `{db}`.* TO 'reporter'@'%'")


REPO_ROOT = Path(__file__).resolve().parents[2]
_VENV_PY = REPO_ROOT / ".venv" / "bin" / "python"
PYTHON = str(_VENV_PY) if _VENV_PY.exists() else sys.executable
REPO_PASSWORD = "kw-test-repo-pw"
_CLI = (
    "import sys\n"
    "try:\n"
    "    from keepwell.cli.main import run\n"
    "except ImportError:\n"
    "    from keepwell.cli.mysql import main\n"
    "    sys.argv = ['keepwell'] + sys.argv[2:]\n"
    "    run = main\n"
    "sys.exit(run())\n"
)


class KeepwellRepo:
    """A repository in a temporary directory and the ``keepwell mysql`` CLI run against it."""

    def __init__(self, workdir: Path) -> None:
        from keepwell.backends.registry import open_backend
        from keepwell.crypto import KdfParams
        from keepwell.repository import Repository

        self.workdir = workdir
        self.path = workdir / "repo"
        weak = KdfParams(time_cost=1, memory_kib=8, parallelism=1)  # fast tests
        Repository.init(open_backend(str(self.path)), REPO_PASSWORD, kdf=weak).close()

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MYSQL_", "KEEPWELL_"))}
        env.update(KEEPWELL_REPOSITORY=str(self.path), KEEPWELL_PASSWORD=REPO_PASSWORD,
                   KEEPWELL_TESTONLY_WEAK_KDF="1", HOME=str(self.workdir),
                   PYTHONPATH=str(REPO_ROOT / "src"))
        return env

    def argv(self, *args: str) -> list[str]:
        return [PYTHON, "-c", _CLI, "mysql", *args]

    def run(self, *args: str, check: bool = True, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(self.argv(*args), env=env or self.env(), capture_output=True,
                             text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"keepwell mysql {' '.join(args)} failed ({res.returncode}):\n"
                                 f"{res.stdout}\n{res.stderr}")
        return res

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def open(self) -> Any:
        from keepwell.repository import open_repository

        return open_repository(str(self.path), REPO_PASSWORD)


def rows(server: MariaDBServer, sql: str, database: str | None = None) -> list[Any]:
    return [r[0] if len(r) == 1 else r for r in server.sql(sql, database)]
