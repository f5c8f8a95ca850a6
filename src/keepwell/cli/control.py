"""Control-plane commands: ``config check``, ``daemon``, ``jobs``, ``run``, ``status``, ``drill``,
``web``.

They take the configuration from ``-c/--config``, ``KEEPWELL_CONFIG``, ``./keepwell.yaml`` or
``/etc/keepwell/keepwell.yaml`` (the first that is given or exists). Parsing and rendering only:
the work is in `keepwell.control`. `register(app)` adds them to the root app; this module also
runs on its own (``python -m keepwell.cli.control``).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer

from keepwell.cli.common import JsonOption, KeepwellGroup, human_bytes, print_json, run_app
from keepwell.errors import EXIT_FAILURE, EXIT_PARTIAL, ConfigurationError, UsageError

ConfigOption = Annotated[
    str | None,
    typer.Option("--config", "-c", envvar="KEEPWELL_CONFIG", help="Path of keepwell.yaml."),
]
DEFAULT_CONFIGS = ("keepwell.yaml", "/etc/keepwell/keepwell.yaml")
DEFAULT_WEB_LISTEN = "127.0.0.1:9378"


def _load(path: str | None) -> Any:
    from keepwell.control.config import load_config

    if path is None:
        path = next((p for p in DEFAULT_CONFIGS if os.path.exists(p)), None)
        if path is None:
            raise ConfigurationError("no configuration found",
                                     hint="pass --config or set KEEPWELL_CONFIG")
    return load_config(path)


def _ts(value: float | None) -> str:
    from keepwell.control.schedule import fmt_ts

    return fmt_ts(value)


def _age(value: float | None) -> str:
    from keepwell.control.schedule import fmt_age

    return fmt_age(value)


config_app = typer.Typer(help="Check and explain the configuration.", no_args_is_help=True)


@config_app.command("check")
def config_check(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Validate keepwell.yaml and explain what it will do."""
    from keepwell.control.status import explain

    loaded = _load(config)
    info = explain(loaded)
    if json_out:
        print_json({"ok": True, **info})
        return
    out = [f"{info['config']}: ok"]
    for name, repo in info["repositories"].items():
        out.append(f"repository {name}: {repo['location']}"
                   + (f" (replica {repo['replica']})" if repo["replica"] else ""))
    for s in info["sources"]:
        limit = f", upload ≤ {human_bytes(s['upload_limit'])}/s" if s["upload_limit"] else ""
        keep = ", ".join(f"{k}={v}" for k, v in (s["retention"] or {}).items()) or "keep all"
        out.append(f"source {s['source']}: {s['what']} → {s['repository']}; {s['schedule']};"
                   f" priority {s['priority']}; {keep}{limit}")
    for d in info["drills"]:
        out.append(f"drill {d['drill']}: restores {d['source']}; {d['schedule']}")
    lim = info["limits"]
    up = human_bytes(lim["upload"]) + "/s" if lim["upload"] else "unlimited"
    out.append(f"limits: upload {up}; {lim['max_concurrent_jobs']} jobs at once"
               + (f", {lim['max_concurrent_per_repository']} per repository"
                  if lim["max_concurrent_per_repository"] else "")
               + (f", {lim['max_concurrent_per_host']} per host"
                  if lim["max_concurrent_per_host"] else ""))
    out.append(f"metrics: {info['metrics'] or 'off'}; history: {info['history']}")
    out += [f"note: {n}" for n in info["notes"]]
    typer.echo("\n".join(out))


def cmd_daemon(
    config: ConfigOption = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="Log one JSON object per line.")]
    = False,
    watch_config: Annotated[bool, typer.Option(
        "--watch-config", help="Reload the configuration when its file changes.")] = False,
) -> None:
    """Run the schedules until stopped (SIGTERM/SIGINT stop it gracefully; SIGHUP reloads the
    configuration)."""
    from keepwell.control import logs
    from keepwell.control.daemon import run_daemon

    loaded = _load(config)
    log = logs.setup(json_lines=log_json or loaded.config.log_json)
    services = []
    if loaded.config.web.listen is not None:
        from keepwell.web.app import daemon_service

        factory = daemon_service(loaded, log)
        if factory is not None:
            services.append(factory)
    raise typer.Exit(run_daemon(loaded, log, services, watch_config=watch_config))


