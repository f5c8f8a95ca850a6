"""Binlog archiving: pushing closed files from the datadir, or streaming them from the server.

Every stored binlog lives in a ``mysql-binlog`` snapshot as ``binlog/<name>``; its ``source``
records the server identity and history (`admission.Admission`), the moment up to which the
archive holds every event (``synced_at``: for a stream, the newest moment at which the server's
binary log ended at a position the spool has reached; the time of the copy for a push of the
current file; when the first file not stored began for a push of closed files) and a summary
of each file (size, closed, head, first/last event time, GTID range) from `binlog.scan`. Closed
files are stored in batches; the growing current file is stored again each time it grows (only
new chunks are uploaded). Only complete events are stored: a torn last event is left for the
next round.

`push_binlogs` reads the files from the server's binlog directory (for setups without a
replication user). `BinlogStreamer` runs ``mariadb-binlog --read-from-remote-server --raw
--stop-never`` into a spool directory and stores what arrives; when the connection drops it
reconnects from the newest file, and because files are stored whole, by name, a reconnect can
neither skip nor repeat an event. A binlog that the server purged before it was archived is a
*gap*: reported (`StreamEvents.gap`) and visible to ``check``, never glossed over.

Both are admitted first (`admission.admit`): binlogs of another server, or of a binary log that
no longer continues the archived one, are refused unless ``--new-server`` starts a new history.
A streamed file whose head differs from the archived file of the same name stops the stream.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keepwell.errors import SourceError
from keepwell.sources.mysql import KIND_BINLOG
from keepwell.sources.mysql.admission import Admission, admit
from keepwell.sources.mysql.binlog import (
    BinlogHead,
    BinlogScan,
    binlog_seq,
    read_head,
    scan_path,
    split_name,
)
from keepwell.sources.mysql.catalog import Catalog, load_archive
from keepwell.sources.mysql.connection import (
    ConnectionSettings,
    ServerInfo,
    binlog_list,
    connect,
    query,
    server_info,
)
from keepwell.sources.mysql.tools import MYSQL, find
from keepwell.sources.tools import failure_line

BATCH_BYTES = 1 << 30


class LimitedReader:
    """Reads a file up to a byte limit (the end of its last complete event)."""

    def __init__(self, path: str, limit: int) -> None:
        self.f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.left = limit

    def readinto(self, b: memoryview | bytearray) -> int:
        view = memoryview(b)[: self.left]
        n = self.f.readinto(view) if len(view) else 0
        self.left -= n or 0
        return n or 0

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.f.close()


def store_files(repo: Any, info: ServerInfo, admission: Admission, host: str,
                items: list[tuple[str, BinlogScan]], *, synced_at: float,
                tags: tuple[str, ...] = (), final: frozenset[str] = frozenset()) -> Any:
    """Store binlog files (path, scan) as one snapshot; returns it. ``synced_at``: every event
    the server wrote before it is archived once this snapshot is."""
    with repo.new_snapshot(KIND_BINLOG, ["binlog"], host=host, tags=tags) as w:
        summaries = []
        for path, s in items:
            reader = LimitedReader(path, s.end)
            try:
                w.add_stream(f"binlog/{s.name}", reader)  # type: ignore[arg-type]
            finally:
                reader.close()
            summary = s.summary()
            summary["final"] = s.closed or s.name in final
            summaries.append(summary)
        w.source.update({"type": "binlog", **admission.source(info), "synced_at": synced_at,
                         "files": summaries})
        return w.commit()


@dataclass
class PushResult:
    stored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    gaps: list[dict[str, Any]] = field(default_factory=list)
    history: int = 0
    notes: list[str] = field(default_factory=list)


def push_binlogs(repo: Any, settings: ConnectionSettings, *, binlog_dir: str | None = None,
                 include_current: bool = False, host: str | None = None,
                 flush: bool = False, new_server: bool = False) -> PushResult:
    """Store the closed binlogs of the server's binlog directory not archived yet."""
    conn = connect(settings)
    try:
        info = server_info(conn)
        if not info.log_bin:
            raise SourceError("the server does not write a binary log",
                              hint="set log_bin (see docs/mysql.md)")
        if flush:
            query(conn, "FLUSH BINARY LOGS")
        names = binlog_list(conn)
    finally:
        conn.close()
    host = host or info.hostname
    directory = binlog_dir or os.path.dirname(info.binlog_basename or "") or info.datadir
    for name, _size in names:
        if not os.path.exists(os.path.join(directory, name)):
            raise SourceError(f"binlog {name} is not in {directory}",
                              hint="pass --binlog-dir, or run binlog-push on the database host")

    def head(name: str) -> BinlogHead:
        return read_head(os.path.join(directory, name))

    archive = load_archive(repo, host)
    adm = admit(archive, info, host, names, heads=head, new_server=new_server)
    cat = archive.history(adm.history, info.identity())
    result = PushResult(history=adm.history, notes=list(adm.notes))
    todo: list[tuple[str, BinlogScan]] = []
    # a file the server has moved on from is final as it is on disk, rotate event or not
    finals = frozenset(name for name, _ in names[:-1])
    # everything written before the first file not stored began is archived with this push;
    # a file is read after this moment, so it holds at least what was written before it
    synced_at = time.time() if include_current else float(
        head(names[-1][0]).created or time.time())
    batch = 0
    for i, (name, _size) in enumerate(names):
        current = i == len(names) - 1
        if current and not include_current:
            continue
        have = cat.files.get(name)
        path = os.path.join(directory, name)
        if have is not None and have.final:
            result.skipped.append(name)
            continue
        s = scan_path(path, name)
        if have is not None and have.size >= s.end and (have.final or name not in finals):
            result.skipped.append(name)
            continue
        todo.append((path, s))
        batch += s.end
        if batch >= BATCH_BYTES:
            store_files(repo, info, adm, host, todo, synced_at=synced_at, final=finals)
            result.stored += [x[1].name for x in todo]
            todo, batch = [], 0
    if todo:
        store_files(repo, info, adm, host, todo, synced_at=synced_at, final=finals)
        result.stored += [x[1].name for x in todo]
    result.gaps = load_archive(repo, host).history(adm.history, info.identity()).gaps()
    return result


