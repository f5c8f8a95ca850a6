"""The priority queue and the concurrency caps."""

from __future__ import annotations

from keepwell.control.jobs import JobSpec
from keepwell.control.limits import Caps, JobQueue, Slots


def _job(name: str, *, priority: int = 0, repo: str = "r", host: str = "h",
         at: float = 0.0) -> JobSpec:
    return JobSpec(job_id=f"backup:{name}:{at}", action="backup", name=name, source=name,
                   kind="files", repository=repo, host=host, priority=priority,
                   scheduled_at=at, timeout=60.0, upload_limit=None)


def test_priority_then_time_then_fifo() -> None:
    q = JobQueue()
    for job in (_job("late", at=2), _job("early", at=1), _job("urgent", priority=5, at=3),
                _job("early2", at=1)):
        q.push(job)
    slots = Slots(Caps(total=10))
    order = [q.pop_admissible(slots) for _ in range(4)]
    assert [j.name for j in order if j] == ["urgent", "early", "early2", "late"]
    assert q.pop_admissible(slots) is None


def test_caps_overall_per_repository_and_per_host() -> None:
    slots = Slots(Caps(total=3, per_repository=2, per_host=2,
                       repository_overrides=(("small", 1),)))
    q = JobQueue()
    for i, (repo, host) in enumerate([("a", "h1"), ("a", "h2"), ("a", "h3"), ("small", "h1"),
                                      ("small", "h4"), ("b", "h1")]):
        q.push(_job(f"j{i}", repo=repo, host=host, at=i))
    taken = []
    while (job := q.pop_admissible(slots)) is not None:
        taken.append(job)
    # j2 waits for repository a's cap; j3 takes small's only slot; total cap 3 stops the rest.
    assert [j.name for j in taken] == ["j0", "j1", "j3"]
    slots.release(taken[0])
    nxt = q.pop_admissible(slots)
    assert nxt is not None and nxt.name == "j2"
    assert slots.peak == 3 and slots.peak_by_repo["a"] == 2


def test_a_blocked_job_does_not_hold_back_others() -> None:
    slots = Slots(Caps(total=5, per_host=1))
    q = JobQueue()
    q.push(_job("db1", host="db", priority=9))
    q.push(_job("db2", host="db", priority=9))
    q.push(_job("files", host="local"))
    got = [q.pop_admissible(slots), q.pop_admissible(slots), q.pop_admissible(slots)]
    assert [j.name if j else None for j in got] == ["db1", "files", None]
    assert q.contains("backup", "db2")
