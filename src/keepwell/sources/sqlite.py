"""The SQLite source: consistent copies of live databases, and restores that SQLite can trust.

Words. A *database* is one SQLite main file, known by the absolute path it was backed up from
and the host it lives on. Its *sidecars* are the files SQLite keeps beside it, named after it:
``-wal`` and ``-shm`` (WAL mode), ``-journal`` (the rollback-journal modes). A sidecar belongs
to the file it was written for; SQLite cannot tell whose it is, and replays whatever it finds.

Backup. A copy is consistent when all of it is read inside one read transaction. The copy
begins a transaction on the database and reads from it: in the rollback-journal modes (DELETE,
TRUNCATE, PERSIST, MEMORY, OFF) that takes SQLite's SHARED lock, and no writer can change the
main file until it is released; in WAL mode it fixes a snapshot, and writers go on appending to
the WAL while a checkpoint stops short of what the snapshot still reads. Waiting for the lock is
bounded by the *busy timeout*: a writer that is committing holds it off for a moment, a
connection in exclusive locking mode for good, and the backup then fails saying so. SQLite's
backup API copies the pages *from that connection*; since its read transaction stays open from
the first step to the last, no step can see a write, and the copy never restarts (taken with a
fresh read per step, as the backup API does by default, a copy restarts whenever another
connection commits between two steps, and under a steady writer in a rollback-journal mode it
never finishes). SQLite reads the pages, not keepwell: only SQLite knows which pages the WAL
holds newer versions of. The steps are there for progress only.

The pages go to a scratch file in the temporary directory (``TMPDIR``; it needs room for one
copy), written by SQLite without a journal and unlinked as soon as SQLite has opened it: a run
killed during the copy or the upload leaves nothing behind, and one killed in the moment before
the unlink leaves a file that the next run removes (`keepwell.sources.scratch`). The read
transaction ends with the local copy: writers wait (rollback-journal modes) or the WAL grows (WAL
mode) for a disk-to-disk copy, not for the upload that follows. Streaming the pages straight into
the repository would need no scratch space, but would hold writers off for the whole upload.

Restore. The snapshot is written to a scratch file in the target's directory, fsynced, given the
target's mode and owner (a new file: the mode recorded at backup), and checked with ``PRAGMA
quick_check`` before anything of the target is touched. An existing target, or sidecars left
where a new one goes, is replaced only when asked (``overwrite``) and only when nothing uses it:
a process that has the database or a sidecar open (seen in Linux's ``/proc``) or a lock on it
stops the restore. The old database is first brought to rest (its WAL checkpointed, a hot
journal rolled back), then held under SQLite's EXCLUSIVE lock while its sidecars are removed and
the new file is renamed over it, so SQLite can never replay the old database's WAL or journal
onto the restored one. ``PRAGMA integrity_check`` then runs on the file at its final path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO
from urllib.parse import quote

from keepwell.errors import (
    IntegrityError,
    KeepwellError,
    RestoreTargetError,
    SnapshotNotFoundError,
    SourceError,
    UsageError,
)
from keepwell.repository import Repository, Snapshot
from keepwell.repository.events import Events
from keepwell.sources.files.archiver import BackupResult
from keepwell.sources.postgres.spool import fsync_dir
from keepwell.sources.scratch import ScratchFile

DEFAULT_BUSY_TIMEOUT = 60.0  # seconds to wait for a lock on the database
COPY_STEP = 4 << 20  # bytes of pages per backup step: the grain of the copy's progress
SIDECARS = ("-wal", "-shm", "-journal")
# SQLite's lock bytes on Unix (os_unix.c): PENDING, RESERVED, then the 510-byte SHARED range.
# A write lock over all of them is what SQLite itself holds as EXCLUSIVE.
_PENDING_BYTE = 0x40000000
_LOCK_BYTES = 2 + 510


def _uri(path: str, mode: str, *extra: str) -> str:
    # quoted: an unquoted '?' or '#' in a path would end it and open another file
    return "&".join([f"file:{quote(path)}?mode={mode}", *extra])


def _busy(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(exc)


def _poll(attempt: Callable[[], bool], timeout: float) -> bool:
    """Call ``attempt`` until it returns True or ``timeout`` seconds have passed (then False),
    a few milliseconds apart. SQLite's own busy handler backs off to 100 ms between tries, and a
    writer committing back to back in a rollback-journal mode holds its PENDING lock most of the
    time: tried that rarely, a reader can wait for many seconds before it finds a gap."""
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while not attempt():
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(2 * pause, 0.005)
    return True


def begin_read(con: sqlite3.Connection, timeout: float) -> None:
    """Begin a read transaction on ``con`` (opened with ``timeout=0`` and ``isolation_level=None``)
    and read, so that it holds SQLite's SHARED lock or a WAL snapshot until it ends. Raises the
    last ``SQLITE_BUSY`` error if that takes longer than ``timeout`` seconds."""
    last: list[sqlite3.Error] = []

    def attempt() -> bool:
        try:
            con.execute("BEGIN")
            con.execute("SELECT count(*) FROM sqlite_schema").fetchone()
            return True
        except sqlite3.OperationalError as exc:
            if con.in_transaction:
                con.execute("ROLLBACK")
            if not _busy(exc):
                raise
            last[:] = [exc]
            return False

    if not _poll(attempt, timeout):
        raise last[0]


# -- backup ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatabaseCopy:
    """A consistent copy of a database in a scratch file, ready to store."""

    file: BinaryIO
    size: int
    taken: datetime  # when its read transaction began: the moment the copy shows
    mode: int
    mtime: float
    page_size: int
    journal_mode: str


def check_database_file(path: str) -> os.stat_result:
    """``path`` names a regular file that may be a database (SQLite itself says whether it is:
    keepwell opens no descriptor of its own on a database, since closing one would drop any
    lock another connection of this process holds on it); a clear error if not."""
    for suffix in SIDECARS:
        main = path[:-len(suffix)]
        if path.endswith(suffix) and os.path.isfile(main):
            raise UsageError(f"{path} is the {suffix[1:]} file of the database {main}",
                             hint=f"back up {main}; SQLite's backup reads it as needed")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such SQLite database") from None
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path} is not a regular file, so not an SQLite database")
    return st


def _source_error(path: str, exc: sqlite3.Error, busy_timeout: float) -> KeepwellError:
    name = getattr(exc, "sqlite_errorname", "") or ""
    if _busy(exc):
        return SourceError(
            f"{path}: no read lock within {busy_timeout:g} s ({exc}): another connection holds "
            "the database locked", hint="retry later, raise --busy-timeout, or stop the program "
            "that keeps it locked (exclusive locking mode holds the lock for good)")
    if name.startswith("SQLITE_NOTADB"):
        return UsageError(f"{path} is not an SQLite database (SQLite: {exc})",
                          hint="an encrypted database cannot be copied page by page without "
                               "its key; give the path of a database file")
    if name.startswith("SQLITE_CANTOPEN"):
        return SourceError(f"{path}: SQLite cannot open it ({exc})", hint="a WAL database needs "
                           "its -shm file, or a writable directory to create it")
    if name.startswith(("SQLITE_FULL", "SQLITE_IOERR")):
        return SourceError(f"{path}: the copy failed ({exc})", hint="the scratch copy needs "
                           f"room for the whole database in {tempfile.gettempdir()} (TMPDIR)")
    return SourceError(f"{path}: SQLite copy failed: {exc}")


@contextmanager
def copy_database(path: str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
                  events: Events | None = None) -> Iterator[DatabaseCopy]:
    """A consistent copy of the database at ``path`` (see the module's docstring), valid inside
    the ``with`` block. Emits ``sqlite_copy`` events (``n``, ``done``, ``total``: bytes)."""
    st = check_database_file(path)
    try:
        scratch = ScratchFile.create(tempfile.gettempdir(), "kw-sqlite-", ".copy")
    except OSError as exc:
        raise SourceError(f"cannot create a scratch copy in {tempfile.gettempdir()}: "
                          f"{exc.strerror}", hint="set TMPDIR to a writable directory with room "
                          "for one copy of the database") from None
    try:
        dst = sqlite3.connect(_uri(scratch.path or "", "rw"), uri=True, isolation_level=None)
        try:
            scratch.unlink()
            dst.execute("PRAGMA journal_mode=OFF")
            dst.execute("PRAGMA synchronous=OFF")
            taken, page_size, journal = _copy_pages(path, dst, busy_timeout, events)
        finally:
            dst.close()
        size = os.fstat(scratch.fd).st_size
        os.lseek(scratch.fd, 0, os.SEEK_SET)
        with open(scratch.fd, "rb", closefd=False) as f:
            yield DatabaseCopy(f, size, taken, st.st_mode & 0o7777, st.st_mtime, page_size,
                               journal)
    finally:
        scratch.close()


def _copy_pages(path: str, dst: sqlite3.Connection, busy_timeout: float,
                events: Events | None) -> tuple[datetime, int, str]:
    try:
        src = sqlite3.connect(_uri(path, "rw"), uri=True, timeout=0, isolation_level=None)
    except sqlite3.Error as exc:
        raise _source_error(path, exc, busy_timeout) from None
    try:
        begin_read(src, busy_timeout)
        taken = datetime.now(UTC)
        journal = str(src.execute("PRAGMA journal_mode").fetchone()[0])
        page_size = int(src.execute("PRAGMA page_size").fetchone()[0])
        done = 0

        def progress(_status: int, remaining: int, total: int) -> None:
            nonlocal done
            now = (total - remaining) * page_size
            if events is not None:
                events.emit("sqlite_copy", n=now - done, done=now, total=total * page_size)
            done = now

        src.backup(dst, pages=max(1, COPY_STEP // page_size), progress=progress)
        src.execute("ROLLBACK")
        return taken, page_size, journal
    except sqlite3.Error as exc:
        raise _source_error(path, exc, busy_timeout) from None
    finally:
        src.close()


def backup_database(repo: Repository, path: str, *, tags: list[str] | tuple[str, ...] = (),
                    host: str | None = None,
                    busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> BackupResult:
    """Copy the database at ``path`` consistently and store the copy as a ``sqlite`` snapshot.

    The snapshot's time is the moment of the copy; its ``source`` records the database's path
    (as given, made absolute, and resolved), size, mode, page size and journal mode."""
    path = os.path.abspath(path)
    name = os.path.basename(path)
    with copy_database(path, busy_timeout=busy_timeout, events=repo.events) as copy:
        source = {"database": path, "realpath": os.path.realpath(path), "size": copy.size,
                  "mode": copy.mode, "page_size": copy.page_size,
                  "journal_mode": copy.journal_mode, "sqlite_version": sqlite3.sqlite_version}
        repo.events.emit("total", files=1, bytes=copy.size, final=True)
        with repo.new_snapshot("sqlite", [path], host=host, tags=tags, source=source) as w:
            w.add_stream(name, copy.file, mode=copy.mode, mtime=copy.mtime)
            repo.events.emit("file", path=path, size=copy.size)
            snap = w.commit(time_=copy.taken)
    return BackupResult(snap)


# -- choosing a snapshot -----------------------------------------------------------------------
def _database(snap: Snapshot) -> str:
    return str(snap.source.get("database") or (snap.paths[0] if snap.paths else ""))


def _is_of(snap: Snapshot, path: str) -> bool:
    """Was ``snap`` taken of the database at ``path`` (as given or resolved)?"""
    mine = {snap.source.get("database"), snap.source.get("realpath"), *snap.paths[:1]}
    return bool({os.path.abspath(path), os.path.realpath(path)} & mine)


def select_snapshot(repo: Repository, ref: str | None = None, *, target: str | None = None,
                    path: str | None = None, host: str | None = None) -> Snapshot:
    """The snapshot ``ref`` names (an id, or ``latest``: the default) among the SQLite snapshots
    of one database. ``latest`` is the newest snapshot of the database ``path`` names, else of the
    database at ``target`` if the repository holds one, else of the only database there is; with
    snapshots of several databases to choose from, it is refused and they are listed."""
    ref = ref or "latest"
    if ref != "latest":
        if ref.lower().startswith("latest"):
            raise UsageError(f"{ref!r} is not a snapshot id (give 'latest' or a hex id prefix)")
        snap = repo.find_snapshot(ref, kind="sqlite")
        if (path is not None and not _is_of(snap, path)) or (host is not None and snap.host != host):
            raise UsageError(f"snapshot {snap.short_id} is of {snap.host}:{_database(snap)}, "
                             "not of the database --path/--host name")
        return snap
    snaps = [s for s in repo.list_snapshots("sqlite") if host is None or s.host == host]
    if path is not None:
        snaps = [s for s in snaps if _is_of(s, path)]
    elif target is not None and any(_is_of(s, target) for s in snaps):
        snaps = [s for s in snaps if _is_of(s, target)]
    if not snaps:
        named = " and ".join([f"host {host}"] * bool(host) + [f"path {path}"] * bool(path))
        raise SnapshotNotFoundError("no SQLite snapshot in this repository"
                                    + (f" matches {named}" if named else ""))
    newest: dict[tuple[str, str], Snapshot] = {}
    for s in snaps:
        newest[(s.host, _database(s))] = s
    if len(newest) > 1:
        shown = sorted(newest.items())[:10]
        listed = ", ".join(f"{h}:{d} (newest {s.time:%Y-%m-%d %H:%M})" for (h, d), s in shown)
        if len(newest) > len(shown):
            listed += f" and {len(newest) - len(shown)} more"
        raise UsageError(f"'latest' is ambiguous: this repository holds snapshots of "
                         f"{len(newest)} SQLite databases: {listed}",
                         hint="choose one with --path (and --host), or give a snapshot id")
    return snaps[-1]


# -- restore -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatabaseRestore:
    target: str
    size: int
    mode: int
    replaced: bool  # an existing database (or its sidecars) was replaced


def _check_target(target: str, overwrite: bool) -> os.stat_result | None:
    """The existing target's status (None: there is none); refuses what cannot be replaced."""
    for suffix in SIDECARS:
        main = target[:-len(suffix)]
        if target.endswith(suffix) and os.path.isfile(main):
            # SQLite would read a database there as that database's WAL or journal
            raise RestoreTargetError(f"{target} is the {suffix[1:]} file of the database {main}",
                                     hint="give the path of a database file to create or"
                                          " replace")
    try:
        st: os.stat_result | None = os.stat(target, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):  # the latter is reported where it is made
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise RestoreTargetError(f"{target} is a symbolic link",
                                 hint="give the path of the database file itself")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise RestoreTargetError(f"{target} exists and is not a regular file",
                                 hint="give the path of a database file to create or replace")
    for suffix in SIDECARS:
        side = target + suffix
        if os.path.islink(side) or (os.path.lexists(side) and not os.path.isfile(side)):
            raise RestoreTargetError(f"{side} is in the way and is not a regular file",
                                     hint="move it away; SQLite would take it for the database's")
    sides = [target + s for s in SIDECARS if os.path.lexists(target + s)]
    if not overwrite and (st is not None or sides):
        what = target if st is not None else f"{sides[0]} (left by an earlier database)"
        raise RestoreTargetError(f"{what} exists",
                                 hint="pass --overwrite to replace the database and its "
                                      "-wal/-shm/-journal files, or choose another target")
    return st


def restore_database(repo: Repository, snap: Snapshot, target: str, *, overwrite: bool = False,
                     busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> DatabaseRestore:
    """Restore the database of ``snap`` at ``target`` (see the module's docstring)."""
    if snap.kind != "sqlite":
        raise UsageError(f"snapshot {snap.short_id} is a {snap.kind} snapshot, not sqlite")
    name = os.path.basename(snap.paths[0])
    node = repo.find_node(snap, name)
    target = os.path.abspath(target)
    old = _check_target(target, overwrite)
    mode = (old.st_mode if old is not None else node.mode or 0o644) & 0o7777
    repo.events.emit("total", files=1, bytes=node.size or 0, final=True)
    staged, size = _stage(repo, snap, name, target, mode, old)
    with staged:
        problem = _check(staged.path or "", "quick_check", immutable=True)
        if problem:
            raise IntegrityError(
                f"the database in snapshot {snap.short_id} fails PRAGMA quick_check: {problem}",
                hint=f"{target} was left as it was; restore an earlier snapshot")
        replaced = old is not None or any(os.path.lexists(target + s) for s in SIDECARS)
        try:
            if replaced:
                _replace(target, staged, busy_timeout)
            else:
                os.rename(staged.path or "", target)
                staged.renamed()
                fsync_dir(os.path.dirname(target))
        except OSError as exc:
            raise RestoreTargetError(f"cannot put the database at {target}: {exc.strerror}",
                                     hint="check the directory's permissions") from None
    repo.events.emit("file", path=target, size=size)
    problem = _check(target, "integrity_check")
    if problem:
        raise IntegrityError(f"{target} was restored from snapshot {snap.short_id} but fails "
                             f"PRAGMA integrity_check: {problem}",
                             hint="the database was damaged when it was backed up; restore an "
                                  "earlier snapshot")
    return DatabaseRestore(target, size, mode, replaced)


def _stage(repo: Repository, snap: Snapshot, name: str, target: str, mode: int,
           old: os.stat_result | None) -> tuple[ScratchFile, int]:
    """The database of ``snap`` in a scratch file beside ``target``, durable, with its mode set."""
    directory = os.path.dirname(target)
    try:
        os.makedirs(directory, exist_ok=True)
        staged = ScratchFile.create(directory, f".{os.path.basename(target)}.kw-", ".restore")
    except OSError as exc:
        raise RestoreTargetError(f"cannot write in {directory}: {exc.strerror}",
                                 hint="choose a target in a writable directory") from None
    try:
        size = 0
        with open(staged.fd, "wb", closefd=False) as f:
            for chunk in repo.iter_file(snap, name):
                f.write(chunk)
                size += len(chunk)
                repo.events.emit("bytes", n=len(chunk))
            f.flush()
            os.fchmod(staged.fd, mode)
            if old is not None:
                _give_owner(staged.fd, old)
            os.fsync(staged.fd)
        return staged, size
    except BaseException as exc:
        staged.close()
        if isinstance(exc, OSError):
            raise RestoreTargetError(f"cannot write {target}: {exc.strerror}",
                                     hint=f"{target} was left as it was") from None
        raise


def _give_owner(fd: int, old: os.stat_result) -> None:
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid) != (old.st_uid, old.st_gid):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)
        except PermissionError:
            pass  # only root may give a file away; the file stays ours, with the old mode


