"""``keepwell worker``: one executor of a site, polling the site's task queue until stopped.

It runs the run workflows and their step activities of one site, at most ``max_jobs`` steps at
once, and their calls to the breakers, and the site's streamers (`FleetStream`: continuous files
sources, WAL and binlog streams) on a queue and threads of their own. It also runs the fleet's budget and breaker workflows
(`keepwell.fleet.budgets`, `keepwell.fleet.breakers`), on a queue every worker polls.
SIGTERM/SIGINT stop it: it stops polling and lets running jobs finish for the
configuration's ``limits.shutdown_grace`` seconds; a job still running then is cancelled and
retried on another worker of the site.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from temporalio.worker import Worker

from keepwell.control.config import LoadedConfig
from keepwell.control.logs import log_event
from keepwell.fleet.activities import JobActivities
from keepwell.fleet.target import connect, fleet_address, stream_queue, task_queue
from keepwell.fleet.workflows import BUDGET_QUEUE, Budget, FleetRun, FleetStream, SourceBreaker

BREAKER_CALLS = 4  # breaker calls of runs at once (local activities)
MAX_STREAMS = 64  # streamers (continuous sources, WAL/binlog streams) one worker runs at once


def worker_identity(site: str) -> str:
    return f"{site}/{socket.gethostname()}/{os.getpid()}"


async def _serve(loaded: LoadedConfig, site: str, max_jobs: int, log: logging.Logger) -> None:
    cfg = loaded.config
    client = await connect(cfg.fleet)
    identity = worker_identity(site)
    acts = JobActivities(loaded, site, identity, log, client, asyncio.get_running_loop())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # the breakers' local activities get threads of their own: they never wait behind jobs
    with ThreadPoolExecutor(max_workers=max_jobs + BREAKER_CALLS,
                            thread_name_prefix="fleet-job") as pool, \
            ThreadPoolExecutor(max_workers=MAX_STREAMS, thread_name_prefix="fleet-stream") as stream_pool:
        worker = Worker(client, task_queue=task_queue(site), workflows=[FleetRun, FleetStream],
                        activities=[acts.job, acts.retention, acts.replica, acts.breaker_ask,
                                    acts.breaker_report],
                        activity_executor=pool, max_concurrent_activities=max_jobs,
                        max_concurrent_local_activities=BREAKER_CALLS, identity=identity,
                        graceful_shutdown_timeout=timedelta(seconds=cfg.limits.shutdown_grace))
        budgets = Worker(client, task_queue=BUDGET_QUEUE, workflows=[Budget, SourceBreaker],
                         identity=identity)
        # streamers run for good: a queue and threads of their own, outside the job slots
        streams = Worker(client, task_queue=stream_queue(site), activities=[acts.stream],
                         activity_executor=stream_pool, max_concurrent_activities=MAX_STREAMS,
                         identity=identity,
                         graceful_shutdown_timeout=timedelta(seconds=cfg.limits.shutdown_grace))
        async with worker, budgets, streams:
            log_event(log, "worker_started", site=site, queue=task_queue(site),
                      address=fleet_address(cfg.fleet), identity=identity, max_jobs=max_jobs)
            await stop.wait()
            log_event(log, "worker_stopping", identity=identity)
    log_event(log, "worker_stopped", identity=identity)


def run_worker(loaded: LoadedConfig, site: str, max_jobs: int, log: logging.Logger) -> int:
    asyncio.run(_serve(loaded, site, max_jobs, log))
    return 0
