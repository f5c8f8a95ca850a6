"""The job history: runs, crash detection, breakers, alerts and concurrent writers.

Every case takes ``history_at``, the location of a fresh, empty history: here a SQLite file;
tests/integration/test_control_history.py runs the same cases against SQLite and a real
PostgreSQL.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from keepwell.control.history import History
from keepwell.errors import ConfigurationError

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def history_at(tmp_path: Path) -> str:
    return str(tmp_path / "h.db")


def _start(h: History, job_id: str = "backup:a:1") -> int:
    return h.start_run(job_id=job_id, name="a", source="a", action="backup", kind="files",
                       attempt=1, trigger="schedule", scheduled_at=1.0, spec={"job_id": job_id})


def _in_child(history_at: str, code: str) -> str:
    """Run ``code`` with ``h`` (a History on the same store) in a separate process."""
    script = (f"import sys; sys.path.insert(0, {SRC!r})\n"
              "from keepwell.control.history import History\n"
              f"h = History({history_at!r})\n" + code)
    return subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                          text=True, timeout=120).stdout


def test_runs_are_recorded_with_their_figures(history_at: str) -> None:
    h = History(history_at)
    rid = _start(h)
    h.finish_run(rid, "succeeded", bytes_read=10, bytes_stored=4, bytes_uploaded=5,
                 dedup_ratio=0.6, snapshot_id="abc", details={"files": 2})
    assert not h.finish_run(rid, "failed"), "a finished run cannot be finished again"
    (run,) = h.runs()
    assert (run.status, run.bytes_read, run.snapshot_id, run.details) == (
        "succeeded", 10, "abc", {"files": 2})
    assert run.dedup_ratio == pytest.approx(0.6)
    assert run.duration is not None and run.duration >= 0
    assert h.job_succeeded("backup:a:1") and not h.job_succeeded("backup:a:2")
    assert h.count_by_status() == {("a", "backup", "succeeded"): 1}
    assert h.last_run("a", "backup", "succeeded") is not None
    assert h.last_run("a", "drill") is None
    h.close()


def test_runs_of_a_dead_process_are_found_as_interrupted(history_at: str) -> None:
    h = History(history_at)
    _in_child(history_at, "h.start_run(job_id='j', name='a', source='a', action='backup',"
                          " kind='files', attempt=1, trigger='schedule', scheduled_at=0.0,"
                          " spec={'job_id': 'j'})")
    (run,) = h.interrupted_runs()
    assert run.job_id == "j" and run.spec == {"job_id": "j"}
    h.mark_interrupted(run.id, "crash")
    assert h.interrupted_runs() == []
    assert h.runs()[0].status == "interrupted"
    h.close()


def test_a_live_writer_is_not_taken_for_a_crash(history_at: str) -> None:
    h = History(history_at)
    child = subprocess.Popen(
        [sys.executable, "-c",
         f"import sys; sys.path.insert(0, {SRC!r})\n"
         "from keepwell.control.history import History\n"
         f"h = History({history_at!r})\n"
         "h.start_run(job_id='live', name='a', source='a', action='backup', kind='files',"
         " attempt=1, trigger='schedule', scheduled_at=0.0, spec={'job_id': 'live'})\n"
         "print('started', flush=True)\n"
         "sys.stdin.readline()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "started"
        assert h.interrupted_runs() == [], "the writer still runs: its run is not interrupted"
    finally:
        child.kill()
        child.wait()
    (run,) = h.interrupted_runs()
    assert run.job_id == "live"
    h.close()


def test_breaker_states_persist(history_at: str) -> None:
    h = History(history_at)
    h.set_breaker("db", "open", 3)
    h.set_breaker("db", "closed", 0)
    assert h.breakers()["db"][:2] == ("closed", 0)
    h.close()
    h2 = History(history_at)
    assert h2.breakers()["db"][:2] == ("closed", 0)
    h2.close()


def test_alert_notifies_once_while_active(history_at: str) -> None:
    h = History(history_at)
    assert h.raise_alert("a:stale", "a", "stale", "no backup") is True
    assert h.raise_alert("a:stale", "a", "stale", "still no backup") is False
    (alert,) = h.alerts()
    assert alert.message == "still no backup" and alert.active
    assert h.resolve_alert("a:stale") and not h.resolve_alert("a:stale")
    assert h.alerts() == [] and len(h.alerts(active_only=False)) == 1
    assert h.raise_alert("a:stale", "a", "stale", "again") is True
    h.close()


def test_concurrent_writers_lose_nothing(history_at: str) -> None:
    """Threads of one process and two other processes write at once: every run is kept,
    and exactly one writer wins the activation of one alert."""
    History(history_at).close()  # create the schema before the writers race
    h = History(history_at)
    per_writer = 40
    code = (f"n = 0\n"
            f"for i in range({per_writer}):\n"
            "    rid = h.start_run(job_id=f'p{sys.argv[1]}-{i}', name='p', source='p',"
            " action='backup', kind='files', attempt=1, trigger='schedule',"
            " scheduled_at=float(i), spec=None)\n"
            "    h.finish_run(rid, 'succeeded', bytes_read=i)\n"
            "    n += h.raise_alert('p:race', 'p', 'anomaly_size', 'x')\n"
            "print(n)\n")
    script = (f"import sys; sys.path.insert(0, {SRC!r})\n"
              "from keepwell.control.history import History\n"
              f"h = History({history_at!r})\n" + code)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(k)], stdout=subprocess.PIPE,
                              text=True) for k in range(2)]
    wins: list[int] = []

    def writer(k: int) -> None:
        n = 0
        for i in range(per_writer):
            rid = h.start_run(job_id=f"t{k}-{i}", name="t", source="t", action="backup",
                              kind="files", attempt=1, trigger="schedule",
                              scheduled_at=float(i), spec=None)
            h.finish_run(rid, "succeeded", bytes_read=i)
            n += h.raise_alert("p:race", "p", "anomaly_size", "x")
        wins.append(n)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outs = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    counts = h.count_by_status()
    assert counts[("t", "backup", "succeeded")] == 2 * per_writer
    assert counts[("p", "backup", "succeeded")] == 2 * per_writer
    ids = [r.id for r in h.runs(limit=1000)]
    assert len(ids) == len(set(ids)) == 4 * per_writer
    assert sum(wins) + sum(outs) == 1, "the alert became active once, for one writer"
    h.close()


def test_a_history_without_sessions_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, job_id TEXT NOT NULL, name TEXT NOT"
               " NULL, source TEXT NOT NULL, action TEXT NOT NULL, kind TEXT NOT NULL, attempt"
               " INTEGER NOT NULL DEFAULT 1, trigger TEXT NOT NULL DEFAULT 'schedule', status"
               " TEXT NOT NULL, scheduled_at REAL, started_at REAL NOT NULL, ended_at REAL,"
               " error TEXT, bytes_read INTEGER, bytes_stored INTEGER, bytes_uploaded INTEGER,"
               " dedup_ratio REAL, snapshot_id TEXT, rto REAL, rpo REAL, pid INTEGER, spec TEXT,"
               " details TEXT)")
    db.execute("INSERT INTO runs (job_id, name, source, action, kind, status, started_at, pid)"
               " VALUES ('old', 'a', 'a', 'backup', 'files', 'succeeded', 1.0, 1)")
    db.commit()
    db.close()
    h = History(str(path))
    _start(h, "new")
    assert [r.job_id for r in h.runs()] == ["new", "old"]
    assert h.job_succeeded("old")
    h.close()


def test_an_acknowledged_alert_stays_active_until_resolved_and_reopens(history_at: str) -> None:
    h = History(history_at)
    assert h.raise_alert("a:stale", "a", "stale", "late")
    assert h.acknowledge_alert("a:stale", "web:operator")
    assert not h.acknowledge_alert("a:stale", "web:operator")  # once
    (alert,) = h.alerts()
    assert alert.active and not alert.open and alert.acknowledged_by == "web:operator"
    assert not h.raise_alert("a:stale", "a", "stale", "still late")  # no new notification
    assert not h.alerts()[0].open
    assert h.resolve_alert("a:stale")
    assert not h.acknowledge_alert("a:stale", "web:operator")  # nothing active to acknowledge
    assert h.raise_alert("a:stale", "a", "stale", "late again")
    (alert,) = h.alerts()
    assert alert.open and alert.acknowledged_at is None
    h.close()


def test_runs_keep_their_log_lines(history_at: str) -> None:
    h = History(history_at)
    first, second = _start(h, "backup:a:1"), _start(h, "backup:a:2")
    h.add_log(first, "info", "started")
    h.add_log(second, "info", "other run")
    h.add_log(first, "warning", "a file vanished")
    assert [(line["level"], line["message"]) for line in h.run_log(first)] == [
        ("info", "started"), ("warning", "a file vanished")]
    assert h.run(first) is not None and h.run(first).job_id == "backup:a:1"  # type: ignore[union-attr]
    assert h.run(999) is None
    assert [r.id for r in h.runs_for_job("backup:a:2")] == [second]
    h.close()


def test_a_history_without_acknowledgements_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE alerts (key TEXT PRIMARY KEY, source TEXT NOT NULL, kind TEXT NOT"
               " NULL, message TEXT NOT NULL, active INTEGER NOT NULL, first_at REAL NOT NULL,"
               " last_at REAL NOT NULL, notified_at REAL, resolved_at REAL)")
    db.execute("INSERT INTO alerts VALUES ('a:stale', 'a', 'stale', 'late', 1, 1.0, 1.0, NULL,"
               " NULL)")
    db.commit()
    db.close()
    h = History(str(path))
    (alert,) = h.alerts()
    assert alert.open
    assert h.acknowledge_alert("a:stale", "someone")
    assert not h.alerts()[0].open
    h.close()


def test_two_histories_of_one_process_see_another_process_write(tmp_path: Path) -> None:
    """A process with two connections to one SQLite history (the web app beside its jobs) keeps
    its file locks: opening the second must not drop the first's, or other writers corrupt the
    file and the readers stop seeing new runs."""
    at = str(tmp_path / "h.db")
    first = History(at)
    _start(first, "backup:a:0")
    second = History(at)
    try:
        for k in range(1, 4):
            _in_child(at, f"h.start_run(job_id='backup:a:{k}', name='a', source='a', "
                          "action='backup', kind='files', attempt=1, trigger='schedule', "
                          "scheduled_at=1.0, spec={})\n")
            assert first.runs()[0].job_id == f"backup:a:{k}"
            assert second.runs()[0].job_id == f"backup:a:{k}"
        check = _in_child(at, "print(h._store.db.execute('PRAGMA integrity_check').fetchone()[0])")
        assert check.strip() == "ok"
    finally:
        first.close()
        second.close()


def test_a_damaged_history_says_what_to_do_with_it(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    path.write_bytes(b"not a database at all, but long enough to be read as one " * 100)
    with pytest.raises(ConfigurationError) as exc:
        History(str(path))
    line = exc.value.line()
    assert f"cannot open the job history {path}: file is not a database" in line
    assert "move it aside" in line and "permissions" not in line