def cmd_web(
    config: ConfigOption = None,
    listen: Annotated[str | None, typer.Option(
        "--listen", help="HOST:PORT to serve on (default: web.listen, else 127.0.0.1:9378).")]
    = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="Log one JSON object per line.")]
    = False,
) -> None:
    """Serve the dashboard and its JSON API until stopped (SIGTERM/SIGINT).

    Jobs started from the web run in this process; when a daemon runs, let it serve the web
    instead (web.listen), so such jobs wait for its slots and budgets."""
    import re
    import signal
    import threading

    from keepwell.control import logs
    from keepwell.control.history import open_history
    from keepwell.control.runner import BackgroundJobs
    from keepwell.web.app import WebService

    loaded = _load(config)
    log = logs.setup(json_lines=log_json or loaded.config.log_json)
    address = listen or loaded.config.web.listen or DEFAULT_WEB_LISTEN
    if not re.fullmatch(r"[^:\s]*:\d{1,5}", address):
        raise UsageError(f"--listen {address!r}: expected HOST:PORT, e.g. {DEFAULT_WEB_LISTEN}")
    history = open_history(loaded.config)
    try:
        jobs = BackgroundJobs(loaded, history, log)
        service = WebService(loaded, jobs, address, log)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        service.start()
        while not stop.wait(1.0):
            pass
        service.stop()
        jobs.stop()
    finally:
        history.close()


def cmd_jobs(
    config: ConfigOption = None,
    source: Annotated[str | None, typer.Option("--source", help="Only this source.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many runs.")] = 30,
    json_out: JsonOption = False,
) -> None:
    """List recent job runs, newest first."""
    from keepwell.control.history import open_history

    loaded = _load(config)
    history = open_history(loaded.config)
    try:
        runs = history.runs(source=source, limit=limit)
    finally:
        history.close()
    cfg = loaded.config
    known = {*cfg.sources, *cfg.drills, *cfg.repositories}
    if source is not None and not runs and source not in known:
        # a name the file does not hold and no run was recorded under: a typo, not "no runs"
        raise UsageError(f"no source, drill or repository named {source!r} in {loaded.path}",
                         hint=f"names: {', '.join(sorted(known))}")
    if json_out:
        print_json([r.as_dict() for r in runs])
        return
    typer.echo(f"{'started':<24} {'action':<7} {'name':<16} {'status':<12} {'duration':>9} "
               f"{'read':>11} {'stored':>11}  snapshot / error")
    for r in runs:
        dur = f"{r.duration:.2f}s" if r.duration is not None else "-"
        tail = (r.snapshot_id or "")[:8] if r.status == "succeeded" else (r.error or "")
        typer.echo(f"{_ts(r.started_at):<24} {r.action:<7} {r.name[:16]:<16} {r.status:<12} "
                   f"{dur:>9} {human_bytes(r.bytes_read or 0):>11} "
                   f"{human_bytes(r.bytes_stored or 0):>11}  {tail[:60]}")


def _run_action(action: str, name: str, config: str | None, json_out: bool,
                read_data_subset: str | None = None) -> None:
    from keepwell.control import logs
    from keepwell.control.runner import run_now

    loaded = _load(config)
    log = logs.setup(json_lines=loaded.config.log_json)
    if json_out:
        log.disabled = True
    spec, outcome = run_now(loaded, action, name, log, read_data_subset)
    if json_out:
        print_json({"job_id": spec.job_id, **outcome.__dict__})
    elif outcome.status == "succeeded" and action == "check":
        d = outcome.details
        typer.echo(f"check {name}: no errors were found ({d.get('warnings', 0)} warnings, "
                   f"{d.get('packs_read', 0)} packs, {d.get('blobs_checked', 0)} blobs read)")
    elif outcome.status == "succeeded":
        extra = (f"; RTO {outcome.rto:.2f}s, RPO {outcome.rpo:.0f}s" if action == "drill"
                 else f"; read {human_bytes(outcome.bytes_read or 0)}, stored "
                      f"{human_bytes(outcome.bytes_stored or 0)}")
        typer.echo(f"{action} {name}: succeeded, snapshot {(outcome.snapshot_id or '')[:8]}"
                   + extra)
    failed = outcome.details.get("follow_ups_failed") if outcome.status == "succeeded" else None
    if failed:
        if not json_out:
            for step, error in failed.items():
                typer.echo(f"error: {action} {name}: the snapshot is saved, but its {step} "
                           f"failed: {error}", err=True)
        raise typer.Exit(EXIT_PARTIAL)
    if outcome.status != "succeeded":
        if not json_out:
            typer.echo(f"error: {action} {name} {outcome.status}: {outcome.error}", err=True)
        raise typer.Exit(EXIT_FAILURE)


