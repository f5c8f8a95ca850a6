"""Starting runs and reading the fleet: ``fleet run``, ``fleet drill``, ``fleet status``/``jobs``.

`start` starts one run workflow now on its site's task queue and, with ``wait``, waits for its
end. `status` reads the cluster: the Schedules (last and next runs), the running runs with their
worker and the progress of their current step (its heartbeat), and the workers polling each
site's queue (`workers`, which the web app's running page shows too). `jobs` lists recent runs.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime
from typing import Any

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ActivityError, ApplicationError

from keepwell.control.config import Config
from keepwell.fleet.messages import RunResult
from keepwell.fleet.schedules import PREFIX
from keepwell.fleet.target import run_request, task_queue
from keepwell.fleet.workflows import WORKFLOW, FleetRun


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _cause(exc: BaseException) -> str:
    """The innermost message of a failed run (the job's own error line)."""
    cur: BaseException | None = exc
    said = str(exc)
    while cur is not None:
        if isinstance(cur, ApplicationError | ActivityError) and str(cur):
            said = str(cur)
        cur = cur.__cause__
    return said


async def start(client: Client, cfg: Config, action: str, name: str, *,
                wait: bool) -> dict[str, Any]:
    now = time.time()
    req = run_request(cfg, action, name, now)
    wid = f"{PREFIX}{action}-{name}-{int(now * 1000)}"
    handle = await client.start_workflow(FleetRun.run, req, id=wid,
                                         task_queue=task_queue(req.site))
    out: dict[str, Any] = {"workflow_id": wid, "action": action, "name": name,
                           "site": req.site, "status": "started"}
    if not wait:
        return out
    try:
        result: RunResult = await handle.result()
    except WorkflowFailureError as exc:
        out.update(status="failed", error=_cause(exc))
        return out
    out.update(status="succeeded", steps=[dataclasses.asdict(s) for s in result.steps])
    return out


async def _running(client: Client) -> list[dict[str, Any]]:
    out = []
    query = f'WorkflowType="{WORKFLOW}" AND ExecutionStatus="Running"'
    async for wf in client.list_workflows(query):
        entry: dict[str, Any] = {"workflow_id": wf.id, "started_at": _ts(wf.start_time),
                                 "task_queue": wf.task_queue, "steps": []}
        desc = await client.get_workflow_handle(wf.id, run_id=wf.run_id).describe()
        for pa in desc.raw_description.pending_activities:
            details = (await client.data_converter.decode(pa.heartbeat_details.payloads)
                       if pa.heartbeat_details.payloads else [])
            entry["steps"].append({"attempt": pa.attempt, "worker": pa.last_worker_identity,
                                   "progress": details[0] if details else None})
        out.append(entry)
    return out


async def workers(client: Client, cfg: Config) -> dict[str, list[dict[str, Any]]]:
    """The workers polling each site's queue (every configured site, and ``default``): their
    identity and last poll."""
    sites = sorted({src.site for src in cfg.sources.values()} | {"default"})
    out: dict[str, list[dict[str, Any]]] = {}
    for site in sites:
        resp = await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
            namespace=client.namespace, task_queue=TaskQueue(name=task_queue(site)),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY))
        out[site] = [{"identity": p.identity,
                      "last_poll": p.last_access_time.ToDatetime().timestamp()}
                     for p in resp.pollers]
    return out


async def status(client: Client, cfg: Config) -> dict[str, Any]:
    schedules = []
    async for s in await client.list_schedules():
        if not s.id.startswith(PREFIX):
            continue
        desc = await client.get_schedule_handle(s.id).describe()
        recent = desc.info.recent_actions
        nxt = desc.info.next_action_times
        schedules.append({"schedule_id": s.id,
                          "last_run": _ts(recent[-1].started_at) if recent else None,
                          "next_run": _ts(nxt[0]) if nxt else None,
                          "runs": desc.info.num_actions})
    return {"schedules": sorted(schedules, key=lambda x: x["schedule_id"]),
            "running": await _running(client), "workers": await workers(client, cfg)}


async def jobs(client: Client, limit: int) -> list[dict[str, Any]]:
    out = []
    async for wf in client.list_workflows(f'WorkflowType="{WORKFLOW}"', limit=limit):
        status = wf.status.name.lower() if isinstance(wf.status, WorkflowExecutionStatus) else "?"
        out.append({"workflow_id": wf.id, "status": status, "task_queue": wf.task_queue,
                    "started_at": _ts(wf.start_time), "ended_at": _ts(wf.close_time)})
    return out
