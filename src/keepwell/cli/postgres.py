"""``keepwell postgres``: backups, WAL archiving and point-in-time restore of PostgreSQL.

Parsing and rendering only; the work is in `keepwell.sources.postgres`. The connection comes
from ``--db-url`` or the libpq environment (PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD);
the cluster name from ``--cluster`` or ``KEEPWELL_PG_CLUSTER`` (default ``main``).
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from typing import Annotated, Any

import typer

from keepwell.cli.common import (
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
    password_file_given,
    password_source,
    print_json,
    repo_given,
    resolve_password,
    resolve_repo,
    run_group,
    tags_given,
)
from keepwell.cli.pgoutput import (
    merged_spools,
    render_info,
    render_logical_restore,
    render_physical_restore,
    say,
)
from keepwell.errors import UsageError
from keepwell.units import parse_size

app = typer.Typer(
    help="Back up PostgreSQL (logical dumps, physical base backups, WAL) and restore it to any"
    " point in time.",
    no_args_is_help=True,
)

DbUrlOption = Annotated[
    str | None,
    typer.Option("--db-url", envvar="KEEPWELL_PG_URL",
                 help="libpq URL or conninfo; default: the PG* environment."),
]
ClusterOption = Annotated[
    str, typer.Option("--cluster", envvar="KEEPWELL_PG_CLUSTER",
                      help="Name of the cluster in the repository.")
]
SpoolOption = Annotated[
    str | None, typer.Option("--spool", envvar="KEEPWELL_PG_SPOOL",
                             help="Local spool directory for asynchronous archiving.")
]


def _spec(db_url: str | None) -> Any:
    from keepwell.sources.postgres.connection import ConnSpec

    return ConnSpec.from_url(db_url)


def _parse_time(text: str) -> tuple[datetime, bool]:
    """The time and whether it was given without a zone (then it is read in the local zone,
    ``TZ``, as PostgreSQL reads a ``recovery_target_time`` without one in its own zone)."""
    try:
        dt = datetime.fromisoformat(text.strip().replace(" UTC", "+00:00"))
    except ValueError:
        raise UsageError(
            f"invalid time {text!r} (use ISO 8601, e.g. 2026-11-24T17:05:00Z)"
        ) from None
    if dt.tzinfo:
        return dt, False
    return dt.astimezone(), True


# --- backup ---
@app.command()
def backup(
    logical: Annotated[bool, typer.Option("--logical", help="pg_dump of databases.")] = False,
    physical: Annotated[bool, typer.Option(
        "--physical", help="Base backup of the whole cluster.")] = False,
    method: Annotated[str, typer.Option(
        "--method", metavar="auto|copy|stream",
        help="Physical: copy the data directory here (copy), through pg_basebackup (stream), or "
             "copy when this host can read the cluster's files (auto).")] = "auto",
    database: Annotated[list[str] | None, typer.Option(
        "--database", "-d", help="Database to dump (repeat; default: all + globals).")] = None,
    globals_: Annotated[bool | None, typer.Option(
        "--globals/--no-globals", help="Include roles and tablespaces.")] = None,
    wait_timeout: Annotated[float, typer.Option(
        help="Seconds to wait for the backup's WAL to be archived.")] = 120.0,
    tag: Annotated[list[str] | None, typer.Option("--tag")] = None,
    db_url: DbUrlOption = None,
    cluster: ClusterOption = "main",
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Take a logical (--logical) or physical (--physical) backup."""
    if logical == physical:
        raise UsageError("choose one of --logical or --physical")
    tags = tuple(tags_given("--tag", tag))
    spec = _spec(db_url)
    with open_repo(repo, password_file) as r:
        if logical:
            from keepwell.sources.postgres.logical import backup_logical

            res = backup_logical(r, spec, cluster, databases=database or None,
                                 include_globals=globals_, tags=tags)
            out: dict[str, Any] = {"snapshot": res.snapshot_id, "databases": res.databases,
                                   "globals": res.globals_included, "bytes": res.bytes,
                                   "seconds": round(res.seconds, 2)}
            text = (f"logical backup {res.short_id}: {', '.join(res.databases)}"
                    f"{' + globals' if res.globals_included else ''},"
                    f" {human_bytes(res.bytes)} in {res.seconds:.1f} s")
        else:
            from keepwell.sources.postgres.physical import backup_physical

            pres = backup_physical(r, spec, cluster, wait_timeout=wait_timeout,
                                   tags=tags, method=method)
            out = {"snapshot": pres.snapshot_id, "timeline": pres.timeline,
                   "start_lsn": str(pres.start_lsn), "stop_lsn": str(pres.stop_lsn),
                   "bytes": pres.bytes, "seconds": round(pres.seconds, 2), "complete": True,
                   "method": pres.method}
            text = (f"physical backup {pres.short_id}: timeline {pres.timeline},"
                    f" LSN {pres.start_lsn} .. {pres.stop_lsn}, {human_bytes(pres.bytes)} in"
                    f" {pres.seconds:.1f} s ({pres.method}), complete (all WAL archived)")
    print_json(out) if json_out else say(text)


