"""The one-screen overview and the explanation of a config, as plain data for the CLI.

`overview` gives, per source: the last success (time, age, snapshot), the last run and its
error, consecutive failures, the next scheduled run, the breaker state, the last drill (RTO,
RPO), active alerts and, for sources that archive a log, the point-in-time-restore window
(`keepwell.control.pitr`). `explain` describes what a validated config will do.
"""

from __future__ import annotations

import time
from typing import Any

from keepwell.control.config import Config, LoadedConfig
from keepwell.control.history import History, describe_location, open_history
from keepwell.control.jobs import configured_source
from keepwell.control.pitr import windows
from keepwell.control.schedule import Schedule
from keepwell.control.secrets import resolve
from keepwell.errors import ConfigurationError
from keepwell.sources.base import Window, source_for


def _consecutive_failures(history: History, source: str) -> int:
    n = 0
    for run in history.runs(source=source, action="backup", limit=50):
        if run.status in ("failed", "timeout"):
            n += 1
        elif run.status in ("succeeded",):
            break
    return n


def overview(loaded: LoadedConfig, now: float | None = None, *,
             history: History | None = None,
             pitr: dict[str, Window] | None = None) -> dict[str, Any]:
    """The overview; a caller that keeps a history open (the web app) passes it, and the PITR
    windows it keeps (`keepwell.control.pitr.WindowCache`)."""
    cfg = loaded.config
    now = time.time() if now is None else now
    if pitr is None:
        pitr = windows(cfg)
    own = history is None
    if history is None:
        history = open_history(cfg)
    try:
        breakers = history.breakers()
        alerts = history.alerts()
        sources = []
        for name, src in cfg.sources.items():
            ok = history.last_run(name, "backup", "succeeded")
            last = history.last_run(name, "backup")
            drill = history.last_run(name, "drill")
            nxt = None
            if src.schedule and src.enabled:
                nxt = Schedule(src.schedule, src.timezone or cfg.timezone).next_after_ts(now)
            sources.append({
                "source": name,
                "kind": src.kind,
                "repository": src.repository,
                "enabled": src.enabled,
                "last_success": ok.ended_at if ok else None,
                "last_success_age": (now - ok.ended_at) if ok and ok.ended_at else None,
                "last_snapshot": ok.snapshot_id if ok else None,
                "last_status": last.status if last else None,
                "last_error": last.error if last and last.status != "succeeded" else None,
                "consecutive_failures": _consecutive_failures(history, name),
                "next_run": nxt,
                "breaker": breakers.get(name, ("closed", 0, 0.0))[0],
                "drill_status": drill.status if drill else None,
                "drill_rto": drill.rto if drill else None,
                "drill_rpo": drill.rpo if drill else None,
                "alerts": [a.kind for a in alerts if a.source == name],
                "open_alerts": [a.kind for a in alerts if a.source == name and a.open],
                "pitr": pitr[name].as_dict(now) if name in pitr else None,
            })
        return {
            "config": str(loaded.path),
            "history": describe_location(cfg.history),
            "time": now,
            "sources": sources,
            "alerts": [a.as_dict() for a in alerts],
            "recent_failures": [
                r.as_dict() for r in history.runs(status="failed", limit=5)
            ],
        }
    finally:
        if own:
            history.close()


def _secret_refs(cfg: Config) -> list[str]:
    refs = [r.password for r in cfg.repositories.values()]
    for src in cfg.sources.values():
        conn = getattr(src, "connection", None)
        if conn is not None and conn.password:
            refs.append(conn.password)
    refs += [n.webhook for n in cfg.notifications
             if n.webhook and n.webhook.startswith(("env:", "file:"))]
    return list(dict.fromkeys(refs))


def explain(loaded: LoadedConfig) -> dict[str, Any]:
    cfg = loaded.config
    lim = cfg.limits
    notes: list[str] = []
    sources = []
    for name, src in cfg.sources.items():
        tz = src.timezone or cfg.timezone
        what = source_for(src.kind).describe(configured_source(cfg, name))
        sched = Schedule(src.schedule, tz).explain() if src.schedule else "only when run by hand"
        retention = src.retention.as_kwargs() if src.retention else None
        sources.append({"source": name, "what": what, "repository": src.repository,
                        "schedule": sched, "priority": src.priority, "retention": retention,
                        "upload_limit": src.upload_limit or lim.per_job_upload,
                        "timeout": src.timeout or lim.job_timeout,
                        "stream": bool(getattr(src, "stream", None))})
        if src.retention is None:
            notes.append(f"source {name} has no retention: its snapshots are kept forever")
        if src.schedule is None and src.enabled:
            notes.append(f"source {name} has no schedule: it runs only with 'keepwell run'")
    drills = [{"drill": n, "source": d.source,
               "schedule": Schedule(d.schedule, d.timezone or cfg.timezone).explain()
               if d.schedule else "only when run by hand"} for n, d in cfg.drills.items()]
    drilled = {d.source for d in cfg.drills.values()}
    for name in cfg.sources:
        if name not in drilled:
            notes.append(f"source {name} has no restore drill")
    for ref in _secret_refs(cfg):
        try:
            resolve(ref)
        except ConfigurationError as exc:
            notes.append(f"secret {ref} cannot be read here: {exc}")
    if not cfg.notifications:
        notes.append("no notifications: alerts show only in status and metrics")
    return {
        "config": str(loaded.path),
        "repositories": {n: {"location": r.location,
                             "replica": r.replica.location if r.replica else None}
                         for n, r in cfg.repositories.items()},
        "sources": sources,
        "drills": drills,
        "limits": lim.model_dump(),
        "retries": cfg.retries.model_dump(),
        "circuit_breaker": cfg.circuit_breaker.model_dump(),
        "notifications": len(cfg.notifications),
        "metrics": cfg.metrics.listen,
        "history": describe_location(cfg.history),
        "notes": notes,
    }
