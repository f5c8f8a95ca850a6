"""Prune: repacking, the two-phase delete, the prune lock, and what check says meanwhile."""

from __future__ import annotations

import io
import json
import os
import secrets
import time

import pytest

from keepwell.backends.memory import MemoryBackend
from keepwell.chunker import ChunkerParams
from keepwell.errors import UsageError
from keepwell.repository import Repository
from keepwell.repository.check import check
from keepwell.repository.format import DATA, PackEntry
from keepwell.repository.prune import (
    PackUse,
    PruneOptions,
    UnusedLimit,
    choose,
    load_pending,
    parse_max_unused,
    prune,
)
from keepwell.repository.sessions import (
    KIND_LOCK,
    PRUNE_LOCK,
    PruneBusyError,
    PruneLock,
    Session,
)
from keepwell.repository.snapshot import Snapshot

os.environ.setdefault("KEEPWELL_TESTONLY_WEAK_KDF", "1")

NOW = PruneOptions(grace=0, max_unused=UnusedLimit(percent=0))


def _repo() -> Repository:
    # every test file below the smallest chunk size: one blob per file, so counts are exact
    params = ChunkerParams(seed=secrets.randbits(62), min_size=1 << 20, avg_size=2 << 20,
                           max_size=8 << 20)
    return Repository.init(MemoryBackend(), "pw", chunker=params)


def _snap(repo: Repository, files: dict[str, bytes]) -> Snapshot:
    with repo.new_snapshot("stdin", sorted(files)) as w:
        for name, data in files.items():
            w.add_stream(name, io.BytesIO(data))
        return w.commit()


def _packs(repo: Repository) -> set[str]:
    return {i.name for p in ("data/", "tree/") for i in repo.backend.list(p)}


def _read(repo: Repository, snap: Snapshot, name: str) -> bytes:
    fresh = Repository.open(repo.backend, "pw")
    return b"".join(fresh.iter_file(snap, name))


def test_partly_used_pack_is_repacked_then_deleted() -> None:
    repo = _repo()
    a, b = os.urandom(700_000), os.urandom(700_000)
    first = _snap(repo, {"a": a, "b": b})
    second = _snap(repo, {"a": a})
    before = _packs(repo)
    repo.forget([first.id])

    rep = prune(repo, NOW)
    assert rep.packs_repacked == 1 and rep.blobs_repacked == 1
    assert rep.bytes_repacked >= 700_000 and rep.packs_written == 1
    assert rep.packs_marked >= 2  # the repacked data pack and first's tree pack
    assert rep.packs_deleted == 0  # phase 2 needs another run
    assert rep.packs_pending == rep.packs_marked
    assert check(Repository.open(repo.backend, "pw"), read_data_fraction=1.0).ok
    assert _read(repo, second, "a") == a

    rep2 = prune(repo, NOW)
    assert rep2.packs_deleted == rep.packs_marked and rep2.bytes_freed > 700_000
    assert rep2.packs_pending == 0 and not list(repo.backend.list("pending/"))
    assert not (_packs(repo) & {n for n in before if n.startswith("data/")})
    fresh = Repository.open(repo.backend, "pw")
    assert check(fresh, read_data_fraction=1.0).ok
    assert _read(repo, second, "a") == a


def test_max_unused_tolerates_unused_data() -> None:
    repo = _repo()
    a, b = os.urandom(700_000), os.urandom(700_000)
    first = _snap(repo, {"a": a, "b": b})
    _snap(repo, {"a": a})
    repo.forget([first.id])
    rep = prune(repo, PruneOptions(grace=0, max_unused=parse_max_unused("60%")))
    assert rep.packs_repacked == 0 and rep.unused_bytes_left >= 700_000
    rep = prune(repo, PruneOptions(grace=0, max_unused=parse_max_unused("0%"),
                                   max_repack_bytes=100_000))
    assert rep.packs_repacked == 0  # over the repack budget
    assert prune(repo, NOW).packs_repacked == 1


def test_wait_deletes_in_the_same_run() -> None:
    repo = _repo()
    first = _snap(repo, {"x": os.urandom(600_000)})
    _snap(repo, {"y": os.urandom(600_000)})
    repo.forget([first.id])
    rep = prune(repo, PruneOptions(grace=0.3, wait=True))
    assert rep.packs_marked >= 2 and rep.packs_deleted == rep.packs_marked
    assert rep.packs_pending == 0