def _check(path: str, pragma: str, *, immutable: bool = False) -> str:
    """'' if ``PRAGMA quick_check``/``integrity_check`` passes, else its first findings."""
    uri = _uri(path, "ro", "immutable=1") if immutable else _uri(path, "rw")
    try:
        con = sqlite3.connect(uri, uri=True, isolation_level=None)
        try:
            rows = [str(r[0]) for r in con.execute(f"PRAGMA {pragma}").fetchall()]
        finally:
            con.close()
    except sqlite3.Error as exc:
        return str(exc)
    return "" if rows == ["ok"] else "; ".join(rows[:3]).replace("\n", " ")


def _check_unused(target: str, files: list[str]) -> None:
    users = holders(files)
    if users:
        raise RestoreTargetError(
            f"{target} is in use by " + ", ".join(f"process {pid} ({comm})" for pid, comm in users),
            hint="stop it first: a database replaced under a running program loses its writes")


def _replace(target: str, staged: ScratchFile, busy_timeout: float) -> None:
    files = [target, *(target + s for s in SIDECARS)]
    _check_unused(target, files)
    _bring_to_rest(target, busy_timeout)
    directory = os.path.dirname(target)
    with _exclusive(target, busy_timeout):
        # again under the lock: a program that opened the database meanwhile would go on with
        # the old file, but with the -wal and -journal of the new one's name
        _check_unused(target, files)
        for side in files[1:]:
            try:
                os.unlink(side)
            except FileNotFoundError:
                pass
        fsync_dir(directory)  # the sidecars are gone for good before the new file is there
        os.rename(staged.path or "", target)
        staged.renamed()
        fsync_dir(directory)


