"""A watcher whose repository goes away: a full disk under the repository, a repository that
cannot be opened. The watcher keeps running, keeps every change in its journal, reports a lag
that grows, and commits everything once the repository is back; the daemon raises the lag and
stream-down alerts of a continuous files source and resolves them. Every wait is on an event
(a JSON line, an alert delivered, a snapshot listing), never on a fixed sleep."""

from __future__ import annotations

import errno
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fault.cli import kw, ok
from tests.fault.watch_support import Watch, assert_same_bytes, wait_until_held
from tests.integration.control_support import PASSWORD as CONTROL_PASSWORD
from tests.integration.control_support import WebhookSink, Workspace, init_repository
from tests.waiting import wait_for


def _fill(disk: Path) -> Path:
    """Take every free block of ``disk``: the file that holds them."""
    ballast = disk / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = 1 << 20
        block = os.urandom(size)
        while size >= 512:
            try:
                os.write(fd, block[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                size //= 2
    finally:
        os.close(fd)
    return ballast


def _started(repo: Path, cache: Path, root: Path, files: dict[str, str]) -> Watch:
    """A new repository and a watcher on ``root`` (holding ``files``) past its start scan."""
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    ok(kw(repo, "init"))
    w = Watch(repo, cache, root)
    try:
        w.started()
        wait_until_held(repo, root, "the start scan")
    except BaseException:
        w.stop(signal.SIGKILL)
        raise
    return w


def _failures(w: Watch) -> list[dict[str, Any]]:
    return [c for c in w.lines() if c.get("event") == "commit_failed"]


def test_the_watcher_rides_out_a_full_repository_disk(tmp_path: Path, small_disk: Path) -> None:
    repo, cache, root = small_disk / "repo", tmp_path / "cache", tmp_path / "tree"
    w = _started(repo, cache, root, {"kept.txt": "before the disk filled\n"})
    try:
        ballast = _fill(small_disk)
        (root / "during").mkdir()
        (root / "during" / "big.bin").write_bytes(os.urandom(600_000))
        (root / "kept.txt").write_text("changed while the disk was full\n")
        (root / "gone.txt").write_text("made and deleted while the disk was full\n")
        wait_for(lambda: len(_failures(w)) >= 3 or w.proc.poll() is not None,
                 "three failed commits", timeout=120)
        assert w.proc.poll() is None, w.proc.communicate()
        (root / "gone.txt").unlink()
        fails = _failures(w)
        assert "no space left on device" in fails[0]["error"].lower(), fails[0]
        # the watcher retries by itself: the hint says what to do, not to run it again
        assert "free some space" in fails[0]["error"], fails[0]
        assert "run the command again" not in fails[0]["error"], fails[0]
        lags = [f["lag_seconds"] for f in fails]
        assert lags == sorted(lags) and lags[-1] > lags[0], lags  # the lag a supervisor sees
        assert all(f["pending"] >= 1 for f in fails), fails
        assert [f["failures"] for f in fails[:3]] == [1, 2, 3]
        ballast.unlink()
        wait_until_held(repo, root, "the changes made while the disk was full")
        assert w.proc.poll() is None
        last = [c for c in w.commits() if c.get("snapshot")][-1]
        assert last["lag_seconds"] >= lags[-1]  # waited through the outage, and says so
        wait_for(lambda: w.lines()[-1].get("event") == "caught_up", "the caught-up line")
        rc, err = w.stop()
        assert rc == 0, err
        assert "committing again after" in err, err
    finally:
        if w.proc.poll() is None:
            w.stop(signal.SIGKILL)
    r = kw(repo, "check", "--read-data")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_bytes(repo, root, tmp_path / "restored")


@pytest.fixture
def hook() -> Iterator[WebhookSink]:
    sink = WebhookSink()
    yield sink
    sink.close()


def _configure(ws: Workspace, repo: Path, data: Path, hook: WebhookSink, lag_alert: str) -> None:
    """One continuous files source ``live`` of ``data`` into ``repo``, alerts to ``hook``."""
    ws.write_config({
        "repositories": {"r": {"location": str(repo), "password": "env:KW_TEST_PASSWORD"}},
        "sources": {"live": {"kind": "files", "repository": "r", "paths": [str(data)],
                             "mode": "continuous", "max_delay": "200ms", "quiet_time": "100ms",
                             "lag_alert": lag_alert}},
        "notifications": [{"webhook": hook.url}],
    })


def test_a_continuous_source_raises_its_lag_alert_while_the_repository_is_full(
        tmp_path: Path, small_disk: Path, hook: WebhookSink,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPWELL_CACHE_DIR", str(tmp_path / "cache"))
    ws = Workspace(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    repo = small_disk / "repo"
    init_repository(repo)
    try:
        _configure(ws, repo, data, hook, lag_alert="2s")
        d = ws.daemon()
        d.wait_for(lambda: d.events("stream_started"), what="the watcher")
        ballast = _fill(small_disk)
        (data / "new.bin").write_bytes(os.urandom(200_000))
        d.wait_for(lambda: hook.of("alert", "log_lag"), timeout=120, what="the lag alert")
        (alert,) = hook.of("alert", "log_lag")
        assert alert["source"] == "live" and "growing" in alert["message"], alert
        ballast.unlink()
        d.wait_for(lambda: hook.of("resolved", "log_lag"), timeout=120,
                   what="the lag alert resolved by a commit")
        assert d.stop() == 0
        assert not d.events("stream_exited")  # one watcher all along
        assert not hook.of("alert", "stream_down")
    finally:
        ws.close()
    listing = ok(kw(repo, "ls", "latest", env={"KEEPWELL_PASSWORD": CONTROL_PASSWORD}))
    assert "new.bin" in listing


def test_a_watcher_that_cannot_start_raises_stream_down(tmp_path: Path, hook: WebhookSink,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """No repository at the source's location: the watcher exits at every start, reports no
    lag at all, and the stream-down alert says so; once the repository exists, the watcher
    commits and the alert is resolved."""
    monkeypatch.setenv("KEEPWELL_CACHE_DIR", str(tmp_path / "cache"))
    ws = Workspace(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("a\n")
    repo = tmp_path / "later"
    try:
        _configure(ws, repo, data, hook, lag_alert="1s")
        d = ws.daemon()
        d.wait_for(lambda: hook.of("alert", "stream_down"), timeout=120,
                   what="the stream-down alert")
        (alert,) = hook.of("alert", "stream_down")
        assert alert["source"] == "live" and "kept exiting" in alert["message"], alert
        assert all(e["code"] == 10 for e in d.events("stream_exited"))  # no repository
        init_repository(repo)
        d.wait_for(lambda: hook.of("resolved", "stream_down"), timeout=600,
                   what="the alert resolved once the watcher runs")
        assert d.stop() == 0
    finally:
        ws.close()
    listing = ok(kw(repo, "ls", "latest", env={"KEEPWELL_PASSWORD": CONTROL_PASSWORD}))
    assert "a.txt" in listing
    assert json.loads(ok(kw(repo, "snapshots", "--json",
                            env={"KEEPWELL_PASSWORD": CONTROL_PASSWORD})))


def test_a_full_disk_under_the_journal_stops_no_commit(tmp_path: Path, small_disk: Path) -> None:
    """The journal (in keepwell's cache directory) cannot be written: one warning that names it,
    and every change is still committed; once there is room again, the journal is written."""
    repo, cache, root = tmp_path / "repo", small_disk / "cache", tmp_path / "tree"
    w = _started(repo, cache, root, {})
    try:
        ballast = _fill(small_disk)
        for i in range(300):  # more than the journal file's buffer holds
            (root / f"during-{i:03}-{'x' * 40}.txt").write_text(f"{i}\n")
        wait_until_held(repo, root, "the changes made while the journal's disk was full")
        assert w.proc.poll() is None
        ballast.unlink()
        (root / "after.txt").write_text("after\n")
        wait_until_held(repo, root, "a change made once there was room again")
        rc, err = w.stop()
        assert rc == 0, err
    finally:
        if w.proc.poll() is None:
            w.stop(signal.SIGKILL)
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert any("the watch journal" in line and "no space left on device" in line.lower()
               for line in warnings), err
    assert any("is written again" in line for line in warnings), err
    assert "Traceback" not in err and "internal error" not in err, err
    assert not _failures(w)
    assert_same_bytes(repo, root, tmp_path / "restored")
