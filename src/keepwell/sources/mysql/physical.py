"""Physical backups: ``mariabackup --backup --stream=xbstream`` stored through the chunker.

The stream is stored as one file (``backup.xbstream``); content-defined chunking finds what
did not change since the last backup, so every backup is a full one that stores only changes.
mariabackup reports the binlog position and GTID it is consistent at on its standard error
("MySQL binlog position: filename '...', position '...', GTID of the last change '...'"); that
is recorded in the snapshot, which is what makes the backup a base for point-in-time restore.

mariabackup reads the data files directly, so it runs on the database host, as a user that can
read the datadir.
"""

from __future__ import annotations

import re
import tempfile
import time
from typing import Any

from keepwell.errors import SourceError
from keepwell.sources.mysql import KIND_PHYSICAL
from keepwell.sources.mysql.connection import ConnectionSettings, connect, server_info
from keepwell.sources.mysql.tools import ReadAhead, ToolProcess, find_tool

_POSITION = re.compile(r"binlog position: filename '([^']+)', position '(\d+)'"
                       r"(?:, GTID of the last change '([^']*)')?")


def parse_binlog_position(log: str) -> tuple[str | None, int | None, str | None]:
    found = list(_POSITION.finditer(log))
    if not found:
        return None, None, None
    m = found[-1]
    return m.group(1), int(m.group(2)), (m.group(3) or None)


def physical_backup(repo: Any, settings: ConnectionSettings, *, host: str | None = None,
                    tags: tuple[str, ...] = (), parallel: int = 2,
                    extra_args: tuple[str, ...] = ()) -> Any:
    """Stream mariabackup into a ``mysql-physical`` snapshot; return the snapshot."""
    conn = connect(settings)
    try:
        info = server_info(conn)
    finally:
        conn.close()
    started = time.time()
    with settings.option_file() as opt, tempfile.TemporaryDirectory(prefix="keepwell-mb-") as tmp:
        argv = [find_tool("backup"), f"--defaults-file={opt}", "--backup", "--stream=xbstream",
                f"--target-dir={tmp}", f"--parallel={parallel}", *extra_args]
        if info.datadir:
            argv.append(f"--datadir={info.datadir}")
        proc = ToolProcess(argv, what="mariabackup")
        try:
            with repo.new_snapshot(KIND_PHYSICAL, ["backup.xbstream"],
                                   host=host or info.hostname, tags=tags) as w:
                ahead = ReadAhead(proc.stdout)
                try:
                    size = w.add_stream("backup.xbstream", ahead)  # type: ignore[arg-type]
                finally:
                    ahead.close()
                log = proc.finish()
                if "completed OK!" not in log:
                    raise SourceError("mariabackup ended without 'completed OK!' (backup "
                                      "incomplete)")
                file, pos, gtid = parse_binlog_position(log)
                if info.log_bin and (file is None or pos is None):
                    raise SourceError("mariabackup did not report the binlog position")
                w.source.update({
                    "type": "physical",
                    "server": info.identity(),
                    "version": info.version,
                    "datadir": info.datadir,
                    "binlog_file": file,
                    "binlog_pos": pos,
                    "gtid": gtid,
                    "start_time": started,
                    "stop_time": time.time(),
                    "stream_bytes": size,
                })
                return w.commit()
        finally:
            proc.kill()
