"""``keepwell mysql``: logical and physical backups, binlog archiving and point-in-time restore
of MySQL/MariaDB.

Parsing and rendering only; the work is in `keepwell.sources.mysql`. The connection comes from
``--db-url`` (``mysql://user:pw@host:port/`` or ``mysql://user@localhost/?socket=PATH``), the
option file (``--defaults-file`` or ``~/.my.cnf``) and the MySQL environment (MYSQL_HOST,
MYSQL_TCP_PORT, MYSQL_PWD, USER). Snapshots are filed under the server's host name, or under
``--server-name`` when given.

Options that take several values (``--database``, ``--table``, ``--tag``) collect every one; a
single-valued option given twice is refused, as for every command (keepwell.cli.common).
"""

from __future__ import annotations

import signal
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from keepwell.cli.common import (
    GLOBALS,
    JsonOption,
    KeepDailyOption,
    KeepHourlyOption,
    KeepLastOption,
    KeepMonthlyOption,
    KeepTagOption,
    KeepWeeklyOption,
    KeepWithinDailyOption,
    KeepWithinHourlyOption,
    KeepWithinMonthlyOption,
    KeepWithinOption,
    KeepWithinWeeklyOption,
    KeepWithinYearlyOption,
    KeepYearlyOption,
    PasswordFileOption,
    RepoOption,
    human_bytes,
    keep_policy,
    open_repo,
    print_json,
    refuse_empty,
    resolve_repo,
    run_group,
    tags_given,
)
from keepwell.errors import UsageError

app = typer.Typer(
    help="Back up MySQL/MariaDB (logical dumps, physical copies, binlogs) and restore it to any"
    " point in time.",
    no_args_is_help=True,
)


DbUrlOption = Annotated[
    str | None,
    typer.Option("--db-url", envvar="KEEPWELL_MYSQL_URL",
                 help="mysql://user:pw@host:port/ or mysql://user@localhost/?socket=PATH."),
]
DefaultsFileOption = Annotated[
    str | None,
    typer.Option("--defaults-file", help="MySQL option file to read ([client] group)."),
]
def _server_name(value: str | None) -> str | None:
    """An empty --server-name (an empty variable) is refused, never taken for the host name."""
    refuse_empty("--server-name", value, "give the name, or leave the option out for the "
                                         "server's host name")
    return value


ServerNameOption = Annotated[
    str | None,
    typer.Option("--server-name", envvar="KEEPWELL_MYSQL_SERVER", callback=_server_name,
                 help="Name the server's snapshots are filed under (default: its host name)."),
]


def _settings(db_url: str | None, defaults_file: str | None) -> Any:
    from keepwell.sources.mysql.connection import resolve

    return resolve(db_url, defaults_file)


def _say(text: str) -> None:
    if not GLOBALS.quiet:
        typer.echo(text)


NewServerOption = Annotated[bool, typer.Option(
    "--new-server",
    help="This server now owns the server name: start a new history under it (another server,"
         " or this one after its binary log was reset). Without it such a server is refused.")]


def _parse_time(text: str) -> tuple[datetime, str]:
    """The absolute time of a ``--target-time``, and a line saying how it was read: a time
    without a zone is in the local zone (``TZ``)."""
    try:
        dt = datetime.fromisoformat(text.strip().replace(" UTC", "+00:00"))
    except ValueError:
        raise UsageError(f"invalid time {text!r} (use ISO 8601, e.g. 2026-11-24T17:05:00Z)"
                         ) from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # the local zone, as TZ says
        how = f"read in the local zone ({dt.tzname()}, UTC{dt.strftime('%z')})"
    else:
        how = "as given"
    exact = dt.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return dt, f"target time {exact} ({text.strip()} {how})"


