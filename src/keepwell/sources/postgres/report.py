"""What ``postgres info`` and ``postgres check`` report, as plain dicts built from a `Catalog`.

A *window* is the span a restore can stop anywhere in: from a complete base backup's stop to the
end of the gap-free WAL after it (`spans`; the source's PITR window is read from them too).
``check`` adds the problems: incomplete backups, gaps, a spool that holds an alert or a
backlog, and (when the server can be asked) archiving lag and failures.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from keepwell.sources.postgres.catalog import BaseBackup, Catalog
from keepwell.sources.postgres.walindex import DAMAGED, NOT_INDEXED
from keepwell.sources.postgres.walnames import Lsn, parse_segment_name


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt is not None else None


def backup_entry(cat: Catalog, b: BaseBackup) -> dict[str, Any]:
    reach = cat.reach(b)
    return {
        "id": b.snapshot_id, "short_id": b.short_id, "time": _iso(b.time),
        "timeline": b.timeline, "start_lsn": str(b.start_lsn), "stop_lsn": str(b.stop_lsn),
        "start_time": _iso(b.start_time), "stop_time": _iso(b.stop_time),
        "version": b.version, "from_standby": b.from_standby,
        "complete": not cat.reach(b, b.timeline).missing,
        "missing_wal": cat.reach(b, b.timeline).missing[:20],
        "restorable_to_lsn": str(reach.end_lsn), "restorable_to_time": _iso(reach.end_time),
        "restorable_timeline": reach.timeline,
    }


def spans(cat: Catalog) -> list[dict[str, Any]]:
    """Restore windows (times, LSNs, timeline, backups), merged where one backup's window
    reaches into the next one's: the one computation of a cluster's PITR window."""
    found: list[dict[str, Any]] = []
    for b in sorted(cat.complete_backups(), key=lambda b: b.stop_lsn):
        reach = cat.reach(b)
        start = b.stop_time or b.time
        span = {"from_time": start, "to_time": reach.end_time or start,
                "from_lsn": b.stop_lsn, "to_lsn": reach.end_lsn, "timeline": reach.timeline,
                "backups": [b.short_id]}
        if found and found[-1]["timeline"] == span["timeline"] and (
            found[-1]["to_lsn"] >= span["from_lsn"]
        ):
            last = found[-1]
            last["to_lsn"] = max(last["to_lsn"], span["to_lsn"])
            last["to_time"] = max(last["to_time"], span["to_time"])
            last["backups"].append(b.short_id)
        else:
            found.append(span)
    return found


def windows(cat: Catalog) -> list[dict[str, Any]]:
    """`spans` as ``postgres info`` shows them."""
    return [{**s, "from_time": _iso(s["from_time"]), "to_time": _iso(s["to_time"]),
             "from_lsn": str(s["from_lsn"]), "to_lsn": str(s["to_lsn"])} for s in spans(cat)]


def wal_summary(cat: Catalog) -> dict[str, Any]:
    tls = cat.timelines()
    counts: dict[int, int] = {}
    for name in cat.wal:
        parsed = parse_segment_name(name, cat.segment_size)
        if parsed is not None:
            counts[parsed[0]] = counts.get(parsed[0], 0) + 1
    from keepwell.sources.postgres.walnames import segment_name

    return {
        "segment_size": cat.segment_size,
        "snapshots": len(cat.wal_snapshots),
        "timelines": {
            str(t): {"first": segment_name(t, lo, cat.segment_size),
                     "last": segment_name(t, hi, cat.segment_size), "segments": counts.get(t, 0)}
            for t, (lo, hi) in sorted(tls.items())
        },
        "partials": sorted(cat.partials),
        "history_files": sorted(n for n in cat.wal if n.endswith(".history")),
        "gaps": [{"timeline": t, "from": a, "to": b} for t, a, b in cat.gaps()],
    }


def info(cat: Catalog) -> dict[str, Any]:
    return {
        "cluster": cat.cluster,
        "system_identifier": str(cat.system_identifier) if cat.system_identifier else None,
        "physical": [backup_entry(cat, b) for b in cat.backups],
        "logical": [{"id": lb.snapshot_id, "short_id": lb.short_id, "time": _iso(lb.time),
                     "databases": lb.databases, "globals": lb.globals_included}
                    for lb in cat.logical],
        "wal": wal_summary(cat),
        "windows": windows(cat),
        "restore_points": [{"name": p.name, "lsn": str(p.lsn), "time": _iso(p.time),
                            "timeline": p.timeline}
                           for p in sorted(cat.restore_points, key=lambda p: p.lsn)],
    }


def check(cat: Catalog, *, spool_status: dict[str, Any] | None = None,
          server: dict[str, Any] | None = None,
          unreadable: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """`info` plus a list of problems; ``ok`` is true when there is none. `unreadable`: per
    snapshot, the paths a restore could not read and why (`walindex.unreadable`)."""
    report = info(cat)
    problems: list[str] = []
    for sid, paths in sorted((unreadable or {}).items()):
        if sid not in cat.wal_snapshots:
            why = ("damaged" if DAMAGED in paths.values() else "chunks that no index lists")
            problems.append(f"snapshot {sid[:8]} cannot be read ({why}):"
                            f" {', '.join(list(paths)[:3])}")
            continue
        for reason in (DAMAGED, NOT_INDEXED):
            names = [p.rsplit("/", 1)[-1] for p, r in paths.items()
                     if r == reason and p.startswith("wal/")]
            if reason == NOT_INDEXED and any(p.startswith("(its") for p in paths):
                names = names or list(cat.wal_snapshots[sid])  # its trees: all of its files
            if not names:
                continue
            shown = f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            if reason == DAMAGED:
                problems.append(f"WAL file(s) {shown} of snapshot {sid[:8]} are damaged (a"
                                f" check found their data corrupt): {affected(cat, names)}")
            else:
                problems.append(f"WAL file(s) {shown} of snapshot {sid[:8]} cannot be read:"
                                " chunks that no index lists (a restore stops there; 'keepwell"
                                " prune' indexes stored packs again)")
    report["unreadable"] = {sid[:8]: list(paths) for sid, paths in (unreadable or {}).items()}
    if not cat.backups:
        problems.append("no physical backup: point-in-time restore is not possible")
    for entry in report["physical"]:
        if not entry["complete"]:
            problems.append(f"backup {entry['short_id']} is incomplete: WAL"
                            f" {entry['missing_wal'][0]} is missing")
    for gap in report["wal"]["gaps"]:
        problems.append(f"WAL gap on timeline {gap['timeline']}: {gap['from']} .. {gap['to']}")
    wins = report["windows"]
    if len(wins) > 1:
        problems.append(f"the restore window is split in {len(wins)} parts (see windows)")
    if spool_status is not None:
        report["spool"] = spool_status
        if spool_status.get("alert"):
            problems.append(f"spool alert: {spool_status['alert']}")
        if spool_status.get("rejected"):
            problems.append(f"{spool_status['rejected']} WAL file(s) were refused (see spool)")
    if server is not None:
        report["server"] = server
        if server.get("failed_count") and server.get("last_failed_time") and (
            not server.get("last_archived_time")
            or server["last_failed_time"] > server["last_archived_time"]
        ):
            problems.append(f"archive_command is failing: last failure on"
                            f" {server.get('last_failed_wal')}")
        current = server.get("current_segment")
        if current and wins:
            parsed = parse_segment_name(current, cat.segment_size)
            last = parse_segment_name(report["wal"]["timelines"].get(
                str(parsed[0]) if parsed else "", {}).get("last", ""), cat.segment_size)
            if parsed and last:
                report["archive_lag_segments"] = max(0, parsed[1] - last[1] - 1)
    report["problems"] = problems
    report["ok"] = not problems
    report["checked_at"] = datetime.now(UTC).isoformat()
    return report


def affected(cat: Catalog, names: list[str]) -> str:
    """What unreadable WAL files cost: the backups that cannot be restored, and where the
    others' roll-forward stops."""
    lost = {p[1]: n for n in names if (p := parse_segment_name(n, cat.segment_size))}
    unusable, stopped = [], []
    for b in cat.complete_backups():
        reach = cat.reach(b)
        lineage = cat.lineage(reach.timeline)
        hit = min((s for s, n in lost.items() if b.start_segno() <= s
                   < reach.end_lsn.segno(cat.segment_size)
                   and cat.segment_for(s, lineage) == n), default=None)
        if hit is None:
            continue
        if hit <= b.stop_segno():
            unusable.append(b.short_id)
        else:
            stopped.append(f"restores from backup {b.short_id} stop at"
                           f" {Lsn(hit * cat.segment_size)}")
    out = stopped
    if unusable:
        out.insert(0, f"backup {', '.join(unusable)} cannot be restored")
    if not out:
        return "no backup's restore window needs them"
    return "; ".join(out) + " (take a new physical backup to restore past them)"


def server_archiver(conn: Any) -> dict[str, Any]:
    """pg_stat_archiver and the current segment, from a live server."""
    row = conn.execute(
        "SELECT archived_count, last_archived_wal, last_archived_time, failed_count,"
        " last_failed_wal, last_failed_time,"
        " CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END"
        " FROM pg_stat_archiver"
    ).fetchone()
    keys = ["archived_count", "last_archived_wal", "last_archived_time", "failed_count",
            "last_failed_wal", "last_failed_time", "current_segment"]
    return dict(zip(keys, row, strict=True)) if row else {}
