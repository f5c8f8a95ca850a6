"""Physical backups: ``mariabackup --backup --stream=xbstream`` (``xtrabackup`` for MySQL) stored
through the chunker.

The stream is stored as one file (``backup.xbstream``); content-defined chunking finds what
did not change since the last backup, so every backup is a full one that stores only changes.
The binlog position and GTID the copy is consistent at are read from the ``binlog_pos`` line of
the info file the tool writes to ``--extra-lsndir`` (``xtrabackup_info``, or
``mariadb_backup_info`` in newer MariaDB), else from its log ("MySQL binlog position: filename
'...', position '...', GTID of the last change '...'"), and recorded in the snapshot: that is
what makes the backup a base for point-in-time restore. MariaDB's GTID is a position per domain
(``0-1-5``), MySQL's a set of intervals per server UUID (``uuid:1-5``), kept on one line.

mariabackup reads the data files directly, so it runs on the database host, as a user that can
read the datadir.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from keepwell.errors import SourceError
from keepwell.sources.mysql import KIND_PHYSICAL
from keepwell.sources.mysql.admission import admit
from keepwell.sources.mysql.binlog import normalize_gtid_set
from keepwell.sources.mysql.catalog import load_archive
from keepwell.sources.mysql.connection import (
    ConnectionSettings,
    ServerInfo,
    binlog_list,
    connect,
    server_info,
)
from keepwell.sources.mysql.tools import find
from keepwell.sources.streams import ReadAhead
from keepwell.sources.tools import ToolProcess

_POSITION = re.compile(r"binlog position: filename '([^']+)', position '(\d+)'"
                       r"(?:, GTID of the last change '([^']*)')?")
_INFO_POSITION = re.compile(r"^binlog_pos = filename '([^']+)', position '(\d+)'"
                            r"(?:, GTID of the last change '([^']*)')?", re.M)
# what the backup tools write beside the data: mariabackup 10.x and XtraBackup call them
# xtrabackup_*, newer mariabackup releases mariadb_backup_*
INFO_FILES = ("mariadb_backup_info", "xtrabackup_info")
BINLOG_INFO_FILES = ("mariadb_backup_binlog_info", "xtrabackup_binlog_info")

Position = tuple[str | None, int | None, str | None]


def _position(m: re.Match[str] | None) -> Position:
    if m is None:
        return None, None, None
    return m.group(1), int(m.group(2)), normalize_gtid_set(m.group(3) or "")


def parse_binlog_position(log: str) -> Position:
    """The last "binlog position: filename '..', position '..'[, GTID of the last change '..']"
    line of a backup tool's log (the GTID set of XtraBackup may run over several lines)."""
    found = list(_POSITION.finditer(log))
    return _position(found[-1] if found else None)


def parse_info(text: str) -> Position:
    """The ``binlog_pos = ...`` line of ``xtrabackup_info``/``mariadb_backup_info``."""
    return _position(_INFO_POSITION.search(text))


def parse_binlog_info(text: str) -> Position:
    """``xtrabackup_binlog_info``/``mariadb_backup_binlog_info``: FILE, tab, POSITION, and a
    tab and the GTID position (MariaDB ``0-1-5``) or set (MySQL ``uuid:1-5``, which may go on
    over several lines) when the server has GTIDs."""
    fields = text.strip().split("\t", 2)
    if len(fields) < 2 or not fields[1].strip().isdigit():
        return None, None, None
    gtid = normalize_gtid_set(fields[2]) if len(fields) == 3 else None
    return fields[0].strip(), int(fields[1]), gtid


def read_backup_position(directory: str) -> Position:
    """The binlog position a backup directory (extracted or ``--extra-lsndir``) records."""
    for name, parse in ((n, parse_binlog_info) for n in BINLOG_INFO_FILES):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            found = parse(Path(path).read_text(errors="replace"))
            if found[0] is not None:
                return found
    for name in INFO_FILES:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            found = parse_info(Path(path).read_text(errors="replace"))
            if found[0] is not None:
                return found
    return None, None, None


