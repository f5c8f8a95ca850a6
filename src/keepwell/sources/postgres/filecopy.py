"""Physical base backups read straight from the data directory (the "copy" method).

When keepwell runs on the database host and can read the data directory, it takes the base
backup itself, as pgBackRest and Barman do, instead of through ``pg_basebackup``: the server is
told a backup starts (``pg_backup_start``, non-exclusive: the backup ends if this session
ends), the files are read from disk, and ``pg_backup_stop`` returns the ``backup_label`` the
copy needs. The data is written as the same tar stream ``pg_basebackup -Ft`` produces, so
restore, ``--delta`` and verification do not depend on how the backup was taken. What is left
out follows PostgreSQL's own base backup: the contents of ``pg_wal`` (the WAL comes from the
archive), of the directories rebuilt at start (``pg_stat_tmp``, ``pg_replslot``, ...), the
server's pid and option files, relation cache files and temporary files.

Saved by reading directly: the copy through the server's WAL sender and the ``pg_basebackup``
process, two copies of every byte and most of a core on a small machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import google_crc32c
import psycopg

from keepwell.sources.postgres.errors import PostgresError
from keepwell.sources.postgres.walnames import Lsn

BLOCK = 2 << 20  # below glibc's mmap threshold as keepwell sets it: buffers are reused
# directories whose contents are not copied (the directory itself is), as pg_basebackup does
EMPTY_DIRS = frozenset({"pg_wal", "pg_dynshmem", "pg_notify", "pg_replslot", "pg_serial",
                        "pg_snapshots", "pg_stat_tmp", "pg_subtrans"})
SKIP_FILES = frozenset({"postmaster.pid", "postmaster.opts", "backup_label", "tablespace_map",
                        "backup_manifest", "postgresql.auto.conf.tmp", "current_logfiles.tmp"})
_START_RE = re.compile(r"^START WAL LOCATION: (\S+)", re.M)
_TLI_RE = re.compile(r"^START TIMELINE: (\d+)", re.M)
_PAD = bytes(512)
_OPEN = os.O_RDONLY | (getattr(os, "O_NOATIME", 0) if os.geteuid() == 0 else 0)


@dataclass
class CopyResult:
    timeline: int
    start: Lsn
    stop: Lsn
    label: bytes


def copy_possible(facts: Any) -> str | None:
    """Why this process cannot read the cluster's files itself (None when it can): the data
    directory must be here, readable, and hold the cluster the connection reaches."""
    ddir = facts.data_directory
    if not ddir:
        return "the server did not say where its data directory is"
    control = os.path.join(ddir, "global", "pg_control")
    try:
        with open(control, "rb") as f:
            sysid = int.from_bytes(f.read(8), "little")
    except OSError as exc:
        return f"cannot read {control}: {exc.strerror}"
    if sysid != facts.system_identifier:
        return f"{ddir} holds another cluster (system identifier {sysid})"
    if not os.access(ddir, os.R_OK | os.X_OK):
        return f"cannot list {ddir}"
    return None


def _skip(name: str) -> bool:
    return (name in SKIP_FILES or name.startswith("pg_internal.init")
            or name.startswith("pgsql_tmp"))


def _members(root: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """(archive name, path, lstat) of every entry to copy, directories before their contents,
    in a stable order (so unchanged clusters give unchanged streams)."""
    stack = [("", root)]
    while stack:
        rel, path = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name, reverse=True)
        except FileNotFoundError:
            continue  # a directory dropped during the copy: WAL replay drops it too
        for e in entries:
            name = f"{rel}{e.name}"
            if _skip(e.name):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode) and name == "pg_wal":  # initdb -X: copy as a directory
                st = os.stat(e.path)
            if stat.S_ISDIR(st.st_mode):
                if rel == "" and e.name in EMPTY_DIRS:
                    yield name, e.path, st
                    if e.name == "pg_wal":
                        yield "pg_wal/archive_status", "", st
                    continue
                yield name, e.path, st
                stack.append((name + "/", e.path))
            elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                yield name, e.path, st


def _header(name: str, st: os.stat_result, *, size: int = 0, link: str = "") -> bytes:
    ti = tarfile.TarInfo(name)
    ti.mode = stat.S_IMODE(st.st_mode)
    ti.uid, ti.gid = st.st_uid, st.st_gid
    ti.mtime = int(st.st_mtime)
    if stat.S_ISDIR(st.st_mode):
        ti.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        ti.type, ti.linkname = tarfile.SYMTYPE, link
    else:
        ti.size = size
    return ti.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")


class Manifest:
    """A ``backup_manifest`` (version 1, CRC32C checksums) for the files of the tar stream, as
    pg_basebackup writes one: ``pg_verifybackup`` checks a restored data directory against it."""

    def __init__(self) -> None:
        self.files: list[str] = []

    def add(self, name: str, size: int, mtime: float, crc: int) -> None:
        when = datetime.fromtimestamp(int(mtime), UTC).strftime("%Y-%m-%d %H:%M:%S GMT")
        try:
            name.encode("utf-8")
            where = f'"Path": {json.dumps(name)}'
        except UnicodeEncodeError:  # a name that is not UTF-8: its bytes in hex
            where = f'"Encoded-Path": "{os.fsencode(name).hex()}"'
        self.files.append(f'{{ {where}, "Size": {size}, "Last-Modified": "{when}", '
                          f'"Checksum-Algorithm": "CRC32C", '
                          f'"Checksum": "{crc.to_bytes(4, "little").hex()}" }}')

    def render(self, timeline: int, start: Lsn, stop: Lsn) -> bytes:
        body = ('{ "PostgreSQL-Backup-Manifest-Version": 1,\n"Files": [\n'
                + ",\n".join(self.files)
                + f'\n],\n"WAL-Ranges": [\n{{ "Timeline": {timeline}, "Start-LSN": "{start}", '
                  f'"End-LSN": "{stop}" }}\n],\n').encode()
        # the checksum covers everything up to the line that holds it
        return body + f'"Manifest-Checksum": "{hashlib.sha256(body).hexdigest()}"}}\n'.encode()


def tar_blocks(root: str, manifest: Manifest) -> Iterator[bytes | memoryview]:
    """The data directory as a tar stream, in blocks. A file is copied with the size it had
    when listed: bytes added later are left out, a file cut short is padded with zeros (the
    WAL replayed at restore repairs both, as it does for pg_basebackup's copy)."""
    for name, path, st in _members(root):
        if stat.S_ISLNK(st.st_mode):
            try:
                yield _header(name, st, link=os.readlink(path))
            except FileNotFoundError:
                continue
            continue
        if not stat.S_ISREG(st.st_mode):
            yield _header(name, st)
            continue
        try:
            fd = os.open(path, _OPEN)
        except FileNotFoundError:
            continue  # dropped since it was listed
        crc = google_crc32c.Checksum()
        try:
            size = st.st_size
            yield _header(name, st, size=size)
            left = size
            while left:
                block = os.read(fd, min(BLOCK, left))
                if not block:
                    break
                left -= len(block)
                crc.update(block)
                yield block
            while left:  # shrank since it was listed
                n = min(BLOCK, left)
                crc.update(bytes(n))
                yield bytes(n)
                left -= n
        finally:
            os.close(fd)
        manifest.add(name, size, st.st_mtime, int.from_bytes(crc.digest(), "big"))
        if size % 512:
            yield _PAD[: 512 - size % 512]


def _file_member(name: str, data: bytes, mtime: float) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o600, int(mtime)
    out = ti.tobuf(format=tarfile.GNU_FORMAT) + data
    return out + _PAD[: -len(data) % 512] if len(data) % 512 else out


def closing_members(copy: CopyResult, manifest: Manifest, mtime: float) -> bytes:
    """``backup_label`` and ``backup_manifest``, the tar stream's last members, and the end of
    the archive."""
    manifest.add("backup_label", len(copy.label), mtime, google_crc32c.value(copy.label))
    text = manifest.render(copy.timeline, copy.start, copy.stop)
    return (_file_member("backup_label", copy.label, mtime)
            + _file_member("backup_manifest", text, mtime) + bytes(1024))


def backup_start(conn: psycopg.Connection[Any], major: int, label: str) -> None:
    if major >= 15:
        conn.execute("SELECT pg_backup_start(%s, true)", (label,))
    else:
        conn.execute("SELECT pg_start_backup(%s, true, false)", (label,))


def backup_stop(conn: psycopg.Connection[Any], major: int) -> CopyResult:
    """End the backup; the archive is waited for by the caller (see wait_for_wal)."""
    fn = "pg_backup_stop(false)" if major >= 15 else "pg_stop_backup(false, false)"
    row = conn.execute(f"SELECT lsn::text, labelfile, spcmapfile FROM {fn}").fetchone()
    if row is None or not row[1]:
        raise PostgresError("the server returned no backup label when the backup stopped")
    label = str(row[1])
    start = _START_RE.search(label)
    tli = _TLI_RE.search(label)
    if start is None or tli is None:
        raise PostgresError("cannot read the WAL range from the backup label")
    return CopyResult(int(tli.group(1)), Lsn.parse(start.group(1)), Lsn.parse(str(row[0])),
                      label.encode())
