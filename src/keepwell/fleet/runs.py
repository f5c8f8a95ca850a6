"""Starting runs and reading the fleet: ``fleet run``, ``fleet drill``, ``fleet status``/``jobs``.

`start` starts one run workflow now on its site's task queue and, with ``wait``, waits for its
end. `status` reads the cluster: the Schedules (last and next runs), the running runs with their
worker and the progress of their current step (its heartbeat), the streamers with their worker
and figures, and the workers polling each
site's queue (`workers`, which the web app's running page shows too). `jobs` lists recent runs
with their steps, read from each run's history.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import datetime
from typing import Any

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from keepwell.control.config import Config
from keepwell.fleet.messages import RunResult, StepRequest
from keepwell.fleet.schedules import PREFIX
from keepwell.fleet.target import run_request, task_queue
from keepwell.fleet.workflows import STREAM_PREFIX, STREAM_WORKFLOW, WORKFLOW, FleetRun

SERVER_AWAY = 600.0  # how long `start` waits for a run across a server that went away


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
        result = await _result(handle)
    except WorkflowFailureError as exc:
        out.update(status="failed", error=_cause(exc))
        return out
    out.update(status=run_status(result), steps=[dataclasses.asdict(s) for s in result.steps])
    skipped = next((s for s in result.steps if s.status == "skipped"), None)
    failed = [s for s in result.steps if s.status == "failed"]
    if skipped is not None:
        out["error"] = str(skipped.details.get("reason", "skipped"))
        out["retry_at"] = skipped.details.get("retry_at")
    elif failed:
        out["error"] = "; ".join(f"{s.action} failed: {s.details.get('error')}" for s in failed)
    return out


async def _result(handle: WorkflowHandle[Any, RunResult]) -> RunResult:
    """The run's result; a server away for a while (restarting) is waited for, up to
    `SERVER_AWAY` seconds, beyond the SDK's own few retries."""
    deadline = time.monotonic() + SERVER_AWAY
    delay = 0.5
    while True:
        try:
            result: RunResult = await handle.result()
            return result
        except RPCError as exc:
            if exc.status != RPCStatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(delay)  # reconnecting: nothing to wait on but the clock
        delay = min(delay * 2, 10.0)


def run_status(result: RunResult) -> str:
    """``succeeded``; ``skipped`` (its breaker is open); ``partial`` (the backup succeeded, its
    retention or replica copy failed)."""
    said = {s.status for s in result.steps}
    if "skipped" in said:
        return "skipped"
    return "partial" if "failed" in said else "succeeded"


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


async def _streams(client: Client) -> list[dict[str, Any]]:
    """The streamers running (`FleetStream`): each one's source, its worker and its last
    heartbeat's figures (``up``, ``restarts``, ``lag_seconds``)."""
    out = []
    query = f'WorkflowType="{STREAM_WORKFLOW}" AND ExecutionStatus="Running"'
    async for wf in client.list_workflows(query):
        desc = await client.get_workflow_handle(wf.id, run_id=wf.run_id).describe()
        entry: dict[str, Any] = {"workflow_id": wf.id, "source": wf.id[len(STREAM_PREFIX):],
                                 "started_at": _ts(wf.start_time), "worker": None,
                                 "attempt": 0, "figures": None}
        for pa in desc.raw_description.pending_activities:
            details = (await client.data_converter.decode(pa.heartbeat_details.payloads)
                       if pa.heartbeat_details.payloads else [])
            entry.update(worker=pa.last_worker_identity or None, attempt=pa.attempt,
                         figures=details[0] if details else None)
        out.append(entry)
    return sorted(out, key=lambda e: e["workflow_id"])


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
            "running": await _running(client), "streams": await _streams(client),
            "workers": await workers(client, cfg)}


async def _steps(client: Client, wf: WorkflowExecution) -> list[dict[str, Any]]:
    """A run's steps as its history tells them: each activity (the job, retention, replica) with
    its status and attempts, and a step the run recorded without an activity (a skip, a
    follow-up that failed for good)."""
    steps: dict[int, dict[str, Any]] = {}
    result: RunResult | None = None
    ends = {"activity_task_completed_event_attributes": "succeeded",
            "activity_task_failed_event_attributes": "failed",
            "activity_task_timed_out_event_attributes": "timeout",
            "activity_task_canceled_event_attributes": "cancelled"}
    handle = client.get_workflow_handle(wf.id, run_id=wf.run_id)
    async for ev in handle.fetch_history_events():
        kind = ev.WhichOneof("attributes")
        if kind == "activity_task_scheduled_event_attributes":
            attrs = ev.activity_task_scheduled_event_attributes
            req = (await client.data_converter.decode(attrs.input.payloads, [StepRequest]))[0]
            action = attrs.activity_type.name.removeprefix("keepwell-")
            steps[ev.event_id] = {"step": req.action if action == "job" else action,
                                  "name": req.name, "status": "running", "attempt": 1}
        elif kind == "activity_task_started_event_attributes":
            started = ev.activity_task_started_event_attributes
            if started.scheduled_event_id in steps:
                steps[started.scheduled_event_id]["attempt"] = started.attempt
        elif kind in ends:
            scheduled = getattr(ev, kind).scheduled_event_id
            if scheduled in steps:
                steps[scheduled]["status"] = ends[kind]
        elif kind == "workflow_execution_completed_event_attributes":
            payloads = ev.workflow_execution_completed_event_attributes.result.payloads
            result = (await client.data_converter.decode(payloads, [RunResult]))[0]
    out = list(steps.values())
    for step in result.steps if result is not None else []:
        if step.status in ("skipped", "failed"):
            out.append({"step": step.action, "name": step.name, "status": step.status,
                        "attempt": step.attempt,
                        "reason": step.details.get("reason") or step.details.get("error")})
    return out


async def jobs(client: Client, limit: int) -> list[dict[str, Any]]:
    out = []
    async for wf in client.list_workflows(f'WorkflowType="{WORKFLOW}"', limit=limit):
        status = wf.status.name.lower() if isinstance(wf.status, WorkflowExecutionStatus) else "?"
        steps = await _steps(client, wf)
        if status == "completed" and any(s["status"] == "skipped" for s in steps):
            status = "skipped"
        out.append({"workflow_id": wf.id, "status": status, "task_queue": wf.task_queue,
                    "started_at": _ts(wf.start_time), "ended_at": _ts(wf.close_time),
                    "steps": steps})
    return out