def test_backup_that_loaded_the_old_index_keeps_its_blobs() -> None:
    """A backup that began before the marking dedups against a doomed pack and commits after it:
    phase 2 puts the pack back into the index instead of deleting it."""
    repo = _repo()
    data = os.urandom(900_000)
    old = _snap(repo, {"x": data})
    repo.forget([old.id])
    early = Session(repo, "a backup running at the first prune")
    assert prune(repo, NOW).packs_deferred == 2
    other = Repository.open(repo.backend, "pw")  # another process
    with other.new_snapshot("stdin", ["again"]) as writer:  # session written, index loaded
        early.end()
        marked = prune(repo, NOW)
        assert marked.packs_marked == 2 and marked.waiting_for_sessions == 1
        writer.add_stream("again", io.BytesIO(data))  # a known blob: not uploaded again
        snap = writer.commit()
    # every chunk of the data is known (random data may cut into one or two chunks); the tree is new
    assert snap.summary["blobs_known"] >= 1 and snap.summary["blobs_new"] == 1
    report = check(Repository.open(repo.backend, "pw"))
    assert report.ok, report.errors
    assert any("run 'keepwell prune'" in w for w in report.warnings)
    # before the next prune puts the pack back, readers find the blob in the pending pack
    assert _read(Repository.open(repo.backend, "pw"), snap, "again") == data
    rep = prune(repo, NOW)
    assert rep.packs_restored == 1 and rep.packs_deleted == 1  # the data pack back, the tree gone
    assert _read(repo, snap, "again") == data
    assert check(Repository.open(repo.backend, "pw"), read_data_fraction=1.0).ok


def test_unused_packs_wait_for_the_sessions_live_when_seen() -> None:
    """A wholly unused pack may be a running backup's fresh upload: it is deferred until the
    sessions live then have ended, then marked, then deleted once the sessions live at the
    marking have ended; sessions that began after the marking hold nothing back."""
    repo = _repo()
    old = _snap(repo, {"x": os.urandom(600_000)})
    repo.forget([old.id])
    first = Session(repo, "a backup running when the pack is first seen unused")
    rep = prune(repo, NOW)
    assert rep.packs_deferred == 2 and rep.packs_marked == 0 and rep.packs_kept == 2
    rep = prune(repo, NOW)
    assert rep.packs_deferred == 2 and rep.packs_marked == 0  # `first` still runs
    second = Session(repo, "a backup running at the marking")
    first.end()
    rep = prune(repo, NOW)
    assert rep.packs_marked == 2 and rep.packs_deferred == 0 and rep.packs_deleted == 0
    third = Session(repo, "a backup that began after the marking")
    try:
        rep = prune(repo, NOW)
        assert rep.packs_deleted == 0 and rep.waiting_for_sessions == 1
        second.end()
        rep = prune(repo, NOW)  # `third` holds nothing back
        assert rep.packs_deleted == 2 and rep.live_sessions == 1 and rep.packs_pending == 0
    finally:
        second.end()
        third.end()


def test_grace_period_holds_deletion() -> None:
    repo = _repo()
    old = _snap(repo, {"x": os.urandom(600_000)})
    repo.forget([old.id])
    assert prune(repo, PruneOptions(grace=3600)).packs_marked >= 1
    rep = prune(repo, PruneOptions(grace=3600))
    assert rep.packs_deleted == 0 and rep.packs_pending >= 1 and rep.waiting_for_sessions == 0
    assert prune(repo, NOW).packs_deleted >= 1


def test_pack_listed_again_or_by_a_younger_record_is_not_deleted() -> None:
    repo = _repo()
    old = _snap(repo, {"x": os.urandom(600_000)})
    index_before = {i.name: repo.backend.get(i.name) for i in repo.backend.list("index/")}
    repo.forget([old.id])
    rep = prune(repo, NOW)
    assert rep.packs_marked >= 2
    for name, data in index_before.items():  # an index object lists the doomed packs again
        repo.backend.put(name, data)
    rep = prune(repo, NOW)
    assert rep.packs_deleted == 0 and rep.packs_marked >= 2  # kept, and marked afresh
    assert check(Repository.open(repo.backend, "pw"), read_data_fraction=1.0).ok


def test_orphan_pack_is_marked_not_deleted_at_once() -> None:
    repo = _repo()
    _snap(repo, {"x": os.urandom(600_000)})
    for info in list(repo.backend.list("index/")):  # a run killed before its index was written
        repo.backend.delete(info.name)
    repo.forget([s.id for s in repo.list_snapshots()])
    session = Session(repo, "the uploader, still running")
    try:
        rep = prune(repo, NOW)
        assert rep.packs_marked == 2 and rep.packs_deleted == 0
    finally:
        session.end()
    assert prune(repo, NOW).packs_deleted == 2
    assert not _packs(repo)


def test_orphan_pack_a_snapshot_uses_is_adopted() -> None:
    repo = _repo()
    data = os.urandom(600_000)
    snap = _snap(repo, {"x": data})
    for info in list(repo.backend.list("index/")):
        repo.backend.delete(info.name)
    rep = prune(repo, NOW)
    assert rep.packs_adopted == 2 and rep.packs_marked == 0
    assert _read(repo, snap, "x") == data