# --- backup ---------------------------------------------------------------------------------------
@app.command()
def backup(
    logical: Annotated[bool, typer.Option("--logical", help="mariadb-dump of databases.")] = False,
    physical: Annotated[bool, typer.Option("--physical", help="mariabackup copy.")] = False,
    database: Annotated[list[str] | None, typer.Option(
        "--database", "-d", help="Database to dump (repeatable; default: all).")] = None,
    users: Annotated[bool, typer.Option(
        "--users/--no-users", help="Include accounts and grants (logical).")] = True,
    retries: Annotated[int, typer.Option(
        help="Dump again this often if DDL breaks the dump.")] = 3,
    tag: Annotated[list[str] | None, typer.Option("--tag")] = None,
    db_url: DbUrlOption = None,
    defaults_file: DefaultsFileOption = None,
    server_name: ServerNameOption = None,
    new_server: NewServerOption = False,
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Take a logical (--logical) or physical (--physical) backup."""
    from keepwell.sources.mysql.logical import begin_logical
    from keepwell.sources.mysql.physical import begin_physical

    if logical == physical:
        raise UsageError("give exactly one of --logical and --physical")
    if physical and database:
        raise UsageError("--database applies to --logical backups")
    settings = _settings(db_url, defaults_file)
    tags = tuple(tags_given("--tag", tag))
    resolve_repo(repo)  # a missing repository is reported before the server is touched
    # the tool starts first and works while the repository opens
    job: Any = (begin_logical(settings, databases=database, users=users) if logical
                else begin_physical(settings))
    try:
        with open_repo(repo, password_file) as r:
            if logical:
                res = job.store(r, host=server_name, tags=tags, retries=retries,
                                new_server=new_server)
                snap, notes = res.snapshot, res.notes
            else:
                snap = job.store(r, host=server_name, tags=tags, new_server=new_server)
                notes = job.notes
    finally:
        job.close()
    src, summ = snap.source, snap.summary
    if json_out:
        print_json({"snapshot": snap.id, "short_id": snap.short_id, "kind": snap.kind,
                    "host": snap.host, "source": src, "summary": summ, "notes": notes})
        return
    for note in notes:
        _say(f"note: {note}")
    pos = f"{src.get('binlog_file')}:{src.get('binlog_pos')}" if src.get("binlog_file") else "-"
    _say(f"snapshot {snap.short_id} saved ({snap.kind}): {human_bytes(summ['bytes_read'])} read,"
         f" {human_bytes(summ['bytes_added'])} new, {human_bytes(summ['bytes_stored'])} stored;"
         f" consistent at {pos} gtid {src.get('gtid') or '-'}")


# --- restore --------------------------------------------------------------------------------------
@app.command()
def restore(
    snapshot: Annotated[str | None, typer.Option(
        "--snapshot", help="Base to restore (default: latest, or what the target needs).")] = None,
    target_time: Annotated[str | None, typer.Option(
        help="Recover to this time (ISO 8601; without a zone, the local one).")] = None,
    target_position: Annotated[str | None, typer.Option(
        help="Recover up to this binlog position, FILE:OFFSET (exclusive).")] = None,
    target_gtid: Annotated[str | None, typer.Option(
        help="Recover up to and including this GTID.")] = None,
    target_db_url: Annotated[str | None, typer.Option(
        help="Running server to restore a logical dump into.")] = None,
    target_defaults_file: Annotated[str | None, typer.Option(
        help="Option file for the target server.")] = None,
    target_dir: Annotated[str | None, typer.Option(
        help="Empty datadir to restore a physical backup into.")] = None,
    database: Annotated[list[str] | None, typer.Option(
        "--database", "-d", help="Database to restore (repeatable; default: all).")] = None,
    table: Annotated[list[str] | None, typer.Option(
        "--table", "-t", help="Table or view of the --database to restore (repeatable).")] = None,
    users: Annotated[bool, typer.Option(
        "--users/--no-users", help="Restore accounts and grants too.")] = True,
    owner: Annotated[str | None, typer.Option(
        help="Owner of the restored datadir (default: mysql when run as root).")] = None,
    start: Annotated[bool, typer.Option("--start", help="Start a server on the datadir.")] = False,
    port: Annotated[int | None, typer.Option(
        "--port", min=1, max=65535,
        help="Port for --start (default 3306; refused if in use).")] = None,
    server_name: ServerNameOption = None,
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Restore a base backup, optionally rolled forward to a point in time."""
    from keepwell.sources.mysql.connection import resolve
    from keepwell.sources.mysql.operations import restore as do_restore
    from keepwell.sources.mysql.plan import Target

    when, how = _parse_time(target_time) if target_time else (None, "")
    target = Target.of(when, target_position, target_gtid)
    target_db = None
    if target_db_url or target_defaults_file:
        target_db = resolve(target_db_url, target_defaults_file)
    if start and target_dir is None:
        raise UsageError("--start needs --target-dir")
    if port is not None and not start:
        raise UsageError("--port is the port --start starts the restored server on",
                         hint="add --start, or leave --port out")
    if how and not json_out:
        _say(how)
    with open_repo(repo, password_file) as r:
        res = do_restore(r, snapshot=snapshot, target=target, target_db=target_db,
                         target_dir=target_dir, databases=database, tables=table, users=users,
                         start=start, port=port, owner=owner, host=server_name,
                         progress=(lambda m: None) if json_out else _say)
    if json_out:
        out = dict(res.__dict__)
        if when is not None:
            out["target_time"] = when.astimezone(UTC).isoformat()
        print_json(out)
        return
    _say(f"restored {res.kind} {res.snapshot}"
         + (f", replayed to {res.plan['stop']}" if res.plan else "")
         + (f"; server running (pid {res.server_pid}, port {res.port})" if res.server_pid else ""))


# --- binlogs --------------------------------------------------------------------------------------
@app.command("binlog-push")
def binlog_push(
    binlog_dir: Annotated[str | None, typer.Option(
        help="Directory of the binlogs (default: the server's log_bin_basename).")] = None,
    include_current: Annotated[bool, typer.Option(
        help="Store the file being written too.")] = False,
    flush: Annotated[bool, typer.Option(
        "--flush", help="FLUSH BINARY LOGS first, closing the current file.")] = False,
    db_url: DbUrlOption = None,
    defaults_file: DefaultsFileOption = None,
    server_name: ServerNameOption = None,
    new_server: NewServerOption = False,
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Store the closed binlogs from the server's binlog directory."""
    from keepwell.sources.mysql.archive import push_binlogs

    settings = _settings(db_url, defaults_file)
    with open_repo(repo, password_file) as r:
        res = push_binlogs(r, settings, binlog_dir=binlog_dir, include_current=include_current,
                           host=server_name, flush=flush, new_server=new_server)
    if json_out:
        print_json(res.__dict__)
        return
    for note in res.notes:
        _say(f"note: {note}")
    _say(f"stored {len(res.stored)} binlog(s)"
         + (f" ({res.stored[0]} .. {res.stored[-1]})" if res.stored else "")
         + f", {len(res.skipped)} already archived")
    for gap in res.gaps:
        typer.echo(f"GAP: binlogs missing between {gap['after']} and {gap['before']}", err=True)


@app.command("binlog-stream")
def binlog_stream(
    spool: Annotated[str | None, typer.Option(
        "--spool", envvar="KEEPWELL_MYSQL_SPOOL",
        help="Directory for the files being received (default: a temporary one).")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between uploads.")] = 10.0,
    client_server_id: Annotated[int, typer.Option(
        help="Server id the stream uses on the replication connection.")] = 65535,
    db_url: DbUrlOption = None,
    defaults_file: DefaultsFileOption = None,
    server_name: ServerNameOption = None,
    new_server: NewServerOption = False,
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
) -> None:
    """Follow the binlog over the replication protocol and archive it until stopped."""
    import tempfile

    from keepwell.sources.mysql.archive import BinlogStreamer, StreamEvents

    settings = _settings(db_url, defaults_file)

    def on_gap(missing: list[str]) -> None:
        typer.echo(f"GAP: {', '.join(missing)} purged by the server before they were archived",
                   err=True)

    events = StreamEvents(
        stored=lambda names: _say(f"stored {', '.join(names)}"),
        reconnect=lambda why: typer.echo(f"reconnecting: {why}", err=True),
        gap=on_gap,
        note=lambda text: _say(f"note: {text}"),
    )
    with open_repo(repo, password_file) as r, tempfile.TemporaryDirectory(
            prefix="keepwell-binlog-spool-") as tmp:
        streamer = BinlogStreamer(r, settings, spool or tmp, host=server_name,
                                  interval=interval, client_server_id=client_server_id,
                                  events=events, new_server=new_server)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: streamer.stop())
        streamer.run()
    if streamer.gaps:
        raise typer.Exit(3)


# --- reports and retention ------------------------------------------------------------------------
@app.command()
def info(
    server_name: ServerNameOption = None,
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """List base backups, archived binlogs and the point-in-time window."""
    from keepwell.sources.mysql.operations import check as build

    with open_repo(repo, password_file) as r:
        data = build(r, host=server_name)
    if json_out:
        print_json(data)
        return
    _render(data)


def _render(data: dict[str, Any]) -> None:
    from keepwell.sources.mysql.identity import describe_server

    histories = data.get("histories") or []
    if len(histories) > 1:
        for h in histories:
            typer.echo(f"  history {h['history']}{' (current)' if h['current'] else ''}: "
                       f"{describe_server(h['server'])}; {h['bases']} base(s), {h['binlogs']} "
                       f"binlog(s){'' if h['declared'] or h is histories[0] else '; NOT declared'}")
    for b in data["bases"]:
        reach = f"reaches {b['reach']}" if b["reach"] else "no binlogs from it"
        typer.echo(f"  {b['kind']:<14} {b['snapshot']}  {b['time']}  at {b['position'] or '-'}"
                   f"  gtid {b['gtid'] or '-'}  {reach}")
    bl = data["binlogs"]
    typer.echo(f"  binlogs: {bl['files']} file(s) {bl['first'] or ''} .. {bl['last'] or ''},"
               f" last event {bl['last_event'] or '-'}, synced {bl['synced_at'] or '-'}")
    for gap in data["gaps"]:
        typer.echo(f"  GAP after {gap['after']}: missing {', '.join(gap['missing'])}")
    w = data["window"]
    typer.echo(f"  point-in-time window: {w['from'] or '-'} .. {w['to'] or '-'}")


@app.command()
def check(
    server_name: ServerNameOption = None,
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Check binlog continuity from every base to now; exit 1 on a gap."""
    from keepwell.sources.mysql.operations import check as build

    with open_repo(repo, password_file) as r:
        data = build(r, host=server_name)
    if json_out:
        print_json(data)
    else:
        _render(data)
        for p in data["problems"]:
            typer.echo(f"PROBLEM: {p}")
        if data["ok"]:
            typer.echo("ok: binlogs are continuous from every base")
    if not data["ok"]:
        raise typer.Exit(1)


@app.command()
def forget(
    keep_last: KeepLastOption = 0, keep_hourly: KeepHourlyOption = 0,
    keep_daily: KeepDailyOption = 0, keep_weekly: KeepWeeklyOption = 0,
    keep_monthly: KeepMonthlyOption = 0, keep_yearly: KeepYearlyOption = 0,
    keep_within: KeepWithinOption = None, keep_within_hourly: KeepWithinHourlyOption = None,
    keep_within_daily: KeepWithinDailyOption = None,
    keep_within_weekly: KeepWithinWeeklyOption = None,
    keep_within_monthly: KeepWithinMonthlyOption = None,
    keep_within_yearly: KeepWithinYearlyOption = None, keep_tag: KeepTagOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n")] = False,
    server_name: ServerNameOption = None,
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Forget bases outside a --keep-* policy (logical and physical bases each on their own;
    with --keep-within also the base the window starts from) and the binlogs no kept base
    needs (space returns with prune)."""
    from keepwell.sources.mysql.operations import forget_plan

    policy = keep_policy(locals())
    with open_repo(repo, password_file) as r:
        plan = forget_plan(r, policy, host=server_name)
        if not dry_run:
            r.forget(plan.ids())
    if json_out:
        print_json({**plan.as_dict(), "dry_run": dry_run})
        return
    verb = "would forget" if dry_run else "forgot"
    for sid, why in plan.kept.items():
        _say(f"keep   {sid[:8]}  {', '.join(why)}")
    for sid in plan.bases:
        _say(f"{verb} {sid[:8]}")
    _say(f"{verb} {len(plan.bases)} base(s) and {len(plan.binlogs)} binlog snapshot(s); "
         f"binlogs kept from {plan.binlog_floor or '(all)'}")


def main() -> int:
    """Run this group on its own (``python -m keepwell.cli.mysql``)."""
    return run_group(app)


if __name__ == "__main__":
    sys.exit(main())
