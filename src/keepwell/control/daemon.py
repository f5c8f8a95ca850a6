"""The daemon: runs every schedule inside the budgets, retries, pauses and recovers.

One main loop owns the timers (schedule firings, retries, breaker probes) and the `JobQueue`;
each admitted job runs on its own worker thread through `runner.run_job`. Budgets:

* concurrency: `limits.Slots` (overall, per repository, per host);
* bandwidth: one `TokenBucket` shared by every running job, plus each job's own bucket;
* time: each job's deadline, checked on every storage call; a job still running well past it
  is recorded as ``timeout`` and its slot freed.

Failures: a failed job is retried after ``Backoff.delay(attempt)`` (exponential, full jitter)
until its attempts run out. Each source has a `CircuitBreaker`: after ``failure_threshold``
consecutive failed runs the source is paused (its jobs are recorded ``skipped``), an alert is
raised, and after ``reset_after`` one probe job runs; its success closes the breaker.

Crashes: at start, runs left ``running`` by a dead process are marked ``interrupted``, and every
interrupted job that never succeeded is queued again under the same job id. On SIGTERM/SIGINT
the daemon stops scheduling, lets running jobs finish for ``shutdown_grace`` seconds, then
cancels the rest (recorded ``interrupted``, re-run at the next start) and exits.

Reload: SIGHUP (and, with ``watch_config``, a change of the file's modification time, size or
inode, looked at every ``WATCH_INTERVAL`` seconds) re-reads the configuration. A file that does
not validate, or that changes a setting bound at start (`keepwell.control.reload.RESTART_ONLY`),
is refused with its one-line error and the configuration in force stays. Otherwise the change is
applied between two turns of the loop: schedules of new sources and drills start, those of
removed ones stop (their queued jobs and pending retries are dropped; a running job finishes),
changed schedules are recomputed, and the budgets, retry and breaker policies apply to the jobs
that start afterwards. Log streamers of removed or changed sources are stopped, those of new or
changed ones started. Each reload is an event (``config_reloaded`` or
``config_reload_refused``) and is counted in the metrics.
"""

from __future__ import annotations

import fcntl
import heapq
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from keepwell.backends.resilience import Backoff, CircuitBreaker, TokenBucket
from keepwell.control.alerts import Alerts, Outbox
from keepwell.control.config import Config, LoadedConfig, load_config
from keepwell.control.history import open_history
from keepwell.control.jobs import JobContext, JobOutcome, JobSpec, build_job
from keepwell.control.limits import Caps, JobQueue, Slots
from keepwell.control.logs import log_event
from keepwell.control.metrics import KeepwellCollector, LiveFigures, MetricsServer
from keepwell.control.pitr import WindowCache, has_windows
from keepwell.control.reload import ConfigChange, diff_configs
from keepwell.control.runner import LiveJobs, finish, live_entry, run_job
from keepwell.control.schedule import Schedule
from keepwell.control.streamers import StreamSupervisor, source_stream, stop_orphan
from keepwell.control.tracing import open_tracing
from keepwell.errors import ConfigurationError, UsageError

OVERRUN_GRACE = 5.0
WATCH_INTERVAL = 1.0  # seconds between two looks at the configuration file (--watch-config)


