"""Supervised log streamers: long-running WAL/binlog jobs kept alive with restart backoff.

A streamer is the command of a source's ``stream`` setting (for example the PostgreSQL source's
WAL receiver). The supervisor starts it, restarts it when it exits (after a delay drawn with
exponential backoff and full jitter; the count starts again once it has run for ``restart_cap``
seconds), and stops it on shutdown (SIGTERM, then SIGKILL after a grace period).

A streamer runs in its own process group. Its pid is recorded in the job history, so a daemon
that was killed without a chance to stop it has the orphan stopped by the next daemon (after
checking that the pid still runs the same command) before a new one starts.

Protocol: a streamer may print JSON lines such as ``{"lag_seconds": 3.5, "spool_depth": 2}`` on
its standard output; the supervisor keeps the latest figures for metrics and the lag alert.

Down: a streamer is failing from its first exit after it was last well (it reported a lag, or
ran for ``restart_cap`` seconds); ``on_down`` hears at each exit how long that has been, and
``on_up`` when it is well again. A streamer that cannot start (a repository that cannot be
opened) reports no lag at all: this is what raises the ``stream_down`` alert for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from keepwell.backends.resilience import Backoff
from keepwell.control.config import Config, FilesSource, StreamConfig
from keepwell.control.jobs import JobContext, build_job, source_job
from keepwell.control.logs import log_event
from keepwell.control.metrics import StreamFigures
from keepwell.sources.base import source_for


def watch_stream(src: FilesSource, tags: list[str]) -> StreamConfig:
    """The streamer of a files source in ``mode: continuous``: ``keepwell watch`` on its paths,
    whose JSON lines give the lag (the age of the oldest change at each commit)."""
    command = [sys.executable, "-m", "keepwell.cli.main", "watch", *src.paths, "--json",
               "--max-delay", f"{src.max_delay}s", "--quiet-time", f"{src.quiet_time}s"]
    for pattern in src.excludes:
        command += ["--exclude", pattern]
    for tag in tags:
        command += ["--tag", tag]
    if src.host:
        command += ["--host", src.host]
    if src.notify != "auto":
        command += ["--notify", src.notify]
    return StreamConfig(command=command, lag_alert=src.lag_alert)


def source_stream(cfg: Config, name: str) -> tuple[StreamConfig, dict[str, str]] | None:
    """The streamer of source ``name`` and the environment it runs in (its repository and
    credentials, as its jobs get them): its ``stream`` command, or ``keepwell watch`` for a
    files source in ``mode: continuous``; None for a source that does not stream, or is
    disabled. The daemon and the fleet's workers start the same one."""
    src = cfg.sources[name]
    stream: StreamConfig | None = getattr(src, "stream", None)
    continuous = isinstance(src, FilesSource) and src.mode == "continuous"
    if (stream is None and not continuous) or not src.enabled:
        return None
    job = source_job(build_job(cfg, "backup", name, time.time()))
    if isinstance(src, FilesSource):
        stream = watch_stream(src, list(job.tags))
    assert stream is not None
    return stream, source_for(src.kind).environment(job, JobContext())


class StreamSupervisor:
    def __init__(self, source: str, config: StreamConfig, env: dict[str, str],
                 log: logging.Logger, on_lag: Callable[[str, list[float]], None] | None = None,
                 on_spawn: Callable[[str, int, list[str]], None] | None = None,
                 on_down: Callable[[str, float, int | str], None] | None = None,
                 on_up: Callable[[str], None] | None = None) -> None:
        self.source = source
        self.config = config
        self.env = env
        self.log = log
        self.on_lag = on_lag
        self.on_spawn = on_spawn
        self.on_down = on_down
        self.on_up = on_up
        # monotonic time of the first exit since the streamer was last well; None while well
        self.failing_since: float | None = None
        self.figures = StreamFigures()
        self.lag_samples: deque[float] = deque(maxlen=10)
        self._stop = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._run, name=f"stream-{source}", daemon=True)
        self._backoff = Backoff(config.restart_base, config.restart_cap)

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace: float = 10.0) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._thread.join(grace + 5)

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if not isinstance(doc, dict):
                continue
            if isinstance(doc.get("lag_seconds"), int | float):
                self._well()
                self.figures.lag_seconds = float(doc["lag_seconds"])
                self.lag_samples.append(self.figures.lag_seconds)
                if self.on_lag is not None:
                    self.on_lag(self.source, list(self.lag_samples))
            if isinstance(doc.get("spool_depth"), int | float):
                self.figures.spool_depth = float(doc["spool_depth"])

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                proc = subprocess.Popen(self.config.command, env=self.env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
            except OSError as exc:
                code: int | str = f"cannot start: {exc.strerror}"
            else:
                self._proc = proc
                self.figures.up = True
                if self.on_spawn is not None:
                    self.on_spawn(self.source, proc.pid, list(self.config.command))
                log_event(self.log, "stream_started", source=self.source, pid=proc.pid)
                # well once it has run for restart_cap seconds, even if it never reports a lag
                timer = threading.Timer(self.config.restart_cap, self._well)
                timer.daemon = True
                timer.start()
                try:
                    self._read(proc)
                    code = proc.wait()
                finally:
                    timer.cancel()
                self.figures.up = False
            if self._stop.is_set():
                break
            now = time.monotonic()
            if now - started >= self.config.restart_cap:
                failures = 0
                self._well()
            if self.failing_since is None:
                self.failing_since = now
            if self.on_down is not None:
                self.on_down(self.source, now - self.failing_since, code)
            delay = self._backoff.delay(failures)
            failures += 1
            self.figures.restarts += 1
            log_event(self.log, "stream_exited", level=logging.WARNING, source=self.source,
                      code=code, restart_in=round(delay, 3))
            self._stop.wait(delay)

    def _well(self) -> None:
        if self.failing_since is not None:
            self.failing_since = None
            if self.on_up is not None:
                self.on_up(self.source)


def stop_orphan(pid: int, command: list[str]) -> bool:
    """Stop a streamer left by a killed daemon, if ``pid`` still runs ``command``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return False
    if argv != command:
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        return False
    for _ in range(50):
        if not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    return True
