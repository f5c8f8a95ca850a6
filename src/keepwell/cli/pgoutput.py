"""What ``keepwell postgres`` prints: the text renderings of info, check and restores.

Rendering only; the JSON forms are the dicts themselves (``--json``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import typer

from keepwell.cli.common import GLOBALS, human_bytes


def say(text: str) -> None:
    if not GLOBALS.quiet:
        typer.echo(text)


def render_physical_restore(result: Any, *, when: datetime | None, local: bool, standby: bool,
                            delta: bool, port: int | None) -> None:
    target = result.plan.target
    b = result.plan.backup
    say(f"restored backup {b.short_id} ({b.time:%Y-%m-%d %H:%M:%S} UTC) to {result.target_dir}:"
        f" {result.stats.files} files, {human_bytes(result.stats.bytes)}"
        + (f", {result.stats.written_files} rewritten" if delta else ""))
    point = result.plan.point
    say(("recovery: a standby, following the archived WAL" if standby else
         f"recovery target: {target.describe()}")
        + (f" (recorded at LSN {point.lsn}, {point.time:%Y-%m-%d %H:%M:%S})"
           if point is not None else "")
        + (f" (= {when.astimezone(UTC):%Y-%m-%d %H:%M:%S.%f} UTC; no zone given, so read in"
           f" the local zone {when.tzname()})" if when is not None and local else ""))
    if result.plan.gap and target.kind() == "end":
        typer.echo(f"keepwell: WARNING: WAL segment {result.plan.gap[0]} is missing: recovery"
                   f" stops there ({result.plan.wal_end}); the WAL archived after it, up to"
                   f" {result.plan.gap[1]}, is not replayed (--allow-gap)", err=True)
    if result.plan.note:
        typer.echo(f"keepwell: note: {result.plan.note}", err=True)
    if result.started and standby:
        say(f"standby started on port {port}: it replays the archived WAL and follows it as it"
            " grows")
    elif result.started:
        say(f"server started on port {port}: "
            + (result.stopped_at or f"recovered to the end of the archived WAL"
               f" ({result.redo_done_at or 'no WAL replayed'})"))
        if result.last_transaction_time:
            say(f"last replayed transaction committed at {result.last_transaction_time}")
    else:
        say("start the server to recover (pg_ctl -D DIR start), or pass --start")


def render_logical_restore(res: dict[str, Any]) -> None:
    if res["globals"]:
        say(f"restored globals (roles, tablespaces) from {res['snapshot']}")
    for db in res["databases"]:
        what = (f"table(s) {', '.join(db['tables'])} of " if db.get("tables")
                else f"schema(s) {', '.join(db['schemas'])} of " if db.get("schemas") else "")
        say(f"restored {what}database {db['database']} into {db['into']} from"
            f" {res['snapshot']}")
        for kind, names in (db.get("restored") or {}).items():
            say(f"  with {kind}: {', '.join(names)}")
        for line in db.get("skipped") or []:
            typer.echo(f"keepwell: note: skipped {line}", err=True)


def render_info(data: dict[str, Any]) -> None:
    typer.echo(f"cluster {data['cluster']} (system identifier {data['system_identifier']})")
    for b in data["physical"]:
        state = "complete" if b["complete"] else f"INCOMPLETE (missing {b['missing_wal'][0]})"
        typer.echo(f"  physical {b['short_id']}  {b['stop_time']}  tl {b['timeline']}"
                   f"  {b['start_lsn']}..{b['stop_lsn']}  {state}")
    for lb in data["logical"]:
        typer.echo(f"  logical  {lb['short_id']}  {lb['time']}  {', '.join(lb['databases'])}")
    for tli, t in data["wal"]["timelines"].items():
        typer.echo(f"  WAL timeline {tli}: {t['first']} .. {t['last']} ({t['segments']} segments)")
    for gap in data["wal"]["gaps"]:
        typer.echo(f"  WAL GAP timeline {gap['timeline']}: {gap['from']} .. {gap['to']}")
    for w in data["windows"]:
        typer.echo(f"  restore window: {w['from_time']} .. {w['to_time']} (LSN {w['from_lsn']}"
                   f" .. {w['to_lsn']}, timeline {w['timeline']})")
    for p in data.get("restore_points", []):
        typer.echo(f"  restore point {p['name']!r}  {p['time']}  LSN {p['lsn']}"
                   f"  tl {p['timeline']}")


def merged_spools(spools: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The spools of several repositories as one status (alerts named by repository)."""
    alerts = [f"{label}: {st['alert']}" for label, st in spools.items() if st.get("alert")]
    return {"ready_segments": sum(st["ready_segments"] for st in spools.values()),
            "ready_bytes": sum(st["ready_bytes"] for st in spools.values()),
            "rejected": sum(st["rejected"] for st in spools.values()),
            "alert": "; ".join(alerts) or None, "repositories": spools}