def cmd_run(name: Annotated[str, typer.Argument(help="Source to back up now.")],
            config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Back up one source now (recorded in the job history like a scheduled run)."""
    _run_action("backup", name, config, json_out)


def cmd_drill(name: Annotated[str, typer.Argument(help="Drill (or source) to run now.")],
              config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Restore the newest snapshot into scratch space and check it; records RTO and RPO."""
    _run_action("drill", name, config, json_out)


def cmd_check_repository(
        name: Annotated[str, typer.Argument(help="Repository (as configured) to check now.")],
        read_data: Annotated[bool, typer.Option("--read-data", help="Read all data blobs.")] = False,
        read_data_subset: Annotated[str | None, typer.Option(
            "--read-data-subset", metavar="SUBSET",
            help="Read a subset of data packs: n/m, x% or a size (as `keepwell check`).")] = None,
        config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Check a configured repository now, recorded in the job history (action check)."""
    if read_data and read_data_subset is not None:
        raise UsageError("--read-data reads everything: give it or --read-data-subset, not both")
    _run_action("check", name, config, json_out, "all" if read_data else read_data_subset)


def cmd_status(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """One screen: last success per source, next run, failures, drills, alerts."""
    from keepwell.control.status import overview

    info = overview(_load(config))
    if json_out:
        print_json(info)
        return
    typer.echo(f"{'source':<16} {'last success':<24} {'age':>10} {'next run':<24} "
               f"{'fails':>5} {'breaker':<9} {'drill':<10} alerts")
    for s in info["sources"]:
        drill = s["drill_status"] or "-"
        if s["drill_status"] == "succeeded" and s["drill_rto"] is not None:
            drill = f"ok {s['drill_rto']:.1f}s"
        typer.echo(f"{s['source'][:16]:<16} {_ts(s['last_success']):<24} "
                   f"{_age(s['last_success_age']):>10} {_ts(s['next_run']):<24} "
                   f"{s['consecutive_failures']:>5} {s['breaker']:<9} {drill:<10} "
                   f"{','.join(s['alerts']) or '-'}")
    windows = [s for s in info["sources"] if s.get("pitr") is not None]
    if windows:
        typer.echo("\npoint-in-time restore windows:")
        for s in windows:
            w = s["pitr"]
            if w["error"]:
                typer.echo(f"  {s['source'][:16]:<16} unknown: {w['error']}")
                continue
            if w["from"] is None:
                span = "none"
            else:
                span = (f"{_ts(w['from'])} .. {_ts(w['to'])} ({_age(w['seconds'])}, newest point"
                        f" {_age(w['end_age'])} ago)")
            split = f"; split in {w['parts']} parts" if w["parts"] > 1 else ""
            problems = f"; {w['problems'][0]}" if w["problems"] else ""
            typer.echo(f"  {s['source'][:16]:<16} {span}{split}{problems}")
    if info["alerts"]:
        typer.echo("\nalerts:")
        for a in info["alerts"]:
            typer.echo(f"  {_ts(a['first_at'])}  {a['source']}: {a['message']}")
    if info["recent_failures"]:
        typer.echo("\nrecent failures:")
        for r in info["recent_failures"]:
            typer.echo(f"  {_ts(r['started_at'])}  {r['action']} {r['name']}: {r['error']}")


def register(app: typer.Typer) -> None:
    """Add the control-plane commands to the root app."""
    app.add_typer(config_app, name="config")
    app.command("daemon")(cmd_daemon)
    app.command("jobs")(cmd_jobs)
    app.command("run")(cmd_run)
    app.command("status")(cmd_status)
    app.command("drill")(cmd_drill)
    app.command("check-repository")(cmd_check_repository)
    app.command("web")(cmd_web)


def main() -> None:
    app = typer.Typer(cls=KeepwellGroup, no_args_is_help=True, add_completion=False,
                      help="keepwell control plane.")
    register(app)
    sys.exit(run_app(app))


if __name__ == "__main__":
    main()
