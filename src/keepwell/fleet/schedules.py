"""``keepwell fleet apply``: make the cluster's Schedules and streamers match the configuration.

Each scheduled source becomes the Schedule ``keepwell-backup-NAME`` and each scheduled drill
``keepwell-drill-NAME``, starting a run workflow on the site's task queue. A Schedule's note
carries a digest of what the configuration asked for, so a second apply of the same file finds
every Schedule up to date and changes nothing; a Schedule of this prefix that the file no longer
asks for is deleted. Each source that streams (a files source in ``mode: continuous``, a
``stream`` of a database source) gets the workflow ``keepwell-stream-NAME`` (`FleetStream`),
which keeps its streamer running on a worker of its site; its memo holds the digest of the
source's configuration, so a changed source has its streamer stopped and started again
(``restart``), and a source that no longer streams has it stopped (``stop``). Cron: keepwell's six-field form (leading seconds) becomes Temporal's
seven-field form (seconds ... weekday, year).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleSpec,
    ScheduleState,
    ScheduleUpdate,
    ScheduleUpdateInput,
    WorkflowFailureError,
)
from temporalio.service import RPCError, RPCStatusCode

from keepwell.control.config import Config, FilesSource
from keepwell.control.schedule import Schedule as Cron
from keepwell.fleet.messages import RunRequest, StreamRequest
from keepwell.fleet.target import run_request, stream_digest, stream_queue, task_queue
from keepwell.fleet.workflows import STREAM_PREFIX, STREAM_WORKFLOW, WORKFLOW

PREFIX = "keepwell-"


@dataclass(frozen=True)
class Wanted:
    schedule_id: str
    cron: str
    timezone: str
    request: RunRequest

    @property
    def digest(self) -> str:
        doc = {"cron": self.cron, "tz": self.timezone, "request": dataclasses.asdict(self.request)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def note(self) -> str:
        return f"keepwell {self.digest}"

    def schedule(self) -> Schedule:
        action = ScheduleActionStartWorkflow(
            WORKFLOW, self.request, id=self.schedule_id, task_queue=task_queue(self.request.site))
        return Schedule(action=action,
                        spec=ScheduleSpec(cron_expressions=[self.cron],
                                          time_zone_name=self.timezone),
                        state=ScheduleState(note=self.note))


@dataclass
class Step:
    op: str  # create | update | delete | unchanged; for streamers: start | restart | stop
    schedule_id: str
    cron: str | None = None
    site: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return dataclasses.asdict(self)


def temporal_cron(expression: str) -> str:
    fields = Cron.parse(expression).split()
    return " ".join([*fields, "*"]) if len(fields) == 6 else " ".join(fields)


def wanted(cfg: Config) -> dict[str, Wanted]:
    out: dict[str, Wanted] = {}
    for name, src in cfg.sources.items():
        if src.schedule and src.enabled:
            sid = f"{PREFIX}backup-{name}"
            out[sid] = Wanted(sid, temporal_cron(src.schedule), cfg.source_timezone(name),
                              run_request(cfg, "backup", name, None))
    for name, drill in cfg.drills.items():
        if drill.schedule:
            sid = f"{PREFIX}drill-{name}"
            out[sid] = Wanted(sid, temporal_cron(drill.schedule), drill.timezone or cfg.timezone,
                              run_request(cfg, "drill", name, None))
    return out


def wanted_streams(cfg: Config) -> dict[str, StreamRequest]:
    """The streamer workflows the configuration asks for, by workflow id."""
    out: dict[str, StreamRequest] = {}
    for name, src in cfg.sources.items():
        continuous = isinstance(src, FilesSource) and src.mode == "continuous"
        if not src.enabled or (getattr(src, "stream", None) is None and not continuous):
            continue
        out[STREAM_PREFIX + name] = StreamRequest(
            name=name, site=src.site, queue=stream_queue(src.site),
            heartbeat_timeout=cfg.fleet.heartbeat_timeout, digest=stream_digest(cfg, name))
    return out


async def _running_streams(client: Client) -> dict[str, str]:
    """The streamer workflows running on the cluster: workflow id -> the digest they run."""
    out: dict[str, str] = {}
    query = f"WorkflowType = '{STREAM_WORKFLOW}' AND ExecutionStatus = 'Running'"
    async for wf in client.list_workflows(query=query):
        if wf.id.startswith(STREAM_PREFIX):
            digest = await wf.memo_value("digest", "")
            out[wf.id] = digest if isinstance(digest, str) else ""
    return out


async def _stop_stream(client: Client, workflow_id: str) -> None:
    """Cancel a streamer workflow and wait until its streamer has stopped."""
    handle = client.get_workflow_handle(workflow_id)
    await handle.cancel()
    with contextlib.suppress(WorkflowFailureError):
        await handle.result()


async def _apply_streams(client: Client, cfg: Config, *, dry_run: bool) -> list[Step]:
    want = wanted_streams(cfg)
    running = await _running_streams(client)
    plan: list[Step] = []
    for wid, req in sorted(want.items()):
        digest = running.get(wid)
        op = "start" if digest is None else ("unchanged" if digest == req.digest else "restart")
        plan.append(Step(op, wid, None, req.site))
        if dry_run or op == "unchanged":
            continue
        if op == "restart":
            await _stop_stream(client, wid)
        await client.start_workflow(STREAM_WORKFLOW, req, id=wid, task_queue=task_queue(req.site),
                                    memo={"digest": req.digest})
    for wid in sorted(set(running) - set(want)):
        plan.append(Step("stop", wid))
        if not dry_run:
            await _stop_stream(client, wid)
    return plan


async def _note_of(client: Client, schedule_id: str) -> str | None:
    """The note of an existing Schedule; None when there is none of that id."""
    try:
        desc = await client.get_schedule_handle(schedule_id).describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    return desc.schedule.state.note or ""


async def apply(client: Client, cfg: Config, *, dry_run: bool) -> list[Step]:
    want = wanted(cfg)
    plan: list[Step] = []
    for sid, w in sorted(want.items()):
        note = await _note_of(client, sid)
        op = "create" if note is None else ("unchanged" if note == w.note else "update")
        plan.append(Step(op, sid, w.cron, w.request.site))
        if dry_run or op == "unchanged":
            continue
        if op == "create":
            await client.create_schedule(sid, w.schedule())
        else:
            new = w.schedule()

            def replace(_: ScheduleUpdateInput, new: Schedule = new) -> ScheduleUpdate:
                return ScheduleUpdate(schedule=new)

            await client.get_schedule_handle(sid).update(replace)
    existing = [s.id async for s in await client.list_schedules()]
    for sid in sorted(set(existing)):
        if not sid.startswith(PREFIX) or sid in want:
            continue
        if await _note_of(client, sid) is None:
            continue  # already deleted; the list lags behind
        plan.append(Step("delete", sid))
        if not dry_run:
            await client.get_schedule_handle(sid).delete()
    return plan + await _apply_streams(client, cfg, dry_run=dry_run)