def test_damaged_blob_is_never_moved() -> None:
    repo = _repo()
    a, b = os.urandom(700_000), os.urandom(700_000)
    first = _snap(repo, {"a": a, "b": b})
    _snap(repo, {"a": a})
    repo.forget([first.id])
    (data_pack,) = [n for n in _packs(repo) if n.startswith("data/")]
    loc = repo.refresh_index().lookup(next(iter(first_content(repo, "a"))))
    assert loc is not None
    raw = bytearray(repo.backend.get(data_pack))
    raw[loc.offset + 100] ^= 1
    repo.backend.delete(data_pack)
    repo.backend.put(data_pack, bytes(raw))
    rep = prune(repo, NOW)
    assert rep.packs_repacked == 0 and any("not repacked" in w for w in rep.warnings)
    assert data_pack in _packs(repo)
    assert not check(Repository.open(repo.backend, "pw"), read_data_fraction=1.0).ok


def first_content(repo: Repository, name: str) -> list[bytes]:
    snap = repo.list_snapshots()[-1]
    return repo.find_node(snap, name).content


def test_dry_run_changes_nothing() -> None:
    repo = _repo()
    a = os.urandom(700_000)
    first = _snap(repo, {"a": a, "b": os.urandom(700_000)})
    _snap(repo, {"a": a})
    repo.forget([first.id])
    names = {i.name for i in repo.backend.list("")}
    rep = prune(repo, PruneOptions(grace=0, max_unused=UnusedLimit(percent=0), dry_run=True))
    assert rep.packs_repacked == 1 and rep.packs_marked >= 2 and rep.dry_run
    assert {i.name for i in repo.backend.list("")} == names


def test_prune_lock_keeps_prunes_apart_and_stale_lock_is_taken_over(
        monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _repo()
    with PruneLock(repo), pytest.raises(PruneBusyError, match="another prune is running"):
        prune(repo, NOW)
    assert not list(repo.backend.list("locks/"))
    doc = {"token": "gone", "host": "h", "pid": 1, "started": 0, "heartbeat": time.time() - 5}
    repo.backend.put(PRUNE_LOCK, repo.master.encrypt_object(KIND_LOCK, json.dumps(doc).encode()))
    with pytest.raises(PruneBusyError):
        prune(repo, NOW)
    monkeypatch.setenv("KEEPWELL_SESSION_STALE", "2")
    prune(repo, NOW)  # a killed prune's lock, silent for longer than the stale limit
    assert not list(repo.backend.list("locks/"))


def test_pending_packs_are_not_check_warnings() -> None:
    repo = _repo()
    old = _snap(repo, {"x": os.urandom(600_000)})
    _snap(repo, {"y": os.urandom(600_000)})
    repo.forget([old.id])
    prune(repo, PruneOptions(grace=3600))
    assert load_pending(repo)
    report = check(Repository.open(repo.backend, "pw"), read_data_fraction=1.0)
    assert report.ok and report.pending_packs >= 2 and not report.warnings


def _use(name: str, used: int, unused: int, size: int | None = None) -> PackUse:
    entries = [PackEntry(DATA, bytes([i]) * 32, 0, 1000, 1000) for i in range(used + unused)]
    p = PackUse(name, DATA, size or 1000 * (used + unused), entries)
    p.used = entries[:used]
    return p


def test_choose_follows_max_unused_and_budget() -> None:
    packs = [_use("gone", 0, 5), _use("half", 5, 5), _use("little", 9, 1), _use("full", 10, 0)]
    delete, repack, keep = choose(packs, PruneOptions(max_unused=UnusedLimit(percent=0)))
    assert [p.name for p in delete] == ["gone"]
    assert [p.name for p in repack] == ["half", "little"]
    assert [p.name for p in keep] == ["full"]
    # 6000 unused beside 24000 used is 20 %: at 10 % only the worst pack must go
    _d, repack, _k = choose(packs, PruneOptions(max_unused=UnusedLimit(percent=10)))
    assert [p.name for p in repack] == ["half"]
    _d, repack, _k = choose(packs, PruneOptions(max_unused=UnusedLimit(percent=25)))
    assert repack == []
    _d, repack, _k = choose(packs, PruneOptions(max_unused=UnusedLimit(percent=0),
                                                max_repack_bytes=9500))
    assert [p.name for p in repack] == ["half"]  # "little" would pass the budget
    _d, repack, _k = choose(packs, PruneOptions(max_unused=UnusedLimit(percent=0),
                                                max_repack_bytes=4000))
    assert repack == []
    _d, repack, _k = choose(packs, PruneOptions(max_unused=UnusedLimit(percent=None),
                                                repack_small=True))
    assert sorted(p.name for p in repack) == ["full", "half", "little"]  # all are small


def test_option_parsing() -> None:
    assert parse_max_unused("5%") == UnusedLimit(percent=5)
    assert parse_max_unused("unlimited").allowed(10) == float("inf")
    assert parse_max_unused("1M") == UnusedLimit(percent=None, size=1 << 20)
    assert parse_max_unused("0") == UnusedLimit(percent=None, size=0)
    for bad in ("150%", "lots", "5 %%"):
        with pytest.raises(UsageError, match="--max-unused"):
            parse_max_unused(bad)
