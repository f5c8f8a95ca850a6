"""The SQLite job history: runs, crash detection, breakers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from keepwell.control.history import History


def _start(h: History, job_id: str = "backup:a:1") -> int:
    return h.start_run(job_id=job_id, name="a", source="a", action="backup", kind="files",
                       attempt=1, trigger="schedule", scheduled_at=1.0, spec={"job_id": job_id})


def test_runs_are_recorded_with_their_figures(tmp_path: Path) -> None:
    h = History(str(tmp_path / "h.db"))
    rid = _start(h)
    h.finish_run(rid, "succeeded", bytes_read=10, bytes_stored=4, bytes_uploaded=5,
                 dedup_ratio=0.6, snapshot_id="abc", details={"files": 2})
    (run,) = h.runs()
    assert (run.status, run.bytes_read, run.snapshot_id, run.details) == (
        "succeeded", 10, "abc", {"files": 2})
    assert run.duration is not None and run.duration >= 0
    assert h.job_succeeded("backup:a:1") and not h.job_succeeded("backup:a:2")
    assert h.count_by_status() == {("a", "backup", "succeeded"): 1}
    h.close()


def test_runs_of_a_dead_process_are_found_as_interrupted(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parents[2] / 'src')!r});"
            "from keepwell.control.history import History;"
            f"h = History({str(db)!r});"
            "h.start_run(job_id='j', name='a', source='a', action='backup', kind='files',"
            " attempt=1, trigger='schedule', scheduled_at=0.0, spec={'job_id': 'j'})")
    subprocess.run([sys.executable, "-c", code], check=True)
    h = History(str(db))
    (run,) = h.interrupted_runs()
    assert run.job_id == "j" and run.spec == {"job_id": "j"}
    h.mark_interrupted(run.id, "crash")
    assert h.interrupted_runs() == []
    assert h.runs()[0].status == "interrupted"
    h.close()


def test_breaker_states_persist(tmp_path: Path) -> None:
    h = History(str(tmp_path / "h.db"))
    h.set_breaker("db", "open", 3)
    h.set_breaker("db", "closed", 0)
    assert h.breakers()["db"][:2] == ("closed", 0)
    h.close()