@dataclass
class StreamEvents:
    """Callbacks of a running stream (the CLI renders them)."""

    stored: Callable[[list[str]], None] = lambda names: None
    reconnect: Callable[[str], None] = lambda reason: None
    gap: Callable[[list[str]], None] = lambda missing: None
    note: Callable[[str], None] = lambda text: None


class BinlogStreamer:
    """Follow a server's binlog over the replication protocol and archive it."""

    def __init__(self, repo: Any, settings: ConnectionSettings, spool_dir: str, *,
                 host: str | None = None, interval: float = 10.0,
                 client_server_id: int = 65535, events: StreamEvents | None = None,
                 retry_delay: float = 1.0, new_server: bool = False) -> None:
        self.repo = repo
        self.settings = settings
        self.spool = spool_dir
        self.host_name = host
        self.interval = interval
        self.client_server_id = client_server_id
        self.events = events or StreamEvents()
        self.retry_delay = retry_delay
        self.stop_event = threading.Event()
        self.stored_sizes: dict[str, int] = {}
        self.closed: set[str] = set()
        self.new_server = new_server
        self.info: ServerInfo | None = None
        self.admission = Admission(0)
        self.heads: dict[str, BinlogHead] = {}  # of the files archived in this history
        self.host = ""
        self.reconnects = 0
        self.gaps: list[list[str]] = []
        self.session_start: int | None = None
        # synced_at: the newest moment whose server position the archive has reached (None
        # until one is, in a history with no synced moment archived yet); marks: (moment,
        # file number, offset) asked of the server at a sync and not reached by the spool yet
        self.synced_at: float | None = None
        self.marks: list[tuple[float, int, int]] = []
        self.conn: Any = None

    def stop(self) -> None:
        self.stop_event.set()

    # -- where to start -------------------------------------------------------------------------
    def _identify(self) -> tuple[ServerInfo, list[tuple[str, int]]]:
        conn = connect(self.settings)
        try:
            info = server_info(conn)
            if not info.log_bin:
                raise SourceError("the server does not write a binary log",
                                  hint="set log_bin (see docs/mysql.md)")
            return info, binlog_list(conn)
        finally:
            conn.close()

    def _start_file(self, on_server: list[tuple[str, int]], cat: Catalog) -> str:
        names = [n for n, _ in on_server]
        if not names:
            raise SourceError("the server lists no binary logs")
        for f in cat.files.values():
            self.heads[f.name] = f.head
            self.stored_sizes[f.name] = max(self.stored_sizes.get(f.name, 0), f.size)
            if f.final:
                self.closed.add(f.name)
        last = cat.last()
        local = self._spool_files()
        newest_local = local[-1] if local else None
        if newest_local and (last is None or binlog_seq(newest_local) >= last.seq):
            wanted = newest_local
        elif last is None:
            return names[0]
        elif last.final:
            base, _ = split_name(last.name)
            width = len(last.name) - len(base) - 1
            wanted = f"{base}.{last.seq + 1:0{width}d}"
        else:
            wanted = last.name
        if wanted in names:
            return wanted
        first_seq = binlog_seq(names[0])
        if binlog_seq(wanted) < first_seq:
            base, _ = split_name(names[0])
            width = len(names[0]) - len(base) - 1
            missing = [f"{base}.{n:0{width}d}" for n in range(binlog_seq(wanted), first_seq)]
            missing = [m for m in missing if m not in self.closed]
            if missing:
                self.gaps.append(missing)
                self.events.gap(missing)
            return names[0]
        raise SourceError(f"binlog {wanted} is ahead of the server's binary logs "
                          f"({names[0]} .. {names[-1]}); was the server reset?",
                          hint="use a new repository or --server-name after RESET MASTER")

    # -- spool and storing ----------------------------------------------------------------------
    def _spool_files(self) -> list[str]:
        out = []
        for name in os.listdir(self.spool):
            try:
                split_name(name)
            except SourceError:
                continue
            out.append(name)
        return sorted(out, key=binlog_seq)

    def _server_end(self) -> tuple[int, int] | None:
        """The end of the server's binary log (file number, offset), or None if it cannot be
        asked now."""
        for attempt in range(2):
            try:
                if self.conn is None:
                    self.conn = connect(self.settings)
                names = binlog_list(self.conn)
            except SourceError:
                self._close_conn()
                if attempt:
                    return None
                continue
            if not names:
                return None
            name, size = names[-1]
            return binlog_seq(name), size
        return None

    def _close_conn(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
            self.conn = None

    def _note_server_end(self) -> None:
        """Note the moment, then where the server's binary log ends: every event written
        before that moment lies before that position."""
        now = time.time()
        end = self._server_end()
        if end is None:
            return  # the server cannot say what it wrote: the synced moment stays
        mark = (now, *end)
        if self.marks and self.marks[-1][1:] == mark[1:]:
            self.marks[-1] = mark  # nothing written since: the later moment says more
        else:
            self.marks.append(mark)

    def _reached(self, spooled: tuple[int, float] | None) -> None:
        """Advance synced_at to the newest mark the spool has reached."""
        while self.marks and spooled is not None and self.marks[0][1:] <= spooled:
            self.synced_at = max(self.synced_at or 0.0, self.marks.pop(0)[0])

    def sync(self) -> list[str]:
        """Store every spooled file that grew; drop closed files once stored.

        The synced moment stored with them is the newest moment at which the server's binary
        log ended at a position the spool has reached: events the server wrote before a sync
        may still be on their way (in the network, in the client), so a sync's own clock is
        claimed only once the spool holds what the server had written by then."""
        assert self.info is not None
        self._note_server_end()
        files = self._spool_files()
        spooled: tuple[int, float] | None = None
        # the server sends files in order: one this connection received whole is final once
        # a later one arrives (even without a rotate event, as after a crash)
        final = frozenset(n for n in files[:-1] if self.session_start is not None
                          and binlog_seq(n) >= self.session_start)
        todo: list[tuple[str, BinlogScan]] = []
        for name in files:
            path = os.path.join(self.spool, name)
            try:
                s = scan_path(path, name)
            except SourceError:
                spooled = max(spooled or (0, 0.0), (binlog_seq(name), 0.0))
                continue  # only the magic so far
            spooled = max(spooled or (0, 0.0),
                          (binlog_seq(name), float("inf") if s.closed else float(s.end)))
            archived = self.heads.get(name)
            if archived is not None and s.head_read and s.head().differs(archived):
                raise SourceError(
                    f"the server sent a {name} ({s.head().describe()}) that is not the archived "
                    f"{name} ({archived.describe()}): its binary log was reset, or the address "
                    "now reaches another server",
                    hint="stopping; if the server's history restarted, run binlog-stream with "
                         "--new-server")
            done = s.closed or name in final
            grew = s.end > self.stored_sizes.get(name, 0)
            if grew or (done and name not in self.closed):
                todo.append((path, s))
            elif done and name != files[-1]:
                os.unlink(path)
        self._reached(spooled)
        if not todo:
            return []
        # before any position is reached (a new archive): only what preceded its oldest file
        synced_at = self.synced_at or float(
            min((s.created for _, s in todo if s.created), default=1))
        store_files(self.repo, self.info, self.admission, self.host, todo, synced_at=synced_at,
                    final=final)
        for path, s in todo:
            self.stored_sizes[s.name] = s.end
            if s.head_read:
                self.heads[s.name] = s.head()
            if s.closed or s.name in final:
                self.closed.add(s.name)
                if s.name != files[-1]:
                    os.unlink(path)
        names = [s.name for _, s in todo]
        self.events.stored(names)
        return names

    # -- the loop -----------------------------------------------------------------------------
    def _argv(self, option_file: str, start: str) -> list[str]:
        assert self.info is not None
        tool = find("binlog", self.info.flavor)
        # MySQL's mysqlbinlog names the replica id option differently
        id_option = ("--connection-server-id" if tool.flavor == MYSQL
                     else "--stop-never-slave-server-id")
        return [tool.path, f"--defaults-file={option_file}", "--read-from-remote-server", "--raw",
                "--stop-never", f"{id_option}={self.client_server_id}",
                f"--result-file={self.spool.rstrip('/')}/", start]

    def run(self) -> None:
        try:
            self._run()
        finally:
            self._close_conn()

    def _run(self) -> None:
        os.makedirs(self.spool, exist_ok=True)
        delay = self.retry_delay
        first = True
        while not self.stop_event.is_set():
            try:
                info, on_server = self._identify()
            except SourceError as exc:
                if first:
                    raise
                self.events.reconnect(str(exc))
                self.stop_event.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            self.host = self.host_name or info.hostname
            archive = load_archive(self.repo, self.host)
            adm = admit(archive, info, self.host, on_server, new_server=self.new_server)
            if adm.declared and first and self._spool_files():
                raise SourceError(f"the spool {self.spool} holds binlogs of the server archived "
                                  f"before under {self.host}",
                                  hint="archive them with that server's stream, or give an "
                                       "empty --spool")
            cat = archive.history(adm.history, info.identity())
            if adm.history != self.admission.history or first:
                for note in adm.notes:
                    self.events.note(note)
                # positions of another history say nothing about this one
                self.synced_at, self.marks = cat.synced_at, []
            self.info, self.admission = info, adm
            start = self._start_file(on_server, cat)
            first = False
            started = time.monotonic()
            reason = self._follow(start)
            if reason is None:
                break
            self.reconnects += 1
            self.events.reconnect(reason)
            if time.monotonic() - started > 30:
                delay = self.retry_delay  # it had been working: not a flapping server
            self.stop_event.wait(delay)
            delay = min(delay * 2, 30.0)
        if self.info is not None:
            self.sync()

    def _follow(self, start: str) -> str | None:
        """Run one replication connection; None when asked to stop, else why it ended."""
        import tempfile

        self.session_start = binlog_seq(start)
        with self.settings.option_file() as opt, tempfile.TemporaryFile() as err:
            argv = self._argv(opt, start)
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
            try:
                while not self.stop_event.wait(self.interval):
                    self.sync()
                    if proc.poll() is not None:
                        break
                if self.stop_event.is_set():
                    return None
                err.seek(0)
                text = err.read().decode("utf-8", "replace")
                self.sync()
                return (f"{os.path.basename(argv[0])} exited ({proc.returncode}): "
                        f"{failure_line(text)}")
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
