"""The data behind every page and every answer of the JSON API, as plain dicts.

A `Dashboard` holds what a serving process keeps open: the validated config, one connection to
the job history, the `Inventory` of the repositories, and the `LiveJobs` that start jobs by
hand (the daemon, or `BackgroundJobs` when the web app runs alone). Every figure comes from the
control plane (`keepwell.control.status.overview`, the history, the inventory); this module only
selects and shapes. No secret is ever part of an answer: repositories show their location,
never their password reference.

Orders: ``sources`` puts what needs attention first (failing, late, open alerts, breaker open),
then the rest by name; series for plots are oldest first.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from keepwell.control.config import LoadedConfig
from keepwell.control.history import History, Run
from keepwell.control.inventory import Inventory, growth
from keepwell.control.runner import LiveJobs
from keepwell.control.status import overview
from keepwell.errors import KeepwellError, UsageError

SERIES_LIMIT = 200
FLEET_TIMEOUT = 5.0  # seconds the running page waits for the fleet's cluster


def fleet_configured(cfg: Any) -> bool:
    """Fleet mode is configured: a ``fleet`` section in the file (its defaults alone do not
    count) or ``KEEPWELL_FLEET_ADDRESS`` set."""
    return "fleet" in cfg.model_fields_set or bool(os.environ.get("KEEPWELL_FLEET_ADDRESS"))


def fleet_workers(cfg: Any) -> dict[str, Any]:
    """The fleet's workers per site, as ``keepwell fleet status`` reads them, or ``error``
    (``fleet unreachable: ...``) when the cluster does not answer within FLEET_TIMEOUT. The
    Temporal SDK is imported here only, when fleet mode is configured."""
    address = os.environ.get("KEEPWELL_FLEET_ADDRESS") or cfg.fleet.address
    try:
        from keepwell.fleet.runs import workers
        from keepwell.fleet.target import connect

        async def read() -> dict[str, list[dict[str, Any]]]:
            client = await connect(cfg.fleet)
            return await workers(client, cfg)

        found = asyncio.run(asyncio.wait_for(read(), FLEET_TIMEOUT))
    except TimeoutError:
        return {"address": address, "error": f"fleet unreachable: no answer from {address} "
                                             f"within {FLEET_TIMEOUT:.0f} s"}
    except Exception as exc:  # any failure to read the cluster is a note, not an error page
        line = exc.line() if isinstance(exc, KeepwellError) else f"{type(exc).__name__}: {exc}"
        return {"address": address, "error": f"fleet unreachable: {line.splitlines()[0]}"}
    return {"address": address, "workers": found}


class NotFound(KeepwellError):
    """The page or object asked for does not exist."""


def _attention(src: dict[str, Any]) -> int:
    """0 for what needs attention first (red), 1 for late or warned, 2 for fine."""
    if src["last_status"] in ("failed", "timeout", "interrupted") or src["breaker"] != "closed":
        return 0
    if src["open_alerts"] or src["drill_status"] in ("failed", "timeout"):
        return 0
    if src["enabled"] and src["last_success"] is None:
        return 1
    return 2


def _state(src: dict[str, Any]) -> str:
    rank = _attention(src)
    if rank == 0:
        return "red"
    return "late" if rank == 1 else "ok"


def _run(r: Run) -> dict[str, Any]:
    d = r.as_dict()
    d.pop("pid", None)
    return d


def _point(r: Run) -> dict[str, Any]:
    return {"time": r.ended_at, "run": r.id, "duration": r.duration, "bytes_read": r.bytes_read,
            "bytes_stored": r.bytes_stored, "dedup_ratio": r.dedup_ratio, "rto": r.rto,
            "rpo": r.rpo, "status": r.status}


def _snapshot(s: Any) -> dict[str, Any]:
    summary = s.summary or {}
    return {"id": s.id, "short_id": s.short_id, "time": s.time.timestamp(), "host": s.host,
            "kind": s.kind, "tags": list(s.tags), "paths": list(s.paths),
            "bytes_processed": summary.get("bytes_processed", summary.get("bytes_read")),
            "bytes_added": summary.get("bytes_added")}


class Dashboard:
    def __init__(self, loaded: LoadedConfig, history: History, live: LiveJobs) -> None:
        self.loaded = loaded
        self.cfg = loaded.config
        self.history = history
        self.live = live
        self.inventory = Inventory(self.cfg, history)

    # -- reading --------------------------------------------------------------------------------
    def overview(self) -> dict[str, Any]:
        try:
            pitr = self.inventory.windows()
        except KeepwellError:
            pitr = {}
        info = overview(self.loaded, history=self.history, pitr=pitr)
        for src in info["sources"]:
            src["state"] = _state(src)
        info["sources"].sort(key=lambda s: (_attention(s), s["source"]))
        info["running"] = self.live.running()
        info["open_alerts"] = [a for a in info["alerts"] if a["open"]]
        info["drills"] = self.drills(series=False)
        return info

    def _source_entry(self, name: str) -> dict[str, Any]:
        if name not in self.cfg.sources:
            raise NotFound(f"no source named {name!r}")
        return next(s for s in self.overview()["sources"] if s["source"] == name)

    def source(self, name: str) -> dict[str, Any]:
        entry = self._source_entry(name)
        backups = self.history.successes(name, "backup", limit=SERIES_LIMIT)
        runs = self.history.runs(source=name, limit=50)
        return {**entry, "backups": [_point(r) for r in reversed(backups)],
                "runs": [_run(r) for r in runs], "snapshots": self.snapshots(name)}

    def snapshots(self, source: str) -> list[dict[str, Any]]:
        if source not in self.cfg.sources:
            raise NotFound(f"no source named {source!r}")
        tag = f"source:{source}"
        repo = self.cfg.sources[source].repository
        figures = self.inventory.figures(repo)
        return [_snapshot(s) for s in reversed(figures.snapshots) if tag in s.tags]

    def runs(self, *, source: str | None = None, action: str | None = None,
             status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        return [_run(r) for r in self.history.runs(source=source, action=action, status=status,
                                                   limit=max(1, min(limit, 1000)))]

    def run(self, run_id: int) -> dict[str, Any]:
        run = self.history.run(run_id)
        if run is None:
            raise NotFound(f"no run {run_id}")
        return {**_run(run), "log": self.history.run_log(run_id)}

    def repositories(self) -> list[dict[str, Any]]:
        return [self.repository(name, series=False) for name in self.cfg.repositories]

    def repository(self, name: str, series: bool = True) -> dict[str, Any]:
        repo = self.cfg.repositories.get(name)
        if repo is None:
            raise NotFound(f"no repository named {name!r}")
        out: dict[str, Any] = {
            "name": name, "location": repo.location,
            "replica": repo.replica.location if repo.replica else None,
            "sources": sorted(n for n, s in self.cfg.sources.items() if s.repository == name),
            **self.inventory.figures(name).as_dict(), "last_check": self.last_check(name)}
        if series:
            out["growth"] = growth(self.cfg, self.history, name, SERIES_LIMIT)
        return out

    def last_check(self, repository: str) -> dict[str, Any] | None:
        """The repository's newest finished check (``keepwell check-repository``), or None."""
        for r in self.history.runs(source=repository, action="check", limit=20):
            if r.status == "running":
                continue
            return {"run": r.id, "time": r.ended_at, "status": r.status,
                    "ok": r.status == "succeeded", "errors": r.details.get("errors"),
                    "warnings": r.details.get("warnings"),
                    "read_data": r.details.get("read_data"),
                    "packs_read": r.details.get("packs_read"), "error": r.error}
        return None

    def drills(self, series: bool = True) -> list[dict[str, Any]]:
        out = []
        names = list(self.cfg.drills) or []
        for name in names:
            drill = self.cfg.drills[name]
            runs = [r for r in self.history.runs(source=drill.source, action="drill",
                                                 limit=SERIES_LIMIT) if r.name == name]
            last = runs[0] if runs else None
            entry: dict[str, Any] = {
                "drill": name, "source": drill.source, "schedule": drill.schedule,
                "max_rpo": drill.max_rpo,
                "last_status": last.status if last else None,
                "last_time": last.ended_at if last else None,
                "rto": last.rto if last else None, "rpo": last.rpo if last else None,
                "last_error": last.error if last and last.status != "succeeded" else None}
            if series:
                entry["series"] = [_point(r) for r in reversed(runs)
                                   if r.status != "running"]
            out.append(entry)
        return out

    def alerts(self, all_alerts: bool = False) -> list[dict[str, Any]]:
        return [a.as_dict() for a in self.history.alerts(active_only=not all_alerts)]

    def running(self, fleet: bool = True) -> dict[str, Any]:
        """The running jobs with live progress, and the runs the history shows running (jobs
        of another process, whose progress this one cannot see); with ``fleet``, when fleet
        mode is configured, the fleet's workers per site (`fleet_workers`), else ``fleet``
        None."""
        live = self.live.running()
        mine = {j["job_id"] for j in live}
        others = [_run(r) for r in self.history.runs(status="running", limit=100)
                  if r.job_id not in mine]
        out: dict[str, Any] = {"time": time.time(), "jobs": live, "elsewhere": others}
        if fleet:
            out["fleet"] = fleet_workers(self.cfg) if fleet_configured(self.cfg) else None
        return out

    # -- acting ---------------------------------------------------------------------------------
    def start(self, action: str, name: str, by: str) -> dict[str, Any]:
        if action == "backup" and name not in self.cfg.sources:
            raise NotFound(f"no source named {name!r}")
        if action == "drill" and name not in self.cfg.drills and name not in self.cfg.sources:
            raise NotFound(f"no drill or source named {name!r}")
        if action not in ("backup", "drill"):
            raise UsageError(f"unknown action {action!r}")
        job_id = self.live.submit(action, name, by)
        return {"job_id": job_id, "action": action, "name": name, "requested_by": by}

    def acknowledge(self, key: str, by: str) -> dict[str, Any]:
        if not self.history.acknowledge_alert(key, by):
            raise NotFound(f"no open alert {key!r}")
        return {"key": key, "acknowledged_by": by}

    def runs_of_job(self, job_id: str) -> list[dict[str, Any]]:
        return [_run(r) for r in self.history.runs_for_job(job_id)]
