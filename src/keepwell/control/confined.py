"""A job with hard resource limits runs in a process of its own, inside its cgroup.

The daemon runs jobs on threads of one process, and a cgroup holds processes: so a job with
``limits`` (`keepwell.control.cgroups.ResourceLimits`) is run by a fresh interpreter (the *job
process*). `run_confined` makes the job's cgroup, starts the job process, moves it into the
cgroup before it has read its job (so before it can start anything: worker processes,
``pg_basebackup``, ``mariabackup`` are its children and inherit the cgroup), and relays between
the two `JobContext`s over a pair of pipes (the job process is in a session of its own: a
Ctrl-C at the terminal reaches the daemon or ``keepwell run``, which cancels the job):

- down (to the job process): the job, ``cancel`` when the daemon stops it, and the answers to
  its requests for tokens of the upload budget shared by every job (``granted``);
- up (from it): ``progress`` (bytes and files read), ``upload`` (bytes stored), ``log`` lines,
  ``take`` (tokens of the shared budget) and, last, its ``outcome``.

Where no cgroup can be made, the job process sets its own nice and ionice instead
(`ResourceLimits.fallback`), and the daemon says so once (a warning in its log and in the
first such run's log). Where the cgroup lacks controllers that the limits need (a v2 hierarchy
that does not offer them, `JobCgroup.unapplied`), nice and ionice stand in for those limits,
and the daemon says which, once, in one line, the same way. The cgroup is removed when the job process has ended; what the kernel
accounted (CPU time, bytes read and written, peak memory) goes into the outcome's details.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from keepwell.backends.resilience import TokenBucket
from keepwell.control.cgroups import CgroupUnavailable, JobCgroup, Priority, ResourceLimits
from keepwell.control.jobs import JobCancelled, JobContext, JobOutcome, JobSpec
from keepwell.control.logs import ALSO_LOGGED

PROGRESS_EVERY = 0.2  # seconds between progress reports of the job process
_MAIN = ("import sys; from keepwell.control.runner import serve_confined; "
         "serve_confined(int(sys.argv[1]), int(sys.argv[2]))")
_log = logging.getLogger("keepwell.control")
_warned: set[str] = set()  # what the daemon already warned of (warned once each)
_warned_lock = threading.Lock()


def _warn_once(ctx: JobContext, key: str, line: str) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    _log.warning(line)
    ctx.log("warning", line)


def run_confined(spec: JobSpec, ctx: JobContext) -> JobOutcome:
    """Run ``spec`` in a job process inside its cgroup (or niced); its outcome."""
    limits = ResourceLimits.from_dict(spec.resources or {})
    group: JobCgroup | None = None
    priority = limits.priority
    if limits.needs_cgroup():
        try:
            group = JobCgroup.create(spec.name, limits)
        except CgroupUnavailable as exc:
            priority = limits.fallback()
            _warn_once(ctx, "unavailable",
                       f"cgroups are not available ({exc}): jobs with limits run with nice"
                       f" {priority.nice} and ionice {priority.ionice} instead")
    if group is not None and group.unapplied:
        priority = limits.fallback(group.unapplied)
        line = group.unapplied_line(priority)
        if line is not None:
            _warn_once(ctx, line, line)
    for line in group.skipped if group is not None else ():
        ctx.log("warning", line)
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    try:
        process = subprocess.Popen([sys.executable, "-c", _MAIN, str(down_r), str(up_w)],
                                   pass_fds=(down_r, up_w), stdin=subprocess.DEVNULL,
                                   close_fds=True, start_new_session=True)
    except BaseException:
        for fd in (down_r, down_w, up_r, up_w):
            os.close(fd)
        if group is not None:
            group.remove()
        raise
    os.close(down_r)
    os.close(up_w)
    down, up = Connection(down_w, readable=False), Connection(up_r, writable=False)
    try:
        if group is not None:
            group.add(process.pid)
        left = ctx.deadline - time.monotonic() if ctx.deadline is not None else None
        job = dataclasses.replace(spec, resources=None).to_dict()
        down.send({"spec": job, "timeout": left, "priority": priority.as_dict(),
                   "shared": ctx.shared_upload is not None})
        outcome = _relay(ctx, process, down, up)
        outcome.details["confinement"] = (
            {"cgroup": None, **priority.as_dict()} if group is None
            else {"cgroup": group.version, "usage": group.usage()} if not group.unapplied
            else {"cgroup": group.version, "usage": group.usage(),
                  "unapplied": group.unapplied, **priority.as_dict()})
        return outcome
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        down.close()
        up.close()
        if group is not None:
            group.remove()


def _relay(ctx: JobContext, process: subprocess.Popen[bytes], down: Connection,
           up: Connection) -> JobOutcome:
    cancelled = False
    while True:
        if not cancelled:
            try:
                ctx.check()
            except JobCancelled:
                cancelled = True
                _send(down, ("cancel",))
        try:
            if not up.poll(PROGRESS_EVERY):
                continue
            msg = up.recv()
        except (EOFError, OSError):
            code = process.wait()
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            return JobOutcome("failed", error=f"the job process ended unexpectedly ({how})",
                              error_type="JobProcessEnded")
        kind = msg[0]
        if kind == "progress":
            ctx.bytes_read, ctx.files = msg[1], msg[2]
        elif kind == "upload":
            if ctx.upload_started is None:
                ctx.upload_started = msg[2]
            ctx.upload_ended = time.time()
            ctx.count_upload(msg[1])
        elif kind == "log":
            ctx.log(msg[1], msg[2])
        elif kind == "take":
            assert ctx.shared_upload is not None
            ctx.shared_upload.acquire(msg[1])
            _send(down, ("granted",))
        elif kind == "outcome":
            return JobOutcome(**msg[1])


def _send(conn: Connection, msg: Any) -> None:
    try:
        conn.send(msg)
    except (OSError, ValueError):
        pass  # the job process is gone: its end is reported by the relay


class _ParentBucket(TokenBucket):
    """The upload budget shared by every job, held by the daemon: each take is asked for."""

    def __init__(self, child: JobChild) -> None:
        super().__init__(None)
        self._child = child

    def acquire(self, n: float) -> None:
        self._child.take(n)


class _RunLog(logging.Handler):
    """Lines of this process's loggers, into the run's log."""

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(logging.INFO)
        self.ctx = ctx

    def emit(self, record: logging.LogRecord) -> None:
        self.ctx.log(record.levelname.lower(), record.getMessage())


class JobChild:
    """The job process's side: reads its job, applies its priority, relays its context."""

    def __init__(self, down_fd: int, up_fd: int) -> None:
        self.down = Connection(down_fd, writable=False)
        self.up = Connection(up_fd, readable=False)
        self._send_lock = threading.Lock()
        self._granted = threading.Semaphore(0)
        self._take_lock = threading.Lock()
        init = self.down.recv()
        self.spec = JobSpec.from_dict(init["spec"])
        problems = Priority(**init["priority"]).apply()
        self.ctx = JobContext(shared_upload=_ParentBucket(self) if init["shared"] else None,
                              timeout=init["timeout"],
                              on_upload=lambda n: self.send(("upload", n, time.time())))
        self.ctx.on_log = lambda level, message: self.send(("log", level, message))
        for line in problems:
            self.send(("log", "warning", line))
        relay = _RunLog(self.ctx)
        for name in ALSO_LOGGED:  # the daemon does not see this process's loggers: the run's log
            logging.getLogger(name).addHandler(relay)
            logging.getLogger(name).setLevel(logging.INFO)
        self._done = threading.Event()
        threading.Thread(target=self._listen, daemon=True, name="kw-job-down").start()
        threading.Thread(target=self._report, daemon=True, name="kw-job-progress").start()

    def send(self, msg: Any) -> None:
        with self._send_lock:
            self.up.send(msg)

    def take(self, n: float) -> None:
        with self._take_lock:  # one request at a time: answers come back in order
            self.send(("take", n))
            while not self._granted.acquire(timeout=0.5):
                self.ctx.check()

    def _listen(self) -> None:
        try:
            while True:
                msg = self.down.recv()
                if msg[0] == "cancel":
                    self.ctx.cancel.set()
                elif msg[0] == "granted":
                    self._granted.release()
        except (EOFError, OSError):
            self.ctx.cancel.set()  # the daemon is gone: stop

    def _report(self) -> None:
        last: tuple[int, int] | None = None
        while not self._done.wait(PROGRESS_EVERY):
            now = (self.ctx.bytes_read, self.ctx.files)
            if now != last:
                self.send(("progress", *now))
                last = now

    def finish(self, outcome: JobOutcome) -> None:
        self._done.set()
        self.send(("progress", self.ctx.bytes_read, self.ctx.files))
        self.send(("outcome", dataclasses.asdict(outcome)))