# --- restore ---
@app.command()
def restore(
    target_dir: Annotated[str | None, typer.Option(
        "--target-dir", help="Data directory to write (physical restore).")] = None,
    snapshot: Annotated[str | None, typer.Option("--snapshot", help="Backup to restore.")] = None,
    target_time: Annotated[str | None, typer.Option(help="Recover to this time.")] = None,
    target_lsn: Annotated[str | None, typer.Option(help="Recover to this LSN.")] = None,
    target_xid: Annotated[int | None, typer.Option(help="Recover to this transaction.")] = None,
    target_name: Annotated[str | None, typer.Option(help="Recover to a restore point.")] = None,
    immediate: Annotated[bool, typer.Option(
        "--immediate", help="Stop as soon as the backup is consistent.")] = False,
    target_timeline: Annotated[str | None, typer.Option(
        help="'latest' (default), 'current' or a number.")] = None,
    exclusive: Annotated[bool, typer.Option(
        "--exclusive", help="Stop just before the target, not after it.")] = False,
    delta: Annotated[bool, typer.Option(
        "--delta", help="Restore into an existing data directory, rewriting what differs.")
    ] = False,
    tablespace_map: Annotated[list[str] | None, typer.Option(
        "--tablespace-map", help="NAME_OR_OID=DIR: restore this tablespace to DIR (repeat);"
        " by default each tablespace stays inside the data directory.")] = None,
    tablespace_map_all: Annotated[str | None, typer.Option(
        "--tablespace-map-all", help="Restore every tablespace to DIR/<oid>.")] = None,
    allow_gap: Annotated[bool, typer.Option(
        "--allow-gap", help="Restore to the end of the WAL even though a gap stops it short.")
    ] = False,
    standby: Annotated[bool, typer.Option(
        "--standby", help="A standby that follows the archive (standby.signal; no target).")
    ] = False,
    start: Annotated[bool, typer.Option("--start", help="Start the server and wait.")] = False,
    port: Annotated[int | None, typer.Option(
        "--port", min=1, max=65535, help="Port for --start.")] = None,
    archive_mode: Annotated[str, typer.Option(
        help="'off' (the restored server does not archive) or 'preserve'.")] = "off",
    logical: Annotated[bool, typer.Option(
        "--logical", help="Restore a logical dump into a running server.")] = False,
    database: Annotated[list[str] | None, typer.Option(
        "--database", "-d", help="Database to restore (repeat).")] = None,
    all_databases: Annotated[bool, typer.Option(
        "--all", help="Restore the globals and every database of the dump (creating the"
                      " databases that are missing).")] = False,
    into: Annotated[str | None, typer.Option(help="Restore into this database.")] = None,
    schema: Annotated[list[str] | None, typer.Option(
        "--schema", "-n", help="Only this schema (repeat).")] = None,
    table: Annotated[list[str] | None, typer.Option(
        "--table", "-t", help="Only this table, with its constraints, indexes, triggers,"
                              " sequences and comments (repeat).")] = None,
    create: Annotated[bool, typer.Option("--create", help="Create the database.")] = False,
    clean: Annotated[bool, typer.Option("--clean", help="Drop objects first.")] = False,
    globals_: Annotated[bool, typer.Option("--globals", help="Restore roles too.")] = False,
    db_url: DbUrlOption = None,
    cluster: ClusterOption = "main",
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Restore a logical dump (--logical) or a physical backup to a point in time."""
    physical_only = {"--target-dir": target_dir, "--target-time": target_time,
                     "--target-lsn": target_lsn, "--target-xid": target_xid,
                     "--target-name": target_name, "--immediate": immediate,
                     "--target-timeline": target_timeline, "--exclusive": exclusive,
                     "--delta": delta, "--tablespace-map": tablespace_map,
                     "--tablespace-map-all": tablespace_map_all, "--allow-gap": allow_gap,
                     "--start": start, "--port": port, "--standby": standby}
    logical_only = {"--database": database, "--all": all_databases, "--into": into,
                    "--schema": schema, "--table": table, "--create": create, "--clean": clean,
                    "--globals": globals_}
    wrong = [k for k, v in (physical_only if logical else logical_only).items() if v]
    if wrong:
        raise UsageError(f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not for a"
                         f" {'logical' if logical else 'physical'} restore",
                         hint="see 'keepwell postgres restore --help'")
    if logical:
        _restore_logical(_spec(db_url), cluster, snapshot, json_out, repo, password_file,
                         databases=list(database or []), all_databases=all_databases,
                         restore_globals=globals_, into=into, schemas=list(schema or []),
                         tables=list(table or []), create=create, clean=clean)
        return
    if not target_dir:
        raise UsageError("give --target-dir for a physical restore (or --logical)")
    if port is not None and not start:
        raise UsageError("--port is the port --start starts the restored server on",
                         hint="add --start, or leave --port out and start it yourself")
    from keepwell.sources.postgres.plan import Target
    from keepwell.sources.postgres.restore import RestoreOptions, restore_physical
    from keepwell.sources.postgres.restorepoint import MAX_NAME
    from keepwell.sources.postgres.walnames import Lsn

    try:
        lsn = Lsn.parse(target_lsn) if target_lsn else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    when, local = _parse_time(target_time) if target_time else (None, False)
    if target_name is not None and not 0 < len(target_name.encode()) <= MAX_NAME:
        # PostgreSQL reads an empty recovery_target_name as no target at all (recovery to the
        # end of the WAL), and refuses to start with a longer one
        raise UsageError(f"invalid --target-name {target_name!r}: a restore point's name has"
                         f" 1 to {MAX_NAME} bytes")
    target = Target(time=when, lsn=lsn, xid=target_xid, name=target_name, immediate=immediate,
                    timeline=target_timeline, exclusive=exclusive)
    ts_map: dict[str, str] = {}
    for item in tablespace_map or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"invalid --tablespace-map {item!r} (use NAME_OR_OID=DIR)")
        if key in ts_map and ts_map[key] != value:
            raise UsageError(f"--tablespace-map names tablespace {key} twice")
        ts_map[key] = value
    if archive_mode not in ("off", "preserve"):
        raise UsageError("--archive-mode is 'off' or 'preserve'")
    pw_file, password = password_source(password_file_given(password_file))
    location = resolve_repo(repo)
    opts = RestoreOptions(
        target_dir=target_dir, target=target, snapshot=snapshot, delta=delta,
        tablespace_map=ts_map, tablespace_map_all=tablespace_map_all, allow_gap=allow_gap,
        standby=standby, start=start, port=port, archive_mode=archive_mode,
        repo_location=os.path.abspath(location) if "://" not in location else location,
        password_file=pw_file, password=None if pw_file else password or resolve_password(None),
    )
    with open_repo(repo, password_file) as r:
        result = restore_physical(r, cluster, opts)
    if json_out:
        print_json(result.as_dict())
        return
    render_physical_restore(result, when=when, local=local, standby=standby, delta=delta,
                            port=port)


def _restore_logical(spec: Any, cluster: str, snapshot: str | None, json_out: bool,
                     repo: str | None, password_file: str | None, **request: Any) -> None:
    from keepwell.sources.postgres.logicalrestore import LogicalRequest, restore_logical

    with open_repo(repo, password_file) as r:
        res = restore_logical(r, spec, cluster, LogicalRequest(**request),
                              snapshot=snapshot or "latest")
    if json_out:
        print_json(res)
    else:
        render_logical_restore(res)


@app.command("restore-point")
def restore_point(
    name: Annotated[str, typer.Argument(help="Name of the restore point.")],
    db_url: DbUrlOption = None,
    cluster: ClusterOption = "main",
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Create a named restore point on the server and record its position for restores."""
    from keepwell.sources.postgres.restorepoint import create_restore_point

    with open_repo(repo, password_file) as r:
        res = create_restore_point(r, _spec(db_url), cluster, name)
    if json_out:
        print_json(res.as_dict())
    else:
        say(f"restore point {res.name!r} at LSN {res.lsn} (timeline {res.timeline},"
             f" {res.time:%Y-%m-%d %H:%M:%S %Z}); restore to it with --target-name {res.name}")


# --- WAL ---
def _hook_settings(repo: str | None, password_file: str | None, cluster: str,
                   spool: str | None = None, spool_max: str | None = None) -> Any:
    from keepwell.sources.postgres.hooks import HookSettings

    return HookSettings.resolve(repo_given(repo), password_file_given(password_file),
                                cluster, spool, spool_max)


@app.command("wal-push")
def wal_push(
    path: Annotated[str, typer.Argument(help="%p of archive_command.")],
    asynchronous: Annotated[bool, typer.Option(
        "--async", help="Acknowledge from the local spool; upload in the background.")] = False,
    spool: SpoolOption = None,
    spool_max: Annotated[str | None, typer.Option(help="Spool bound, e.g. 4G.")] = None,
    cluster: ClusterOption = "main",
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
) -> None:
    """Archive one WAL file (for archive_command)."""
    from keepwell.sources.postgres.hooks import push

    push(path, _hook_settings(repo, password_file, cluster, spool, spool_max),
         asynchronous=asynchronous)


@app.command("wal-fetch")
def wal_fetch(
    name: Annotated[str, typer.Argument(help="%f of restore_command.")],
    dest: Annotated[str, typer.Argument(help="%p of restore_command.")],
    prefetch: Annotated[int, typer.Option(help="Segments to fetch ahead.")] = 16,
    tablespaces: Annotated[str | None, typer.Option(
        "--tablespaces", metavar="inside|as-recorded",
        help="Where tablespaces the replayed WAL creates go: in the data directory, or at the"
             " location in the WAL (refused when a running server uses it).")] = None,
    tablespace_map: Annotated[list[str] | None, typer.Option(
        "--tablespace-map", help="OID=DIR for a tablespace the WAL creates (repeat).")] = None,
    tablespace_map_all: Annotated[str | None, typer.Option("--tablespace-map-all")] = None,
    timeline: Annotated[str | None, typer.Option(help="The timeline recovery follows.")] = None,
    allow_gap: Annotated[bool, typer.Option(
        "--allow-gap", help="End recovery at a gap in the archive instead of failing.")
    ] = False,
    target: Annotated[str | None, typer.Option(
        "--target", metavar="end|point",
        help="Recovery runs to the end of the archive (a gap or damage aborts it) or toward a"
             " point before it.")] = None,
    cluster: ClusterOption = "main",
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
) -> None:
    """Fetch one WAL file (for restore_command): exits 1 when it is not archived (the end of
    the WAL) and 126 on any other failure, which makes recovery stop with an error."""
    from keepwell.errors import KeepwellError
    from keepwell.sources.postgres.errors import WalNotFoundError
    from keepwell.sources.postgres.hooks import FETCH_FAILED, fetch

    try:
        fetch(name, dest, _hook_settings(repo, password_file, cluster), prefetch=prefetch,
              policy={"tablespaces": tablespaces, "tablespace_map": tablespace_map,
                      "tablespace_map_all": tablespace_map_all, "timeline": timeline,
                      "allow_gap": allow_gap, "target": target})
    except WalNotFoundError:
        raise
    except (KeepwellError, OSError) as exc:
        typer.echo(f"keepwell: {exc.line() if isinstance(exc, KeepwellError) else exc}",
                   err=True)
        raise typer.Exit(FETCH_FAILED) from None


@app.command("wal-upload")
def wal_upload(
    spool: SpoolOption = None,
    pg_wal: Annotated[str | None, typer.Option(help="pg_wal to upload ahead from.")] = None,
    daemon: Annotated[bool, typer.Option("--daemon", help="Keep running when idle.")] = False,
    cluster: ClusterOption = "main",
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
) -> None:
    """Run the background uploader of asynchronous archiving in the foreground."""
    from keepwell.sources.postgres.uploader import run_uploader

    run_uploader(_hook_settings(repo, password_file, cluster, spool), pg_wal=pg_wal,
                 daemon=daemon)


@app.command("archive-command")
def archive_command(
    asynchronous: Annotated[bool, typer.Option(
        "--async", help="Acknowledge from the local spool; upload in the background.")] = False,
    spool: SpoolOption = None,
    spool_max: Annotated[str | None, typer.Option(help="Spool bound, e.g. 4G.")] = None,
    also_repo: Annotated[list[str] | None, typer.Option(
        "--also-repo", help="Archive into this repository too (repeat; with --async each gets"
                            " its own spool and bound).")] = None,
    also_password_file: Annotated[list[str] | None, typer.Option(
        "--also-password-file", help="Password file of each --also-repo, in order (default:"
                                     " the first repository's).")] = None,
    cluster: ClusterOption = "main",
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Print the archive_command line for postgresql.conf (with the shell fast path)."""
    from keepwell.sources.postgres.commands import archive_command as build
    from keepwell.sources.postgres.commands import conf_line

    if asynchronous and not spool:
        raise UsageError("--async needs a spool directory",
                         hint="pass --spool DIR (a local directory the server's user owns)")
    if spool_max is not None:
        parse_size(spool_max, "--spool-max")
    extra_pw = list(also_password_file or [])
    if extra_pw and len(extra_pw) != len(also_repo or []):
        raise UsageError("give one --also-password-file per --also-repo, or none")
    first_repo = repo_given(repo)
    first_pw = password_file_given(password_file)
    if also_repo and not first_repo:
        raise UsageError("--also-repo needs the first repository (--repo)")
    if extra_pw and not first_pw:
        raise UsageError("--also-password-file needs the first repository's --password-file")
    line = build(asynchronous=asynchronous, spool=spool, spool_max=spool_max, cluster=cluster,
                 repo=first_repo, password_file=first_pw,
                 also=[(r, extra_pw[i] if extra_pw else None)
                       for i, r in enumerate(also_repo or [])])
    if json_out:
        print_json({"archive_command": line})
    else:
        typer.echo(conf_line("archive_command", line))


@app.command("wal-stream")
def wal_stream(
    directory: Annotated[str, typer.Option(
        "--dir", help="Local directory pg_receivewal writes to.")],
    slot: Annotated[str, typer.Option(help="Replication slot (created if missing).")
                    ] = "keepwell",
    synchronous: Annotated[bool, typer.Option(
        "--synchronous", help="Flush and confirm at once (for synchronous_standby_names).")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between uploads.")] = 0.5,
    exit_on_disconnect: Annotated[bool, typer.Option(
        "--exit-on-disconnect", help="Stop when the server goes away.")] = False,
    db_url: DbUrlOption = None,
    cluster: ClusterOption = "main",
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
) -> None:
    """Stream WAL with pg_receivewal into the repository (RPO under a second)."""
    from keepwell.sources.postgres.stream import WalStreamer

    with open_repo(repo, password_file) as r:
        streamer = WalStreamer(r, _spec(db_url), cluster, directory, slot=slot,
                               synchronous=synchronous, interval=interval,
                               on_event=lambda m: typer.echo(f"keepwell: {m}", err=True))
        stats = streamer.run(exit_on_disconnect=exit_on_disconnect)
    say(f"streamed {stats.segments} segments, {stats.partial_uploads} partial uploads")


# --- info, check, forget ---
def _catalog(r: Any, cluster: str) -> Any:
    from keepwell.sources.postgres.catalog import Catalog

    return Catalog.build(r.list_snapshots(), cluster)


@app.command()
def info(
    cluster: ClusterOption = "main",
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """List backups, archived WAL and restore windows."""
    from keepwell.sources.postgres.report import info as build_info

    with open_repo(repo, password_file) as r:
        data = build_info(_catalog(r, cluster))
    if json_out:
        print_json(data)
        return
    render_info(data)


@app.command()
def check(
    spool: SpoolOption = None,
    db_url: DbUrlOption = None,
    cluster: ClusterOption = "main",
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Check WAL continuity, backups' completeness, that every WAL file and backup can be read
    as a restore reads it, and the restore window; exit 1 on problems."""
    from keepwell.sources.postgres.report import check as build_check
    from keepwell.sources.postgres.report import server_archiver

    spool_status = None
    if spool:
        from keepwell.sources.postgres.fanout import spool_dirs
        from keepwell.sources.postgres.spool import WalSpool

        spools = {label: WalSpool(d).status().as_dict() for label, d in spool_dirs(spool)}
        spool_status = spools.get("spool") or merged_spools(spools)
    server = None
    if db_url or os.environ.get("PGHOST") or os.environ.get("PGPORT"):
        from keepwell.sources.postgres.connection import connect

        with connect(_spec(db_url)) as conn:
            server = server_archiver(conn)
    from keepwell.sources.postgres.walindex import unreadable

    with open_repo(repo, password_file) as r:
        cat = _catalog(r, cluster)
        ids = [*cat.wal_snapshots, *(b.snapshot_id for b in cat.backups)]
        data = build_check(cat, spool_status=spool_status, server=server,
                           unreadable=unreadable(r, ids))
    if json_out:
        print_json(data)
    else:
        render_info(data)
        for p in data["problems"]:
            typer.echo(f"PROBLEM: {p}")
        if data["ok"]:
            typer.echo("ok: every backup is complete and the WAL has no gap")
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
    cluster: ClusterOption = "main",
    repo: RepoOption = None,
    password_file: PasswordFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Forget backups outside a --keep-* policy (base backups and dumps each on their own; with
    --keep-within also the base the window starts from) and the WAL no kept backup needs
    (space returns with prune)."""
    from keepwell.sources.postgres.retention import plan_forget

    policy = keep_policy(locals())
    if policy.empty():
        raise UsageError("no --keep-* policy given: refusing to forget every backup")
    with open_repo(repo, password_file) as r:
        plan = plan_forget(_catalog(r, cluster), policy)
        if not dry_run:
            r.forget(plan.ids())
    data = {**plan.as_dict(), "dry_run": dry_run}
    if json_out:
        print_json(data)
    else:
        verb = "would forget" if dry_run else "forgot"
        for sid, why in plan.kept.items():
            say(f"keep   {sid[:8]}  {', '.join(why)}")
        say(f"{verb} {len(plan.physical)} physical, {len(plan.logical)} logical backups and"
            f" {len(plan.wal)} WAL snapshots; kept {len(plan.kept_physical)} physical backups,"
            f" WAL from segment {plan.wal_floor or '(all)'}")


def main() -> int:
    """Run this group on its own (``python -m keepwell.cli.postgres``)."""
    return run_group(app)


if __name__ == "__main__":
    sys.exit(main())
