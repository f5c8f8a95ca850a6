"""Physical base backups: tar streams of the cluster stored through the chunker.

On the database host, with read access to the data directory, keepwell copies the files itself
(keepwell.sources.postgres.filecopy: the "copy" method); elsewhere, or with extra tablespaces, the
backup streams ``pg_basebackup -Ft -D - -X none`` straight into a snapshot (``base.tar``),
so each backup is a full backup that stores only the chunks that changed. Its WAL comes from the
archive, not from the backup: the snapshot records the WAL range (start/stop LSN and timeline,
read from ``backup_label`` and ``backup_manifest`` as the stream passes) and the backup waits
until every segment of that range is in the repository. A cluster with extra tablespaces is
copied through a temporary directory (pg_basebackup writes only one tablespace to stdout), one
``tablespaces/<oid>.tar`` per tablespace. Both methods give the same ``base.tar``, so restore
does not care which one took the backup.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from keepwell.errors import UsageError
from keepwell.sources.postgres import KIND_PHYSICAL, filecopy
from keepwell.sources.postgres.archive import WalArchive
from keepwell.sources.postgres.connection import ConnSpec, connect, next_xid, server_facts
from keepwell.sources.postgres.errors import PostgresError, WalWaitTimeoutError
from keepwell.sources.postgres.tartap import TarTap
from keepwell.sources.postgres.tools import find_program, pg_tool
from keepwell.sources.postgres.walnames import Lsn, segment_name
from keepwell.sources.streams import Prefetch, ReadAhead

METHODS = ("auto", "copy", "stream")
_START_RE = re.compile(r"^START WAL LOCATION: (\S+)", re.M)
_TLI_RE = re.compile(r"^START TIMELINE: (\d+)", re.M)


@dataclass(frozen=True)
class PhysicalResult:
    snapshot_id: str
    short_id: str
    timeline: int
    start_lsn: Lsn
    stop_lsn: Lsn
    bytes: int
    seconds: float
    missing_wal: list[str]
    method: str = "stream"


def wal_range(label: bytes | None, manifest: bytes | None) -> tuple[int, Lsn, Lsn]:
    """(timeline, start LSN, stop LSN) of a base backup from its label and manifest."""
    if not manifest:
        raise PostgresError("pg_basebackup sent no backup_manifest; cannot tell the WAL range")
    try:
        ranges = json.loads(manifest)["WAL-Ranges"]
        start = Lsn.parse(ranges[0]["Start-LSN"])
        stop = Lsn.parse(ranges[-1]["End-LSN"])
        tli = int(ranges[-1]["Timeline"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise PostgresError(f"cannot read the WAL range from backup_manifest: {exc}") from None
    if label:
        text = label.decode("utf-8", "replace")
        m = _START_RE.search(text)
        if m:
            start = min(start, Lsn.parse(m.group(1)))
    return tli, start, stop


def tablespaces(conn: Any) -> dict[str, dict[str, str]]:
    """The cluster's tablespaces outside its data directory. An in-place one (a directory
    ``pg_tblspc/<oid>``, as a restore leaves them by default; its location is relative) is part
    of the data directory, and so of ``base.tar``."""
    rows = conn.execute(
        "SELECT oid::text, spcname, pg_tablespace_location(oid) FROM pg_tablespace"
        " WHERE spcname NOT IN ('pg_default', 'pg_global')"
    ).fetchall()
    return {str(oid): {"name": str(name), "location": str(loc)} for oid, name, loc in rows
            if str(loc).startswith("/")}


def backup_physical(
    repo: Any,
    spec: ConnSpec,
    cluster: str,
    *,
    wait_timeout: float = 120.0,
    tags: tuple[str, ...] = (),
    host: str | None = None,
    on_progress: Callable[[int], None] | None = None,
    method: str = "auto",
) -> PhysicalResult:
    """Take a base backup of the cluster at `spec` into `repo`, then wait for its WAL.

    ``method``: ``copy`` reads the data directory itself (keepwell.sources.postgres.filecopy),
    ``stream`` runs pg_basebackup, ``auto`` copies when this process can read the cluster's
    files and the cluster has no extra tablespaces, and streams otherwise."""
    if method not in METHODS:
        raise UsageError(f"unknown backup method {method!r}", hint=f"choose {', '.join(METHODS)}")
    began = time.monotonic()
    archive = WalArchive(repo, cluster, host)
    with connect(spec) as conn:
        facts = server_facts(conn)
        archive.check_identity(facts.system_identifier, "this server")
        spaces = tablespaces(conn)
        start_time = datetime.now(UTC)
        why_not = "the cluster has tablespaces" if spaces else filecopy.copy_possible(facts)
        if method == "copy" and why_not:
            raise PostgresError(f"cannot copy the data directory: {why_not}",
                                hint="run on the database host as its owner, or use --method stream")
        copying = method == "copy" or (method == "auto" and why_not is None)
        program = find_program("pg_basebackup", facts.major)
        argv = [program, *spec.dbname_arg(), "-Ft", "-X", "none", "-c", "fast", "-v",
                "-l", f"keepwell {start_time:%Y-%m-%dT%H:%M:%SZ}"]
        source: dict[str, Any] = {"cluster": cluster, **facts.as_source(),
                                  "from_standby": facts.in_recovery,
                                  "start_time": start_time.isoformat(),
                                  "tablespaces": spaces,
                                  "method": "copy" if copying else "stream"}
        paths = ["base.tar"] + [f"tablespaces/{oid}.tar" for oid in spaces]
        # page images: the strong level of pages pays 6-10 % over zstd 3 on tables rewritten by
        # updates (freshly loaded ones keep the fast level, see keepwell.compression.Levels)
        with repo.new_snapshot(KIND_PHYSICAL, paths, host=host or socket.gethostname(),
                               tags=tags, source=source, page_levels=True) as w:
            if copying:
                assert facts.data_directory is not None
                copied, total = _via_copy(w, conn, facts.major, facts.data_directory,
                                          f"keepwell {start_time:%Y-%m-%dT%H:%M:%SZ}")
                if on_progress is not None:
                    on_progress(total)
                tli, start, stop = copied.timeline, copied.start, copied.stop
            else:
                if spaces:
                    captured, total = _via_directory(w, argv)
                else:
                    captured, total = _via_stdout(w, argv, on_progress)
                tli, start, stop = wal_range(captured.get("backup_label"),
                                             captured.get("backup_manifest"))
            w.source.update(timeline=tli, start_lsn=str(start), stop_lsn=str(stop),
                            stop_time=datetime.now(UTC).isoformat())
            try:
                w.source["next_xid"] = next_xid(conn)
            except Exception:  # noqa: BLE001 - a standby without hot_standby cannot say
                w.source["next_xid"] = None
            missing = wait_for_wal(archive, tli, start, stop, facts.segment_size, wait_timeout)
            w.source["complete_at_backup"] = not missing
            snap = w.commit()
    result = PhysicalResult(str(snap.id), str(snap.short_id), tli, start, stop, total,
                            time.monotonic() - began, missing, "copy" if copying else "stream")
    if missing:
        raise WalWaitTimeoutError(
            f"backup {snap.short_id} is stored but incomplete: WAL {missing[0]}"
            f"{' .. ' + missing[-1] if len(missing) > 1 else ''} did not reach the repository"
            f" within {wait_timeout:.0f} s"
        )
    return result


def _via_copy(w: Any, conn: Any, major: int, datadir: str,
              label: str) -> tuple[filecopy.CopyResult, int]:
    """The data directory read here, as a tar stream with the backup label last. The backup
    is started and stopped on `conn`; if anything fails between, closing it ends the backup."""
    filecopy.backup_start(conn, major, label)
    done: list[filecopy.CopyResult] = []
    manifest = filecopy.Manifest()

    def blocks() -> Iterator[bytes | memoryview]:
        yield from filecopy.tar_blocks(datadir, manifest)
        done.append(filecopy.backup_stop(conn, major))
        yield filecopy.closing_members(done[0], manifest, time.time())

    stream = Prefetch(blocks(), name="kw-pg-copy")
    try:
        total = w.add_stream("base.tar", stream, mode=0o600)
    finally:
        stream.close()
    if not done:
        raise PostgresError("the copy of the data directory ended before the backup stopped")
    return done[0], total


def _via_stdout(w: Any, argv: list[str],
                on_progress: Callable[[int], None] | None) -> tuple[dict[str, bytes], int]:
    with pg_tool([*argv, "-D", "-"]) as proc:
        ahead = ReadAhead(proc.stdout)  # pg_basebackup keeps sending while a block is stored
        try:
            tap = TarTap(ahead, {"backup_label", "backup_manifest"})
            w.add_stream("base.tar", tap, mode=0o600)
        finally:
            ahead.close()
        proc.check("pg_basebackup")
    if on_progress is not None:
        on_progress(tap.total)
    return tap.captured, tap.total


def _via_directory(w: Any, argv: list[str]) -> tuple[dict[str, bytes], int]:
    tmp = tempfile.mkdtemp(prefix="keepwell-basebackup-")
    try:
        with pg_tool([*argv, "-D", tmp], stdout=None) as proc:
            proc.check("pg_basebackup")
        captured: dict[str, bytes] = {}
        total = 0
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            if name == "backup_manifest":
                with open(path, "rb") as f:
                    captured["backup_manifest"] = f.read()
                w.add_bytes("backup_manifest", captured["backup_manifest"], mode=0o600)
                continue
            if not name.endswith(".tar"):
                continue
            target = "base.tar" if name == "base.tar" else f"tablespaces/{name}"
            with open(path, "rb") as f:
                tap = TarTap(f, {"backup_label"})
                total += w.add_stream(target, tap, mode=0o600)
                captured.update(tap.captured)
        return captured, total
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def wait_for_wal(archive: WalArchive, timeline: int, start: Lsn, stop: Lsn, segment_size: int,
                 timeout: float) -> list[str]:
    """Wait until segments start..stop are archived; returns those still missing at timeout."""
    first = start.segno(segment_size)
    last = max(first, (stop.value - 1) // segment_size)
    names = [segment_name(timeline, s, segment_size) for s in range(first, last + 1)]
    deadline = time.monotonic() + timeout
    delay = 0.02  # the last segment is usually on its way already: look again soon
    while True:
        cat = archive.catalog(refresh=True)
        missing = [n for n in names if n not in cat.wal]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(delay)
        delay = min(1.0, delay * 1.5)
