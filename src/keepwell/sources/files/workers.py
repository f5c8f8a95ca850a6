"""Worker processes for the parts of a file backup or restore that Python would serialise.

One process hands the GIL from thread to thread around every system call and every native call;
with tens of thousands of small files, on two cores, those hand-overs (futex wake-ups, context
switches) cost more than the work itself. `Workers` runs a handler in a few fresh interpreters
instead, each single-threaded where it matters, and talks to them over pipes:

- a handler is named as ``module:factory``; the factory gets the ``init`` dict and returns an
  object with ``handle(request) -> answer`` and ``finish() -> dict`` (totals for the caller);
- requests sent to one worker are answered in order; at most `IN_FLIGHT` per worker are
  unanswered, so memory stays flat and a slow worker slows its sender;
- each answer is passed to the request's callback in a result thread of the caller;
- a handler with a ``prefetch(request)`` method is told of the requests waiting behind the
  current one, so it can start their input (a remote read) while it works on the current one;
- an exception in a worker ends the run with that exception (or one that says the same); a
  worker that dies ends it with a clear error; a worker whose caller dies reads end-of-file and
  exits.

The workers are started as ``python -c`` (not multiprocessing's spawn, which would run the
caller's main script again in each child).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from keepwell.cpus import usable_cores
from keepwell.errors import KeepwellError, UsageError

IN_FLIGHT = 3
# the default's ceiling on a large machine: one main process walks the tree or the snapshot and
# feeds every worker, and each worker is an interpreter of its own (30-70 MiB)
MAX_PROCESSES = 8

_MAIN = ("import sys; from multiprocessing.connection import Connection as C; "
         "from keepwell.sources.files.workers import serve; "
         "serve(C(int(sys.argv[1]), writable=False), C(int(sys.argv[2]), readable=False))")


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    requests: Connection
    answers: Connection
    slots: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(IN_FLIGHT))
    lock: threading.Lock = field(default_factory=threading.Lock)  # the waiting table
    send_lock: threading.Lock = field(default_factory=threading.Lock)  # ids and sends in one order
    next_id: int = 0
    waiting: dict[int, Callable[[Any], None]] = field(default_factory=dict)
    totals: dict[str, Any] | None = None
    receiver: threading.Thread | None = None


class Workers:
    def __init__(self, handler: str, init: dict[str, Any], processes: int,
                 on_error: Callable[[BaseException], None], what: str) -> None:
        self.what = what  # "file reader", "file writer": for messages
        self._on_error = on_error
        self._error: BaseException | None = None
        self._closing = False
        self._workers: list[_Worker] = []
        try:
            for _ in range(processes):
                self._workers.append(_start({"handler": handler, **init}, what))
        except BaseException:
            self.terminate()
            raise
        for w in self._workers:
            w.receiver = threading.Thread(target=self._receive, args=(w,), daemon=True,
                                          name=f"kw-{what.replace(' ', '-')}-results")
            w.receiver.start()

    def __len__(self) -> int:
        return len(self._workers)

    @property
    def error(self) -> BaseException | None:
        return self._error

    def least_busy(self) -> int:
        """The worker with the fewest requests unanswered (the first of them on a tie)."""
        loads = [len(w.waiting) for w in self._workers]
        return loads.index(min(loads))

    def send(self, i: int, request: Any, done: Callable[[Any], None]) -> None:
        """Send a request to worker ``i``; ``done(answer)`` is called once it is answered.
        Blocks while that worker has `IN_FLIGHT` requests unanswered."""
        w = self._workers[i]
        while not w.slots.acquire(timeout=0.5):
            if self._error is not None:
                raise self._error
        if self._error is not None:
            raise self._error
        with w.send_lock:  # not the waiting table's lock: a send may wait for the worker to read
            with w.lock:
                rid = w.next_id
                w.next_id += 1
                w.waiting[rid] = done
            try:
                w.requests.send(("do", rid, request))
            except (OSError, ValueError):
                raise self._fail(self._gone(w)) from None

    def _receive(self, w: _Worker) -> None:
        try:
            while True:
                msg = w.answers.recv()
                if msg[0] == "done":
                    with w.lock:
                        done = w.waiting.pop(msg[1])
                    w.slots.release()
                    done(msg[2])
                elif msg[0] == "closed":
                    w.totals = msg[1]
                    return
                else:  # "failed"
                    self._fail(msg[1])
                    return
        except (EOFError, OSError):
            self._fail(self._gone(w))
        except BaseException as exc:
            self._fail(exc)

    def _gone(self, w: _Worker) -> KeepwellError:
        return _ended(self.what, w.process)

    def _fail(self, exc: BaseException) -> BaseException:
        if self._error is None:
            self._error = exc
            self._on_error(exc)
        for w in self._workers:
            w.slots.release()  # wake a sender waiting for a slot: it sees the error
        return self._error

    def close(self) -> list[dict[str, Any]]:
        """Let every worker finish what it was sent; their ``finish()`` totals."""
        try:
            if self._error is None:
                for w in self._workers:
                    with w.send_lock:
                        try:
                            w.requests.send(("close",))
                        except (OSError, ValueError):  # it died: say so (a raw broken pipe
                            self._fail(self._gone(w))  # would end the command without a word)
                            break
            if self._error is None:
                for w in self._workers:
                    assert w.receiver is not None
                    w.receiver.join()
            if self._error is not None:
                raise self._error
            return [w.totals or {} for w in self._workers]
        finally:
            self.terminate()

    def terminate(self) -> None:
        for w in self._workers:
            if w.totals is None and w.process.poll() is None:
                w.process.terminate()
            try:
                w.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait()
            w.requests.close()
            w.answers.close()


def _ended(what: str, process: subprocess.Popen[bytes]) -> KeepwellError:
    """The error for a worker that is gone (its pipe broke or closed)."""
    try:
        code = process.wait(timeout=2)
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    except subprocess.TimeoutExpired:
        how = "its pipe closed"
    return KeepwellError(f"a {what} process ended unexpectedly ({how})",
                         hint="what it stored stays usable; run the command again")


def _start(init: dict[str, Any], what: str) -> _Worker:
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    try:
        p = subprocess.Popen([sys.executable, "-c", _MAIN, str(down_r), str(up_w)],
                             pass_fds=(down_r, up_w), stdin=subprocess.DEVNULL, close_fds=True)
    except BaseException:
        for fd in (down_r, down_w, up_r, up_w):
            os.close(fd)
        raise
    os.close(down_r)
    os.close(up_w)
    w = _Worker(p, Connection(down_w, readable=False), Connection(up_r, writable=False))
    try:
        w.requests.send(init)
    except (OSError, ValueError):  # it died at once
        p.kill()
        raise _ended(what, p) from None
    return w


# -- in the worker process ------------------------------------------------------------------------
def serve(requests: Connection, answers: Connection) -> None:
    try:
        init = requests.recv()
    except EOFError:
        return
    try:
        from keepwell.memory import tune_malloc

        tune_malloc()
        module, factory = init["handler"].split(":")
        handler = getattr(importlib.import_module(module), factory)(init)
        prefetch = getattr(handler, "prefetch", None)
        waiting: deque[Any] = deque()
        while True:
            if not waiting:
                waiting.append(requests.recv())
            if prefetch is not None:  # the requests already sent: let the handler start on them
                while len(waiting) < IN_FLIGHT and requests.poll():
                    waiting.append(requests.recv())
                for m in list(waiting)[1:]:
                    if m[0] == "do":
                        prefetch(m[2])
            msg = waiting.popleft()
            if msg[0] == "close":
                answers.send(("closed", handler.finish()))
                return
            answers.send(("done", msg[1], handler.handle(msg[2])))
    except (EOFError, BrokenPipeError):
        return  # the caller is gone
    except BaseException as exc:
        try:
            answers.send(("failed", _portable(exc)))
        except BaseException:
            pass


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it crosses a pipe intact, else one that says the same."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return KeepwellError(f"worker process: {exc}")


def repository_init(repo: Any) -> dict[str, Any]:
    """What a worker needs to open ``repo`` again (keepwell.repository.repo.reopen_repository)."""
    assert repo.opened_as is not None
    location, options = repo.opened_as
    return {"location": location, "options": options, "master": repo.master.raw,
            "config": repo.config, "key_id": repo.key_id, "senders": dict(repo.senders)}


def can_reopen(repo: Any) -> bool:
    """Whether worker processes can open this repository's storage again: it was opened from a
    location that is not in this process's memory, and no bandwidth limit (a per-process token
    bucket, or budgets shared with other work of this process) is set."""
    if repo.opened_as is None:
        return False
    location, options = repo.opened_as
    return not location.startswith("memory://") and not options.get("limit_upload") \
        and not options.get("limit_download") and not options.get("shared_budgets")


def worker_count(variable: str, *, reserve: int = 0) -> int:
    """Worker processes from an environment variable (0: none), else one per core this process
    may use (`keepwell.cpus.usable_cores`: its CPU affinity, as a container or `taskset` sets
    it, and its cgroup's CPU quota), but for ``reserve`` cores left to a main process that has
    a core's worth of work of its own; at least one, at most `MAX_PROCESSES`."""
    value = os.environ.get(variable)
    if value is not None:
        try:
            return max(0, int(value))
        except ValueError:
            raise UsageError(f"{variable}={value!r} is not a number") from None
    return min(MAX_PROCESSES, max(1, usable_cores() - reserve))