def physical_backup(repo: Any, settings: ConnectionSettings, *, host: str | None = None,
                    tags: tuple[str, ...] = (), parallel: int = 1,
                    extra_args: tuple[str, ...] = (), new_server: bool = False) -> Any:
    """Stream mariabackup into a ``mysql-physical`` snapshot; return the snapshot.

    ``parallel`` above 1 copies several files at once, and their pieces interleave in the
    stream in a different order every time: an unchanged server then re-stores about a tenth
    of its size, against nothing with one copy thread (measured on MariaDB 10.11). The copy
    is rarely what limits the backup, so one thread is the default.
    """
    run = begin_physical(settings, parallel=parallel, extra_args=extra_args)
    try:
        return run.store(repo, host=host, tags=tags, new_server=new_server)
    finally:
        run.close()


def begin_physical(settings: ConnectionSettings, *, parallel: int = 1,
                   extra_args: tuple[str, ...] = ()) -> PhysicalRun:
    """Start the backup tool before any repository is open (see `PhysicalRun`)."""
    conn = connect(settings)
    try:
        info = server_info(conn)
        binlogs = binlog_list(conn) if info.log_bin else []
    finally:
        conn.close()
    return PhysicalRun(settings, info, parallel, extra_args, binlogs)


class PhysicalRun:
    """The backup tool running, its stream read ahead (bounded) while keepwell opens the
    repository; `store` makes the snapshot, `close` ends the tool and removes its files."""

    def __init__(self, settings: ConnectionSettings, info: ServerInfo, parallel: int,
                 extra_args: tuple[str, ...], binlogs: list[tuple[str, int]] | None = None
                 ) -> None:
        self.info = info
        self.binlogs = binlogs or []
        self.notes: list[str] = []
        self.started = time.time()
        self._stack = contextlib.ExitStack()
        try:
            opt = self._stack.enter_context(settings.option_file())
            tmp = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="keepwell-mb-"))
            self.tool = find("backup", info.flavor)
            self.lsndir = os.path.join(tmp, "lsn")
            argv = [self.tool.path, f"--defaults-file={opt}", "--backup", "--stream=xbstream",
                    f"--target-dir={tmp}", f"--extra-lsndir={self.lsndir}",
                    f"--parallel={parallel}", *extra_args]
            if info.datadir:
                argv.append(f"--datadir={info.datadir}")
            self.proc = ToolProcess(argv, what=self.tool.name)
            self._stack.callback(self.proc.kill)
            self.ahead = ReadAhead(self.proc.stdout)
            self._stack.callback(self.ahead.close)
        except BaseException:
            self._stack.close()
            raise

    def close(self) -> None:
        self._stack.close()

    def store(self, repo: Any, *, host: str | None = None, tags: tuple[str, ...] = (),
              new_server: bool = False) -> Any:
        """Store the stream; refused (`admission.admit`) when the name holds another
        server's history."""
        info, name = self.info, self.tool.name
        server = host or info.hostname
        adm = admit(load_archive(repo, server), info, server, self.binlogs,
                    new_server=new_server)
        self.notes = list(adm.notes)
        with repo.new_snapshot(KIND_PHYSICAL, ["backup.xbstream"], host=server, tags=tags) as w:
            try:
                size = w.add_stream("backup.xbstream", self.ahead)  # type: ignore[arg-type]
            finally:
                self.ahead.close()
            log = self.proc.finish()
            if "completed OK!" not in log:
                raise SourceError(f"{name} ended without 'completed OK!' (backup incomplete)")
            file, pos, gtid = read_backup_position(self.lsndir)
            if file is None:
                file, pos, gtid = parse_binlog_position(log)
            if info.log_bin and (file is None or pos is None):
                raise SourceError(f"{name} did not report the binlog position")
            w.source.update({
                "type": "physical",
                **adm.source(info),
                "version": info.version,
                "datadir": info.datadir,
                "binlog_file": file,
                "binlog_pos": pos,
                "gtid": gtid,
                "start_time": self.started,
                "stop_time": time.time(),
                "stream_bytes": size,
            })
            return w.commit()
