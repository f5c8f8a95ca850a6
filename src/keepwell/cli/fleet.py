"""Fleet commands: ``fleet server|apply|run|drill|status|jobs`` and ``worker``.

Parsing and rendering only: the work is in `keepwell.fleet` (the optional ``fleet`` extra,
imported when a command runs). Every command that talks to the cluster sets
``GLOBALS.hard_exit``: the Temporal SDK's native client can crash while the interpreter shuts
down, so the process flushes its output and leaves with its own exit code at once.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer

from keepwell.cli.common import GLOBALS, JsonOption, human_bytes, print_json
from keepwell.cli.control import ConfigOption, _age, _load, _ts
from keepwell.errors import EXIT_FAILURE, EXIT_PARTIAL, UsageError

T = TypeVar("T")

fleet_app = typer.Typer(help="Fleet mode: the same jobs on many machines, scheduled by Temporal.",
                        no_args_is_help=True)


def _with_client(config: str | None, work: Callable[[Any, Any], Awaitable[T]]) -> T:
    """Run ``work(client, config)`` against the configured cluster."""
    GLOBALS.hard_exit = True
    loaded = _load(config)
    from keepwell.fleet.target import connect

    async def go() -> T:
        client = await connect(loaded.config.fleet)
        return await work(client, loaded.config)

    return asyncio.run(go())


@fleet_app.command("server")
def cmd_server(
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT of the gRPC endpoint.")]
    = "127.0.0.1:7233",
    db: Annotated[str | None, typer.Option("--db", metavar="FILE",
                                           help="Keep the server's state in FILE "
                                                "(default: in memory).")] = None,
    http_port: Annotated[int | None, typer.Option("--http-port", help="Port of the HTTP API "
                                                  "(default: the server's choice).")] = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", help="Port of the "
                                                     "server's metrics.")] = None,
) -> None:
    """Run a local single-binary Temporal server in the foreground (trials and tests)."""
    from keepwell.fleet.target import temporal_binary

    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:7233")
    binary = temporal_binary()
    args = [binary, "server", "start-dev", "--ip", host, "--port", port, "--headless",
            "--log-level", "warn"]
    if db:
        args += ["--db-filename", db]
    if http_port is not None:
        args += ["--http-port", str(http_port)]
    if metrics_port is not None:
        args += ["--metrics-port", str(metrics_port)]
    os.execv(binary, args)  # the server's own signals and exit code


@fleet_app.command("apply")
def cmd_apply(
    config: ConfigOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan only.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Make the cluster's Schedules (create, update, delete) and streamers (start, restart,
    stop) match the configuration."""
    from keepwell.fleet.schedules import apply

    plan = _with_client(config, lambda client, cfg: apply(client, cfg, dry_run=dry_run))
    if json_out:
        print_json({"dry_run": dry_run, "plan": [s.as_dict() for s in plan]})
        return
    for s in plan:
        where = (f"  {s.cron!r} on site {s.site}" if s.cron
                 else f"  on site {s.site}" if s.site else "")
        typer.echo(f"{s.op:<9} {s.schedule_id}{where}")
    changes = sum(1 for s in plan if s.op != "unchanged")
    typer.echo(f"{changes} change(s){' planned (dry run)' if dry_run else ''}")


def _run(action: str, name: str, config: str | None, wait: bool, json_out: bool) -> None:
    from keepwell.fleet.runs import start

    out = _with_client(config, lambda client, cfg: start(client, cfg, action, name, wait=wait))
    if json_out:
        print_json(out)
    elif out["status"] == "started":
        typer.echo(f"{action} {name}: started {out['workflow_id']} on site {out['site']}")
    elif out["status"] in ("succeeded", "partial"):
        for step in out["steps"]:
            if step["status"] != "succeeded":
                typer.echo(f"{step['action']} {step['name']}: {step['status']}: "
                           f"{step['details'].get('error')}")
                continue
            said = (f", snapshot {step['snapshot_id'][:8]}" if step["snapshot_id"] else "")
            typer.echo(f"{step['action']} {step['name']}: succeeded on {step['worker']} "
                       f"(attempt {step['attempt']}){said}, "
                       f"uploaded {human_bytes(step['bytes_uploaded'] or 0)}")
    if out["status"] in ("failed", "skipped"):
        if not json_out:
            until = f" until {_ts(out['retry_at'])}" if out.get("retry_at") else ""
            typer.echo(f"error: {action} {name} {out['status']}: {out['error']}{until}",
                       err=True)
        raise typer.Exit(EXIT_FAILURE)
    if out["status"] == "partial":
        raise typer.Exit(EXIT_PARTIAL)