class Service(Protocol):
    """Something the daemon runs beside its jobs (the web app): started after the metrics
    endpoint, stopped at shutdown."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


ServiceFactory = Callable[[LiveJobs], Service]


@dataclass
class _Running:
    spec: JobSpec
    ctx: JobContext
    thread: threading.Thread
    run_id: int | None = None
    abandoned: bool = False


@dataclass(order=True)
class _Timer:
    due: float
    seq: int
    what: str = field(compare=False)  # schedule | retry | probe
    action: str = field(compare=False)
    name: str = field(compare=False)
    spec: JobSpec | None = field(default=None, compare=False)


class Daemon:
    def __init__(self, loaded: LoadedConfig, log: logging.Logger,
                 services: Sequence[ServiceFactory] = (), *, watch_config: bool = False) -> None:
        self.loaded = loaded
        self.service_factories = list(services)
        self.services: list[Service] = []
        cfg = self.cfg = loaded.config
        self.log = log
        self.tracing = open_tracing(cfg.tracing)
        self.history = open_history(cfg)
        self.slots = Slots(_caps(cfg))
        self.queue = JobQueue()
        self.outbox = Outbox()  # notifications never hold up the loop or a job
        self._budgets(cfg)
        self.breakers = {
            name: CircuitBreaker(cfg.circuit_breaker.failure_threshold,
                                 cfg.circuit_breaker.reset_after)
            for name in cfg.sources
        }
        self.watch_config = watch_config
        self._config_stamp = _stamp(loaded.path)
        self._last_config_look = time.monotonic()
        self._reload_requested = threading.Event()
        self.reloads = {"ok": 0, "refused": 0}
        self.last_reload: float | None = None
        self.collector: KeepwellCollector | None = None
        self.started_at = time.time()
        self.upload_bytes = 0
        self._upload_lock = threading.Lock()
        self._timers: list[_Timer] = []
        self._seq = itertools.count()
        self._next_runs: dict[tuple[str, str], float] = {}
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last_stale_check = 0.0
        self.streams: dict[str, Any] = {}
        self.metrics: MetricsServer | None = None

    def _budgets(self, cfg: Config) -> None:
        """The budgets and policies jobs start with (at start, and again at each reload: a
        running job keeps the bucket it was given)."""
        self.alerts = Alerts(self.history, cfg.alerts, list(cfg.notifications), self.log,
                             self.outbox)
        self.shared_upload = (TokenBucket(cfg.limits.upload, burst=cfg.limits.upload_burst)
                              if cfg.limits.upload else None)

    # -- timers ---------------------------------------------------------------------------------
    def _add_timer(self, due: float, what: str, action: str, name: str,
                   spec: JobSpec | None = None) -> None:
        with self._lock:
            heapq.heappush(self._timers, _Timer(due, next(self._seq), what, action, name, spec))
        self._wake.set()

    def _schedule_next(self, action: str, name: str, after: float) -> None:
        expr, tz = self._schedule_of(action, name)
        if expr is None:
            return
        due = Schedule(expr, tz).next_after_ts(after)
        with self._lock:
            self._next_runs[(action, name)] = due
        self._add_timer(due, "schedule", action, name)

    def _schedule_of(self, action: str, name: str) -> tuple[str | None, str]:
        if action == "backup":
            src = self.cfg.sources[name]
            return (src.schedule if src.enabled else None), src.timezone or self.cfg.timezone
        drill = self.cfg.drills[name]
        return drill.schedule, drill.timezone or self.cfg.timezone

    def _uploaded(self, n: int) -> None:
        with self._upload_lock:
            self.upload_bytes += n

    # -- live figures ---------------------------------------------------------------------------
    def live(self) -> LiveFigures:
        with self._lock:
            running = sum(1 for r in self._running.values() if not r.abandoned)
            next_runs = {n: t for (a, n), t in self._next_runs.items() if a == "backup"}
        return LiveFigures(
            queue_length=len(self.queue), running=running, upload_bytes=self.upload_bytes,
            upload_limit=self.cfg.limits.upload,
            breakers={n: b.state for n, b in self.breakers.items()},
            next_runs=next_runs,
            streams={n: s.figures for n, s in self.streams.items()},
            started_at=self.started_at,
            reloads=dict(self.reloads),
            last_reload=self.last_reload,
        )

    def submit(self, action: str, name: str, requested_by: str | None) -> str:
        """Queue a job asked for by hand (`LiveJobs`): it runs inside the budgets as soon as a
        slot is free."""
        spec = build_job(self.cfg, action, name, time.time(), trigger="manual",
                         requested_by=requested_by)
        if self._busy(action, spec.name):
            raise UsageError(f"{action} of {name} is already queued or running")
        self.queue.push(spec)
        log_event(self.log, "job_requested", job=spec.job_id, by=requested_by)
        self._wake.set()
        return spec.job_id

    def running(self) -> list[dict[str, Any]]:
        with self._lock:
            return [live_entry(r.spec, r.ctx) for r in self._running.values()
                    if not r.abandoned]

    def health(self) -> dict[str, Any]:
        return {"ok": not self._stop.is_set(), "pid": os.getpid(),
                "uptime": round(time.time() - self.started_at, 3),
                "running": self.live().running, "queued": len(self.queue)}

    # -- start and stop -------------------------------------------------------------------------
    def recover(self) -> int:
        """Mark runs a crash left behind and queue the jobs that never succeeded."""
        for run in self.history.interrupted_runs():
            self.history.mark_interrupted(run.id, "the daemon stopped while the job ran")
            log_event(self.log, "job_interrupted", level=logging.WARNING, job=run.job_id,
                      source=run.source)
        queued = 0
        seen: set[str] = set()
        for run in self.history.runs(status="interrupted", limit=1000):
            if run.job_id in seen or run.spec is None:
                continue
            seen.add(run.job_id)
            if (self.history.job_succeeded(run.job_id) or run.source not in self.cfg.sources
                    or run.trigger == "manual"):
                continue  # a run stopped by hand is not restarted behind the user's back
            spec = JobSpec.from_dict(run.spec).retry("recovery")
            if self.queue.contains(spec.action, spec.name):
                continue
            self.queue.push(spec)
            queued += 1
            log_event(self.log, "job_requeued", job=spec.job_id, source=spec.source)
        return queued

    def request_stop(self, *_: Any) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self, *_: Any) -> None:
        self._reload_requested.set()
        self._wake.set()

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    def start_metrics(self) -> None:
        if self.cfg.metrics.listen:
            collector = self.collector = KeepwellCollector(
                self.history, sorted(self.cfg.sources), self.live,
                WindowCache(self.cfg) if has_windows(self.cfg) else None)
            self.metrics = MetricsServer(self.cfg.metrics.listen, collector, self.health)
            self.metrics.start()
            log_event(self.log, "metrics_listening",
                      address=f"{self.cfg.metrics.listen.rpartition(':')[0]}:{self.metrics.port}")

    def start_streams(self) -> None:
        for source, pid, command in self.history.orphaned_streamers():
            if stop_orphan(pid, command):
                log_event(self.log, "stream_orphan_stopped", level=logging.WARNING,
                          source=source, pid=pid)
            self.history.clear_streamer(source)
        for name in self.cfg.sources:
            self._start_stream(name)

    def _start_stream(self, name: str) -> None:
        found = source_stream(self.cfg, name)
        if found is None:
            return
        stream, env = found
        sup = StreamSupervisor(name, stream, env, self.log, on_lag=self._on_lag,
                               on_spawn=self.history.set_streamer, on_down=self._on_down,
                               on_up=self.alerts.stream_up)
        self.streams[name] = sup
        sup.start()

    def _on_down(self, source: str, seconds: float, code: int | str) -> None:
        sup = self.streams.get(source)
        if sup is not None and sup.config.lag_alert is not None:
            self.alerts.check_down(source, seconds, sup.config.lag_alert, code)

    def _on_lag(self, source: str, samples: list[float]) -> None:
        sup = self.streams.get(source)
        if sup is not None and sup.config.lag_alert is not None:
            self.alerts.check_lag(source, samples, sup.config.lag_alert)

    # -- the loop -------------------------------------------------------------------------------
    def take_lock(self) -> None:
        """One daemon per job history: a second one would run every job twice."""
        locked = self.history.try_lock_daemon()
        if locked is not None:  # PostgreSQL: a session advisory lock, held by our connection
            if not locked:
                raise UsageError(f"another keepwell daemon already uses the job history "
                                 f"{self.history.where}",
                                 hint="stop it first, or give this config another 'history'")
            return
        path = self.cfg.history + ".daemon.lock"
        self._lock_file = open(path, "a+")  # noqa: SIM115 - held for the daemon's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.seek(0)
            other = self._lock_file.read().strip() or "?"
            self._lock_file.close()
            raise UsageError(f"another keepwell daemon (pid {other}) already uses the job "
                             f"history {self.cfg.history}",
                             hint="stop it first, or give this config another 'history'"
                             ) from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()

    def run(self) -> int:
        self.take_lock()
        self.start_metrics()
        for factory in self.service_factories:
            service = factory(self)
            service.start()
            self.services.append(service)
        log_event(self.log, "daemon_started", pid=os.getpid(), config=str(self.loaded.path),
                  sources=len(self.cfg.sources), history=self.history.where)
        for name, breaker_state in self.history.breakers().items():
            if name in self.breakers and breaker_state[0] != "closed":
                self.history.set_breaker(name, "closed", 0)
        self.recover()
        now = time.time()
        for name in self.cfg.sources:
            self._schedule_next("backup", name, now)
        for name in self.cfg.drills:
            self._schedule_next("drill", name, now)
        self.start_streams()
        while not self._stop.is_set():
            self._wake.clear()
            self._maybe_reload()
            now = time.time()
            self._fire_timers(now)
            self._dispatch()
            self._watch_overruns()
            if now - self._last_stale_check >= 1.0:
                self._check_stale(now)
                self._last_stale_check = now
            with self._lock:
                nxt = self._timers[0].due if self._timers else now + 1.0
            self._wake.wait(max(0.0, min(nxt - time.time(), 1.0)))
        return self.shutdown()

    # -- reload ---------------------------------------------------------------------------------
    def _maybe_reload(self) -> None:
        if self._reload_requested.is_set():
            self._reload_requested.clear()
            self.reload("signal")
        elif self.watch_config and time.monotonic() - self._last_config_look >= WATCH_INTERVAL:
            self._last_config_look = time.monotonic()
            if _stamp(self.loaded.path) != self._config_stamp:
                self.reload("file changed")

    def reload(self, reason: str) -> bool:
        """Re-read the configuration file and apply it; False when it was refused."""
        self._config_stamp = _stamp(self.loaded.path)  # a refused file is read again once changed
        try:
            new = load_config(self.loaded.path)
            change = diff_configs(self.cfg, new.config)
        except ConfigurationError as exc:
            self.reloads["refused"] += 1
            log_event(self.log, "config_reload_refused", level=logging.ERROR, reason=reason,
                      error=exc.line())
            return False
        self._apply(new.config, change)
        self.reloads["ok"] += 1
        self.last_reload = time.time()
        log_event(self.log, "config_reloaded", reason=reason, **change.summary())
        return True

    def _apply(self, cfg: Config, change: ConfigChange) -> None:
        old = self.cfg
        keys = {("backup", n) for n in old.sources} | {("drill", n) for n in old.drills}
        before = {key: self._schedule_of(*key) for key in keys}
        self.cfg = cfg
        self.loaded.config = cfg  # what the services built on it (the web app) read
        self.slots.caps = _caps(cfg)
        self._budgets(cfg)
        policy = cfg.circuit_breaker
        for name in change.removed:
            self.breakers.pop(name, None)
        for name in cfg.sources:
            breaker = self.breakers.setdefault(
                name, CircuitBreaker(policy.failure_threshold, policy.reset_after))
            breaker.failure_threshold = policy.failure_threshold
            breaker.reset_after = policy.reset_after
        now_keys = {("backup", n) for n in cfg.sources} | {("drill", n) for n in cfg.drills}
        stale = {key for key in keys if key not in now_keys or
                 self._schedule_of(*key) != before[key]}
        gone = keys - now_keys
        with self._lock:
            self._timers = [t for t in self._timers
                            if not ((t.action, t.name) in gone
                                    or (t.what == "schedule" and (t.action, t.name) in stale))]
            heapq.heapify(self._timers)
            for key in stale:
                self._next_runs.pop(key, None)
        for action, name in self.queue.remove(lambda s: (s.action, s.name) in gone):
            log_event(self.log, "job_dropped", action=action, source=name,
                      reason="no longer configured")
        now = time.time()
        for key in sorted((now_keys - keys) | (stale - gone)):
            self._schedule_next(*key, now)
        for name in change.removed + change.changed:
            sup = self.streams.pop(name, None)
            if sup is not None:
                sup.stop()
        for name in change.added + change.changed:
            if name not in self.streams:
                self._start_stream(name)
        if self.collector is not None:
            self.collector.sources = sorted(cfg.sources)
            self.collector.pitr = WindowCache(cfg) if has_windows(cfg) else None

    def _fire_timers(self, now: float) -> None:
        due: list[_Timer] = []
        with self._lock:
            while self._timers and self._timers[0].due <= now:
                due.append(heapq.heappop(self._timers))
        for t in due:
            if t.what == "schedule":
                self._schedule_next(t.action, t.name, max(now, t.due))
                if self._busy(t.action, t.name):
                    log_event(self.log, "job_not_queued", action=t.action, source=t.name,
                              reason="still queued or running")
                    continue
                self.queue.push(build_job(self.cfg, t.action, t.name, t.due))
            elif t.spec is not None and (t.spec.source in self.cfg.sources
                                         if t.action == "backup" else t.name in self.cfg.drills):
                self.queue.push(t.spec)  # a retry or probe of what is still configured

    def _busy(self, action: str, name: str) -> bool:
        if self.queue.contains(action, name):
            return True
        with self._lock:
            return any(r.spec.action == action and r.spec.name == name and not r.abandoned
                       for r in self._running.values())

    def _dispatch(self) -> None:
        while True:
            spec = self.queue.pop_admissible(self.slots)
            if spec is None:
                return
            if self.history.job_succeeded(spec.job_id):
                self.slots.release(spec)
                continue
            breaker = self.breakers.get(spec.source)
            if spec.action == "backup" and breaker is not None and not breaker.allow():
                self.slots.release(spec)
                self.history.record_skip(job_id=spec.job_id, name=spec.name, source=spec.source,
                                         action=spec.action, kind=spec.kind,
                                         attempt=spec.attempt, trigger=spec.trigger,
                                         reason="circuit open: the source is paused")
                log_event(self.log, "job_skipped", job=spec.job_id, source=spec.source,
                          reason="circuit open")
                if spec.trigger == "probe":  # came a moment early: probe again shortly
                    self._add_timer(time.time() + 0.5, "probe", spec.action, spec.name, spec)
                continue
            ctx = JobContext(shared_upload=self.shared_upload, timeout=spec.timeout,
                             on_upload=self._uploaded)
            thread = threading.Thread(target=self._work, args=(spec, ctx),
                                      name=f"job-{spec.name}", daemon=True)
            with self._lock:
                self._running[spec.job_id] = _Running(spec, ctx, thread)
            thread.start()

    def _work(self, spec: JobSpec, ctx: JobContext) -> None:
        try:
            run_id, outcome = run_job(spec, ctx, self.history, self.alerts, self.log,
                                      self.tracing)
            with self._lock:
                entry = self._running.pop(spec.job_id, None)
            if entry is not None and entry.abandoned:
                return
            self._after(spec, outcome)
        except Exception as exc:  # bookkeeping failed (e.g. history unwritable); keep running
            log_event(self.log, "job_error", level=logging.ERROR, job=spec.job_id,
                      error=f"{type(exc).__name__}: {exc}")
            with self._lock:
                entry = self._running.pop(spec.job_id, None)
            if entry is not None and entry.abandoned:
                return
        self.slots.release(spec)
        self._wake.set()

    def _after(self, spec: JobSpec, outcome: JobOutcome) -> None:
        if spec.action != "backup" or outcome.status == "interrupted":
            return
        breaker = self.breakers.get(spec.source)
        if breaker is None or spec.source not in self.cfg.sources:
            return  # removed by a reload while it ran: no retry, no probe
        was = breaker.state
        if outcome.status == "succeeded":
            breaker.record_success()
            if was != "closed":
                self.history.set_breaker(spec.source, "closed", 0)
                self.alerts.clear(spec.source, "circuit_open")
                log_event(self.log, "circuit_closed", source=spec.source)
            return
        breaker.record_failure()
        policy = self.cfg.sources[spec.source].retries or self.cfg.retries
        if breaker.state != "closed":
            self.history.set_breaker(spec.source, "open", spec.attempt)
            if was == "closed":
                self.alerts.fire(spec.source, "circuit_open",
                                 f"{spec.source} failed {spec.attempt} time(s) in a row and is "
                                 f"paused: {outcome.error}")
                log_event(self.log, "circuit_opened", level=logging.WARNING, source=spec.source)
            probe = self.cfg.circuit_breaker.reset_after + 0.05
            self._add_timer(time.time() + probe, "probe", spec.action, spec.name,
                            spec.retry("probe"))
            return
        if spec.attempt < policy.attempts:
            delay = Backoff(policy.base, policy.cap).delay(spec.attempt - 1)
            log_event(self.log, "job_retry", job=spec.job_id, source=spec.source,
                      attempt=spec.attempt + 1, delay=round(delay, 3))
            self._add_timer(time.time() + delay, "retry", spec.action, spec.name, spec.retry())

    def _watch_overruns(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [r for r in self._running.values() if not r.abandoned
                    and r.ctx.deadline is not None and now > r.ctx.deadline + OVERRUN_GRACE]
            for r in late:
                r.abandoned = True
        for r in late:
            run = next((x for x in self.history.runs(source=r.spec.source, limit=20)
                        if x.job_id == r.spec.job_id and x.status == "running"), None)
            if run is not None:
                finish(run.id, r.spec, JobOutcome("timeout", error="the job ran past its "
                                                  "timeout and did not stop"),
                       self.history, self.alerts, self.log)
            self.slots.release(r.spec)
            self._after(r.spec, JobOutcome("timeout"))

    def _check_stale(self, now: float) -> None:
        for name, src in self.cfg.sources.items():
            if not src.enabled or (src.schedule is None and src.expect_success_within is None):
                continue
            window = src.expect_success_within
            if window is None:
                interval = Schedule(src.schedule or "", src.timezone or self.cfg.timezone
                                    ).typical_interval(now)
                window = interval * self.cfg.alerts.stale_factor
            self.alerts.check_stale(name, window, self.started_at, now)

    def shutdown(self) -> int:
        log_event(self.log, "daemon_stopping", running=self.live().running)
        deadline = time.monotonic() + self.cfg.limits.shutdown_grace
        while time.monotonic() < deadline:
            with self._lock:
                alive = [r for r in self._running.values() if not r.abandoned]
            if not alive:
                break
            time.sleep(0.05)
        with self._lock:
            leftover = [r for r in self._running.values() if not r.abandoned]
        for r in leftover:
            r.ctx.cancel.set()
        for r in leftover:
            r.thread.join(10.0)
        for sup in self.streams.values():
            sup.stop()
        if self.metrics is not None:
            self.metrics.stop()
        for service in self.services:
            service.stop()
        for run in self.history.runs(status="running", limit=1000):
            if self.history.is_mine(run):
                self.history.mark_interrupted(run.id, "the daemon stopped while the job ran")
        self.outbox.close(max((n.timeout for n in self.cfg.notifications), default=0) + 5.0)
        log_event(self.log, "daemon_stopped", cancelled=len(leftover))
        self.history.close()
        if self.tracing is not None:
            self.tracing.close()
        return 0


def _caps(cfg: Config) -> Caps:
    overrides = tuple((n, r.max_concurrent_jobs) for n, r in cfg.repositories.items()
                      if r.max_concurrent_jobs)
    return Caps(cfg.limits.max_concurrent_jobs, cfg.limits.max_concurrent_per_repository,
                cfg.limits.max_concurrent_per_host, overrides)


def _stamp(path: os.PathLike[str] | str) -> tuple[int, int, int] | None:
    """What tells that the configuration file changed (an editor may replace it)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def run_daemon(loaded: LoadedConfig, log: logging.Logger,
               services: Sequence[ServiceFactory] = (), *, watch_config: bool = False) -> int:
    """Run the daemon until stopped; ``services`` are built with it and run beside its jobs.
    With ``watch_config``, a change of the configuration file reloads it as SIGHUP does."""
    daemon = Daemon(loaded, log, services, watch_config=watch_config)
    daemon.install_signals()
    return daemon.run()
