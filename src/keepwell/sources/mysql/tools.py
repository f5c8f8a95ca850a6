"""The native programs keepwell drives, found by their MariaDB or MySQL names.

A *role* is what a program is for (``dump``, ``client``, ``binlog``, ``backup``, ``extract``,
``server``, ``install``); a *flavor* is whose program it is, ``mariadb`` or ``mysql``. The two
families share names: Debian's MariaDB installs ``mysqldump`` as a link to ``mariadb-dump``, and
MySQL's ``mysqldump`` takes other options and writes other comments. So `find` looks a program
up by name and then asks it who it is (`identify`: where its link points, then its
``--version``), and only returns a program of the server's flavor for the roles where the two
differ (`STRICT`); the ``client`` only has to speak the protocol, so any flavor serves.

Names are tried in order, MariaDB's first for a MariaDB server (``mariadb-dump``, then
``mysqldump``), MySQL's for MySQL (``mysqldump``, ``mysqlbinlog``, ``xtrabackup``,
``xbstream``), in ``KEEPWELL_MYSQL_BINDIR`` first, then on ``PATH`` and in the sbin directories.

The programs run through keepwell's one runner (`keepwell.sources.tools.ToolProcess`).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from keepwell.errors import SourceError

MARIADB = "mariadb"
MYSQL = "mysql"
FLAVORS = (MARIADB, MYSQL)
NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "dump": {MARIADB: ("mariadb-dump", "mysqldump"), MYSQL: ("mysqldump",)},
    "client": {MARIADB: ("mariadb", "mysql"), MYSQL: ("mysql", "mariadb")},
    "binlog": {MARIADB: ("mariadb-binlog", "mysqlbinlog"), MYSQL: ("mysqlbinlog",)},
    "backup": {MARIADB: ("mariabackup", "mariadb-backup"), MYSQL: ("xtrabackup",)},
    "extract": {MARIADB: ("mbstream",), MYSQL: ("xbstream",)},
    "server": {MARIADB: ("mariadbd", "mysqld"), MYSQL: ("mysqld",)},
    # MySQL 8 initialises a datadir with ``mysqld --initialize-insecure``
    "install": {MARIADB: ("mariadb-install-db", "mysql_install_db"), MYSQL: ("mysqld",)},
}
# roles whose programs must be of the server's own flavor: their options, output and the files
# they read differ between MariaDB and MySQL
STRICT = frozenset({"dump", "binlog", "backup", "extract", "server", "install"})
# programs that do not know --version and would start working instead (mariadb-install-db
# would initialise the default datadir): told apart by name only
NO_VERSION = frozenset({"mariadb-install-db", "mysql_install_db", "mbstream"})
PACKAGES = {
    MARIADB: {"dump": "mariadb-client", "client": "mariadb-client", "binlog": "mariadb-client",
              "backup": "mariadb-backup", "extract": "mariadb-backup",
              "server": "mariadb-server", "install": "mariadb-server"},
    MYSQL: {"dump": "MySQL's client programs", "client": "MySQL's client programs",
            "binlog": "MySQL's client programs",
            "backup": "Percona XtraBackup of the server's version",
            "extract": "Percona XtraBackup of the server's version",
            "server": "MySQL's server", "install": "MySQL's server"},
}
# names that tell the flavor by themselves (after following links)
_OWN_NAMES = {"mariadb": MARIADB, "mariabackup": MARIADB, "mbstream": MARIADB,
              "xtrabackup": MYSQL, "xbstream": MYSQL}
_VERSION = re.compile(r"\b(?:ver|version|distrib)\s+(\d+)\.(\d+)(?:\.(\d+))?", re.I)
_SERVER_VERSION = re.compile(r"\b(?:distrib|based on mysql server|server)\s+(\d+)\.(\d+)"
                             r"(?:\.(\d+))?", re.I)


@dataclass(frozen=True)
class Tool:
    """One program found for a role: its path, whose it is, and the version it reports."""

    path: str
    flavor: str | None  # None: it did not say
    version: tuple[int, ...]

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def flavor_of_version_text(text: str) -> tuple[str | None, tuple[int, ...]]:
    """Whose program printed this ``--version`` text, and the server version it belongs to.

    MariaDB's say so (``Distrib 10.11.6-MariaDB``, ``based on MariaDB server``); MySQL 8's
    report the server version (``Ver 8.0.35 for Linux ... (MySQL Community Server - GPL)``),
    XtraBackup says ``xtrabackup version 8.0.35-30 based on MySQL server 8.0.35``; MySQL 5.7's
    say ``Ver 10.13 Distrib 5.7.44``.
    """
    low = text.lower()
    m = _SERVER_VERSION.search(text)
    version = tuple(int(g) for g in m.groups() if g is not None) if m else ()
    if not version:
        m = _VERSION.search(text)
        version = tuple(int(g) for g in m.groups() if g is not None) if m else ()
    if "mariadb" in low:
        return MARIADB, version
    if any(w in low for w in ("mysql community", "mysql enterprise", "percona",
                              "xtrabackup version", "based on mysql server")):
        return MYSQL, version
    if version and version[0] in (5, 8, 9):
        return MYSQL, version
    return None, version


@functools.lru_cache(maxsize=64)
def _identify(path: str, _mtime_ns: int) -> Tool:
    real = os.path.basename(os.path.realpath(path))
    own = next((f for prefix, f in _OWN_NAMES.items() if real.startswith(prefix)), None)
    if own is not None or real in NO_VERSION or os.path.basename(path) in NO_VERSION:
        # its own name says whose it is (the version is only needed of MySQL's mysqldump):
        # no program run
        return Tool(path, own, ())
    try:
        res = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL,
                             capture_output=True, timeout=30, check=False)
        text = (res.stdout + res.stderr).decode("utf-8", "replace")
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    said, version = flavor_of_version_text(text)
    return Tool(path, own or said, version)


def identify(path: str) -> Tool:
    """Which flavor a program is, by where its link points and what ``--version`` says."""
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        mtime = 0
    return _identify(path, mtime)


def search_dirs() -> list[str]:
    dirs = [d for d in (os.environ.get("KEEPWELL_MYSQL_BINDIR"),) if d]
    dirs += [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d]
    dirs += ["/usr/sbin", "/usr/local/sbin", "/usr/local/mysql/bin"]
    seen: list[str] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def _candidates(name: str, dirs: Sequence[str]) -> list[str]:
    out = []
    for d in dirs:
        path = os.path.join(d, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            out.append(path)
    return out


def find(role: str, flavor: str | None = None, *, dirs: Sequence[str] | None = None) -> Tool:
    """The program for ``role``; of ``flavor`` where the role needs it (see `STRICT`)."""
    want = flavor if flavor in FLAVORS else MARIADB
    order = NAMES[role][want] + tuple(n for f in FLAVORS if f != want for n in NAMES[role][f])
    where = list(dirs) if dirs is not None else search_dirs()
    wrong: Tool | None = None
    fallback: Tool | None = None
    for name in dict.fromkeys(order):
        for path in _candidates(name, where):
            tool = identify(path)
            if flavor is None or tool.flavor == flavor:
                return tool
            if tool.flavor is None and name in NAMES[role][want]:
                return tool  # it does not say whose it is: its name must do
            if role in STRICT:
                wrong = wrong or tool
            else:
                fallback = fallback or tool
    if fallback is not None:
        return fallback
    wanted = NAMES[role][want][0]
    package = PACKAGES[want][role]
    if wrong is not None:
        other = "MariaDB's" if wrong.flavor == MARIADB else "MySQL's"
        server = "MariaDB" if want == MARIADB else "MySQL"
        raise SourceError(f"{wrong.path} is {other} and cannot serve a {server} server "
                          f"(it needs {wanted} of its own kind)",
                          hint=f"install {package} (or set KEEPWELL_MYSQL_BINDIR to its "
                               "directory)")
    raise SourceError(f"{wanted} is not installed",
                      hint=f"install {package} (or set KEEPWELL_MYSQL_BINDIR)")


def find_tool(role: str, flavor: str | None = None) -> str:
    """The path of the program for ``role`` (see `find`)."""
    return find(role, flavor).path