WaitOption = Annotated[bool, typer.Option("--wait", help="Wait for the end; exit 0 only if it "
                                          "succeeded, 3 if its backup succeeded but its retention "
                                          "or replica copy failed, 1 if it failed or was skipped "
                                          "(circuit open).")]


@fleet_app.command("run")
def cmd_run(name: Annotated[str, typer.Argument(help="Source to back up now.")],
            config: ConfigOption = None, wait: WaitOption = False,
            json_out: JsonOption = False) -> None:
    """Start a backup of one source now on a worker of its site."""
    _run("backup", name, config, wait, json_out)


@fleet_app.command("drill")
def cmd_drill(name: Annotated[str, typer.Argument(help="Drill (or source) to run now.")],
              config: ConfigOption = None, wait: WaitOption = False,
              json_out: JsonOption = False) -> None:
    """Start a restore drill now on a worker of its source's site."""
    _run("drill", name, config, wait, json_out)


@fleet_app.command("status")
def cmd_status(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Schedules (last and next runs), running jobs with their worker and progress, streamers,
    workers."""
    from keepwell.fleet.runs import status

    info = _with_client(config, status)
    if json_out:
        print_json(info)
        return
    typer.echo(f"{'schedule':<32} {'last run':<24} {'next run':<24} runs")
    for s in info["schedules"]:
        typer.echo(f"{s['schedule_id'][:32]:<32} {_ts(s['last_run']):<24} "
                   f"{_ts(s['next_run']):<24} {s['runs']}")
    typer.echo("\nrunning:" if info["running"] else "\nrunning: none")
    for r in info["running"]:
        for step in r["steps"] or [{"worker": "-", "attempt": 0, "progress": None}]:
            p = step["progress"] or {}
            typer.echo(f"  {r['workflow_id']}  on {step['worker'] or '-'} (attempt "
                       f"{step['attempt']}), read {human_bytes(p.get('bytes_read', 0))}, "
                       f"uploaded {human_bytes(p.get('bytes_uploaded', 0))}, "
                       f"{p.get('files', 0)} files, started {_age(r['started_at'])} ago")
    typer.echo("\nstreams:" if info["streams"] else "\nstreams: none")
    for st in info["streams"]:
        f = st["figures"] or {}
        lag = f.get("lag_seconds")
        state = "up" if f.get("up") else "down"
        typer.echo(f"  {st['source']}  on {st['worker'] or '-'} (attempt {st['attempt']}), "
                   f"{state}, {f.get('restarts', 0)} restart(s)"
                   + (f", lag {lag:.1f}s" if isinstance(lag, int | float) else "")
                   + f", started {_age(st['started_at'])} ago")
    typer.echo("\nworkers:")
    for site, workers in info["workers"].items():
        typer.echo(f"  site {site}: {len(workers)}"
                   + "".join(f"\n    {w['identity']}" for w in workers))


@fleet_app.command("jobs")
def cmd_jobs(config: ConfigOption = None,
             limit: Annotated[int, typer.Option("--limit", "-n", help="How many runs.")] = 30,
             json_out: JsonOption = False) -> None:
    """Recent runs in the cluster, newest first."""
    from keepwell.fleet.runs import jobs

    runs = _with_client(config, lambda client, cfg: jobs(client, limit))
    if json_out:
        print_json(runs)
        return
    typer.echo(f"{'started':<24} {'status':<11} {'queue':<20} workflow")
    for r in runs:
        typer.echo(f"{_ts(r['started_at']):<24} {r['status']:<11} {r['task_queue'][:20]:<20} "
                   f"{r['workflow_id']}")
        for step in r["steps"]:
            why = f": {step['reason']}" if step.get("reason") else ""
            typer.echo(f"{'':<24}   {step['step']} {step['name']}: {step['status']} "
                       f"(attempt {step['attempt']}){why}")


def cmd_worker(
    config: ConfigOption = None,
    site: Annotated[str, typer.Option("--site", help="The site whose jobs this worker runs.")]
    = "default",
    max_jobs: Annotated[int | None, typer.Option(
        "--max-jobs", min=1,
        help="Jobs at once on this worker [default: limits.max_concurrent_jobs].")] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="Log one JSON object per line.")]
    = False,
) -> None:
    """Run the jobs of one site's fleet queue until stopped (SIGTERM/SIGINT)."""
    GLOBALS.hard_exit = True
    from keepwell.control import logs
    from keepwell.fleet.worker import run_worker

    loaded = _load(config)
    log = logs.setup(json_lines=log_json or loaded.config.log_json)
    jobs = max_jobs or loaded.config.limits.max_concurrent_jobs
    raise typer.Exit(run_worker(loaded, site, jobs, log))


def register(app: typer.Typer) -> None:
    app.add_typer(fleet_app, name="fleet")
    app.command("worker")(cmd_worker)
