"""Connection settings for a MySQL/MariaDB server, resolved the way the native clients do.

`ConnectionSettings` comes from, highest priority first: ``--db-url`` (``mysql://user:pw@host:port/``
or ``mysql://user@localhost/?socket=/path``), the option file (``--defaults-file``, else
``~/.my.cnf``; groups ``[client]`` and ``[client-mariadb]``), the environment (``MYSQL_HOST``,
``MYSQL_TCP_PORT``, ``MYSQL_UNIX_PORT``, ``MYSQL_PWD``, ``USER``), then the defaults (local socket).

Native tools never see the password on their command line: `ConnectionSettings.option_file`
writes a private ``[client]`` file that they read with ``--defaults-file``. `connect` opens a
PyMySQL session (an optional dependency: ``pip install keepwell[mysql]``).
"""

from __future__ import annotations

import configparser
import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from keepwell.errors import SourceError, UsageError

DEFAULT_SOCKETS = ("/run/mysqld/mysqld.sock", "/var/run/mysqld/mysqld.sock", "/tmp/mysql.sock")
OPTION_GROUPS = ("client", "client-server", "client-mariadb", "mysql")


@dataclass(frozen=True)
class ConnectionSettings:
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: str | None = None
    socket: str | None = None

    @property
    def uses_socket(self) -> bool:
        return self.socket is not None and self.host in (None, "localhost")

    def describe(self) -> str:
        where = (self.socket if self.uses_socket
                 else f"{self.host or 'localhost'}:{self.port or 3306}")
        return f"{self.user or '?'}@{where}"

    def option_lines(self) -> list[str]:
        lines = ["[client]"]
        if self.uses_socket:
            lines += ["host=localhost", f"socket={self.socket}"]
        else:
            lines.append(f"host={self.host or '127.0.0.1'}")
            if self.port:
                lines.append(f"port={self.port}")
            lines.append("protocol=TCP")
        if self.user:
            lines.append(f"user={self.user}")
        if self.password is not None:
            escaped = self.password.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'password="{escaped}"')
        return lines

    @contextlib.contextmanager
    def option_file(self) -> Iterator[str]:
        """A private option file for the native tools (``--defaults-file=PATH``)."""
        fd, path = tempfile.mkstemp(prefix="keepwell-my-", suffix=".cnf")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("\n".join(self.option_lines()) + "\n")
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)


def parse_url(url: str) -> ConnectionSettings:
    parts = urlsplit(url)
    if parts.scheme not in ("mysql", "mariadb"):
        raise UsageError(f"--db-url must start with mysql:// or mariadb://, not {parts.scheme}://")
    query = parse_qs(parts.query)
    socket = query.get("socket", query.get("unix_socket", [None]))[0]
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"bad port in --db-url {_redact(url)}") from None
    return ConnectionSettings(
        host=unquote(parts.hostname) if parts.hostname else None,
        port=port,
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        socket=socket,
    )


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def read_option_file(path: str) -> dict[str, str]:
    """The client settings of a MySQL option file (later groups override earlier ones)."""
    parser = configparser.ConfigParser(allow_no_value=True, strict=False, interpolation=None,
                                       comment_prefixes=("#", ";"), inline_comment_prefixes=None)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read option file {path}: {exc.strerror}") from None
    # !include / !includedir lines are directives of the native parser, not options
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("!"))
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        raise UsageError(f"cannot parse option file {path}: {exc}") from None
    out: dict[str, str] = {}
    for group in OPTION_GROUPS:
        if parser.has_section(group):
            for k, v in parser.items(group):
                value = (v or "").strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                    value = value[1:-1]
                out[k.replace("_", "-")] = value
    return out


def resolve(db_url: str | None = None, defaults_file: str | None = None,
            env: dict[str, str] | None = None) -> ConnectionSettings:
    env = dict(os.environ if env is None else env)
    s = ConnectionSettings(
        host=env.get("MYSQL_HOST") or None,
        port=int(env["MYSQL_TCP_PORT"]) if env.get("MYSQL_TCP_PORT", "").isdigit() else None,
        user=env.get("USER") or None,
        password=env.get("MYSQL_PWD"),
        socket=env.get("MYSQL_UNIX_PORT") or None,
    )
    path = defaults_file
    if path is None:
        home = env.get("HOME") or os.path.expanduser("~")
        candidate = os.path.join(home, ".my.cnf")
        path = candidate if os.path.exists(candidate) else None
    if path is not None:
        opts = read_option_file(path)
        s = replace(
            s,
            host=opts.get("host", s.host),
            port=int(opts["port"]) if opts.get("port", "").isdigit() else s.port,
            user=opts.get("user", s.user),
            password=opts.get("password", s.password),
            socket=opts.get("socket", s.socket),
        )
    if db_url:
        u = parse_url(db_url)
        s = ConnectionSettings(
            host=u.host or ("localhost" if u.socket else s.host),
            port=u.port,
            user=u.user or s.user,
            password=u.password if u.password is not None else s.password,
            socket=u.socket,
        )
    if s.host in (None, "localhost") and s.socket is None and s.port is None:
        s = replace(s, socket=next((p for p in DEFAULT_SOCKETS if os.path.exists(p)),
                                   DEFAULT_SOCKETS[0]))
    if s.host is None and s.socket is None:
        s = replace(s, host="localhost")
    return s