def _in_use(target: str, why: str) -> RestoreTargetError:
    return RestoreTargetError(f"{target} is in use: {why}",
                              hint="stop the program using it, or raise --busy-timeout")


def _bring_to_rest(target: str, busy_timeout: float) -> None:
    """Fold the old database's WAL into it and roll back a hot journal, so that it is whole on
    its own if the restore stops before the new file is in place."""
    if not os.path.exists(target):
        return
    try:
        con = sqlite3.connect(_uri(target, "rw"), uri=True, timeout=busy_timeout,
                              isolation_level=None)
    except sqlite3.Error:
        return
    try:
        con.execute("SELECT count(*) FROM sqlite_schema").fetchone()
        wal = con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        if wal and con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:
            raise _in_use(target, "another connection is reading or writing it")
    except sqlite3.Error as exc:
        if _busy(exc):
            raise _in_use(target, f"no lock within {busy_timeout:g} s") from None
        # not a database, damaged, or read-only to us: nothing SQLite can bring to rest
    finally:
        con.close()


@contextmanager
def _exclusive(target: str, busy_timeout: float) -> Iterator[None]:
    """Hold what SQLite takes for an EXCLUSIVE lock on the file at ``target``."""
    try:
        fd = os.open(target, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        yield  # gone, or not writable by us: there is no lock we could take
        return
    def attempt() -> bool:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, _LOCK_BYTES, _PENDING_BYTE)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            return False

    try:
        if not _poll(attempt, busy_timeout):
            raise _in_use(target, f"no lock within {busy_timeout:g} s")
        yield
    finally:
        os.close(fd)


def holders(paths: list[str]) -> list[tuple[int, str]]:
    """Other processes that have one of ``paths`` open, as (pid, command name), from Linux's
    ``/proc``; processes this user may not inspect are not seen."""
    wanted = set()
    for p in paths:
        try:
            st = os.stat(p)
            wanted.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    found: list[tuple[int, str]] = []
    if not wanted:
        return found
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    except OSError:
        return found
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in wanted:
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                found.append((int(pid), comm))
                break
    return found