def connect(settings: ConnectionSettings, database: str | None = None) -> Any:
    """A PyMySQL session (autocommit) or a one-line `SourceError`."""
    try:
        import pymysql
    except ImportError:
        raise SourceError("the MySQL driver is not installed",
                          hint="pip install 'keepwell[mysql]'") from None
    kw: dict[str, Any] = {"user": settings.user or "root", "password": settings.password or "",
                          "autocommit": True, "connect_timeout": 10, "database": database}
    if settings.uses_socket:
        kw["unix_socket"] = settings.socket
    else:
        kw["host"] = settings.host or "127.0.0.1"
        kw["port"] = settings.port or 3306
    try:
        return pymysql.connect(**kw)
    except pymysql.err.MySQLError as exc:
        msg = exc.args[1] if len(exc.args) > 1 else str(exc)
        raise SourceError(f"cannot connect to MySQL/MariaDB at {settings.describe()}: {msg}",
                          hint="check --db-url, --defaults-file or MYSQL_* variables") from None


def query(conn: Any, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    import pymysql

    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())
    except pymysql.err.MySQLError as exc:
        msg = exc.args[1] if len(exc.args) > 1 else str(exc)
        raise SourceError(f"query failed ({sql.split()[0]} ...): {msg}") from None


@dataclass(frozen=True)
class ServerInfo:
    """Who the server is: what the identity checks and the catalog record.

    ``initialized`` is when the server's data directory was initialised: the oldest creation
    time of the tables of its ``mysql`` schema (UTC, ISO 8601). Aria/MyISAM keep that time in
    the table files themselves, so it survives copies, moves and restarts, and differs between
    two installations; None when the account cannot see those tables.
    """

    version: str
    flavor: str  # "mariadb" or "mysql"
    server_id: int
    server_uuid: str | None
    log_bin: bool
    binlog_basename: str | None
    datadir: str
    hostname: str
    gtid_pos: str
    initialized: str | None = None

    def identity(self) -> dict[str, Any]:
        """What is recorded with every snapshot (see `keepwell.sources.mysql.identity`)."""
        return {"server_id": self.server_id, "server_uuid": self.server_uuid,
                "flavor": self.flavor, "initialized": self.initialized,
                "hostname": self.hostname, "datadir": self.datadir}


def _initialized(conn: Any) -> str | None:
    """The oldest creation time of the ``mysql`` schema's tables, read in UTC."""
    query(conn, "SET @keepwell_tz = @@session.time_zone, time_zone = '+00:00'")
    try:
        rows = query(conn, "SELECT DATE_FORMAT(MIN(create_time), '%Y-%m-%dT%H:%i:%sZ') FROM "
                           "information_schema.tables WHERE table_schema = 'mysql' "
                           "AND create_time IS NOT NULL")
    finally:
        query(conn, "SET time_zone = @keepwell_tz")
    return str(rows[0][0]) if rows and rows[0][0] else None


def server_info(conn: Any) -> ServerInfo:
    (version,) = query(conn, "SELECT VERSION()")[0]
    flavor = "mariadb" if "mariadb" in str(version).lower() else "mysql"
    variables = dict(query(conn, "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('server_id', "
                                 "'server_uuid', 'log_bin', 'log_bin_basename', 'datadir', "
                                 "'hostname', 'gtid_binlog_pos', 'gtid_executed')"))
    return ServerInfo(
        version=str(version),
        flavor=flavor,
        server_id=int(variables.get("server_id", 0)),
        server_uuid=variables.get("server_uuid") or None,
        log_bin=str(variables.get("log_bin", "OFF")).upper() == "ON",
        binlog_basename=variables.get("log_bin_basename") or None,
        datadir=str(variables.get("datadir", "")),
        hostname=str(variables.get("hostname", "")),
        gtid_pos=str(variables.get("gtid_binlog_pos", variables.get("gtid_executed", "")) or ""),
        initialized=_initialized(conn),
    )


def binlog_list(conn: Any) -> list[tuple[str, int]]:
    """The server's binary logs, oldest first, with their sizes (``SHOW BINARY LOGS``)."""
    return [(str(r[0]), int(r[1])) for r in query(conn, "SHOW BINARY LOGS")]
