"""Choosing snapshots and files as restic users expect.

Snapshot filters (``--host``, ``--tag``, ``--path``, ``--kind``) on every command that picks
snapshots, ``latest`` as the newest snapshot that matches them, ``stats SNAPSHOT...``; include and
exclude patterns with restic's rules, and an ``--include`` that matches nothing. Commands run
in-process through typer's runner against a real local repository.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from keepwell.backends.local import LocalBackend
from keepwell.cli.main import app
from keepwell.errors import SnapshotNotFoundError, UsageError
from keepwell.repository import Repository, Snapshot
from keepwell.repository.snapshot import SnapshotFilter
from keepwell.sources.files.select import Matcher

# (host, tags, paths, kind, file name, content), oldest first
SNAPS = [
    ("alpha", ["daily"], ["/srv/a"], "files", "srv/a/f", b"alpha one"),
    ("beta", ["daily", "db"], ["/srv/b"], "files", "srv/b/f", b"beta one"),
    ("alpha", ["weekly"], ["/srv/a", "/etc"], "files", "srv/a/f", b"alpha two"),
    ("beta", [], ["/srv/b"], "files", "srv/b/f", b"beta two"),
    ("alpha", [], ["app.db"], "sqlite", "app.db", b"sqlite"),
]


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("KEEPWELL_TESTONLY_WEAK_KDF", "1")
    monkeypatch.setenv("KEEPWELL_PASSWORD", "pw")
    location = str(tmp_path / "repo")
    ids = []
    with Repository.init(LocalBackend(location), "pw") as r:
        for host, tags, paths, kind, name, data in SNAPS:
            with r.new_snapshot(kind, paths, host=host, tags=tags) as w:
                w.add_bytes(name, data)
                ids.append(w.commit().id)
            time.sleep(0.01)  # distinct times: 'latest' is well defined
    return {"location": location, "ids": ids}


def kw(repo: dict[str, Any], *args: str) -> Any:
    return CliRunner().invoke(app, ["-r", repo["location"], *args])


def listed(repo: dict[str, Any], *filters: str) -> list[int]:
    res = kw(repo, "snapshots", "--json", *filters)
    assert res.exit_code == 0, res.output
    return [repo["ids"].index(s["id"]) for s in json.loads(res.output)]


# -- the filter -----------------------------------------------------------------------------------
def _snap(host: str = "h", tags: tuple[str, ...] = (), paths: tuple[str, ...] = ("/p",),
          kind: str = "files") -> Snapshot:
    from datetime import UTC, datetime

    return Snapshot("00" * 32, datetime.now(UTC), host, "u", list(paths), list(tags), kind, "00")


def test_filter_semantics_are_restics() -> None:
    f = SnapshotFilter.parse(tags=["a,b", "c"])
    assert f.matches(_snap(tags=("a", "b"))) and f.matches(_snap(tags=("c",)))
    assert not f.matches(_snap(tags=("a",))) and not f.matches(_snap())
    untagged = SnapshotFilter.parse(tags=[""])
    assert untagged.matches(_snap()) and not untagged.matches(_snap(tags=("a",)))
    hosts = SnapshotFilter.parse(hosts=["x", "y"])
    assert hosts.matches(_snap(host="y")) and not hosts.matches(_snap(host="z"))
    paths = SnapshotFilter.parse(paths=["/srv/a/", "/etc"])
    assert paths.matches(_snap(paths=("/etc", "/srv/a", "/home")))
    assert not paths.matches(_snap(paths=("/srv/a",)))
    assert not SnapshotFilter.parse(paths=["/srv"]).matches(_snap(paths=("/srv/a",)))
    assert SnapshotFilter.parse(kinds=["sqlite"]).matches(_snap(kind="sqlite"))
    assert not SnapshotFilter() and SnapshotFilter().matches(_snap())


def test_find_snapshot_latest_matches_the_filters(repo: dict[str, Any]) -> None:
    ids = repo["ids"]
    with Repository.open(LocalBackend(repo["location"]), "pw") as r:
        assert r.find_snapshot("latest").id == ids[4]
        assert r.find_snapshot("latest", where=SnapshotFilter.parse(hosts=["beta"])).id == ids[3]
        assert r.find_snapshot("latest", where=SnapshotFilter.parse(tags=["daily"])).id == ids[1]
        assert r.find_snapshot("latest", kind="files", host="alpha").id == ids[2]
        with pytest.raises(SnapshotNotFoundError, match="--host gamma"):
            r.find_snapshot("latest", where=SnapshotFilter.parse(hosts=["gamma"]))
        with pytest.raises(UsageError, match="does not match --host beta"):
            r.find_snapshot(ids[0][:8], where=SnapshotFilter.parse(hosts=["beta"]))
        for bad in ("latestXYZ", "latest~1", "LATEST", "abc"):
            with pytest.raises(UsageError, match="is not a snapshot id"):
                r.find_snapshot(bad)


# -- the commands ---------------------------------------------------------------------------------
def test_snapshots_filters(repo: dict[str, Any]) -> None:
    assert listed(repo) == [0, 1, 2, 3, 4]
    assert listed(repo, "--host", "beta") == [1, 3]
    assert listed(repo, "--host", "beta", "--host", "alpha", "--kind", "files") == [0, 1, 2, 3]
    assert listed(repo, "--tag", "daily") == [0, 1]
    assert listed(repo, "--tag", "daily,db") == [1]
    assert listed(repo, "--tag", "db", "--tag", "weekly") == [1, 2]
    assert listed(repo, "--path", "/srv/a") == [0, 2]
    assert listed(repo, "--path", "/srv/a", "--path", "/etc") == [2]
    assert listed(repo, "--kind", "sqlite") == [4]


def test_latest_in_ls_dump_restore_diff_follows_the_filters(repo: dict[str, Any],
                                                            tmp_path: Path) -> None:
    res = kw(repo, "dump", "latest", "/srv/b/f", "--host", "beta")
    assert res.exit_code == 0 and res.stdout_bytes == b"beta two"
    res = kw(repo, "dump", "latest", "/srv/a/f", "--tag", "daily", "--host", "alpha")
    assert res.exit_code == 0 and res.stdout_bytes == b"alpha one"
    res = kw(repo, "ls", "latest", "--path", "/srv/b")
    assert res.exit_code == 0 and "/srv/b/f" in res.output
    res = kw(repo, "restore", "latest", "--host", "alpha", "--kind", "files",
             "--target", str(tmp_path / "t"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "t" / "srv" / "a" / "f").read_bytes() == b"alpha two"
    res = kw(repo, "diff", repo["ids"][0][:8], "latest", "--path", "/srv/a", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["modified"] == ["srv/a/f"]
    res = kw(repo, "ls", "latest", "--host", "gamma")
    assert isinstance(res.exception, SnapshotNotFoundError)


def test_stats_of_chosen_snapshots(repo: dict[str, Any]) -> None:
    def stats(*args: str) -> dict[str, Any]:
        res = kw(repo, "stats", "--json", "--mode", "raw-data", *args)
        assert res.exit_code == 0, res.output
        return dict(json.loads(res.output))

    everything = stats()
    assert everything["snapshots"] == 5
    one = stats(repo["ids"][1][:8])
    assert one["snapshots"] == 1 and one["total_file_size"] == len(b"beta one")
    assert one["blobs"]["data"] == 1 and one["unique_raw_size"] < everything["unique_raw_size"]
    two = stats(repo["ids"][1][:8], "latest", "--host", "beta")
    assert two["snapshots"] == 2 and two["total_file_size"] == len(b"beta one") + len(b"beta two")
    assert stats("--host", "alpha")["snapshots"] == 3


def test_forget_only_among_the_filtered(repo: dict[str, Any]) -> None:
    def forget(*args: str) -> list[int]:
        res = kw(repo, "forget", "--json", *args)
        assert res.exit_code == 0, res.output
        return [repo["ids"].index(i) for i in json.loads(res.output)["remove"]]

    # beta's two snapshots are one group (same host and paths); the filter leaves one of them
    assert forget("--keep-last", "1", "--tag", "db") == []
    assert forget("--keep-last", "1", "--host", "beta") == [1]
    assert listed(repo) == [0, 2, 3, 4]
    res = kw(repo, "forget", repo["ids"][0][:8], "--keep-last", "1")
    assert isinstance(res.exception, UsageError) and listed(repo) == [0, 2, 3, 4]
    res = kw(repo, "forget", "--keep-last", "-1")
    assert res.exit_code == 2 and listed(repo) == [0, 2, 3, 4]


def test_copy_by_path(repo: dict[str, Any], tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    Repository.init(LocalBackend(str(dst)), "pw").close()
    res = CliRunner().invoke(app, ["-r", str(dst), "copy", "--from-repo", repo["location"],
                                   "--path", "/srv/b", "--json"],
                             env={"KEEPWELL_FROM_PASSWORD": "pw"})
    assert res.exit_code == 0, res.output
    assert [c["source"] for c in json.loads(res.output)["copied"]] == [repo["ids"][1], repo["ids"][3]]


# -- patterns -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("pattern", "path", "expected"), [
    ("foo", "/dir1/foo/dir2/file", True),
    ("foo", "/dir/foo", True),
    ("foo", "/dir/foobar", False),
    ("foo", "/barfoo", False),
    ("/bin", "/bin/bash", True),
    ("/bin", "/usr/bin/restic", False),
    ("b*ash", "/bin/bash", True),
    ("b*ash", "/bin/ash", False),
    ("foo/**/bar", "/dir1/foo/dir2/bar/file", True),
    ("foo/**/bar", "/foo/bar/file", True),
    ("foo/**/bar", "/tmp/foo/bar", True),
    ("stdlib/email", "/usr/lib/python3/stdlib/email/parser.py", True),
    ("stdlib/email", "/usr/lib/python3/stdlib/emails/x", False),
    ("lib/*/email", "/usr/lib/python3/email", True),
    ("lib/*/email", "/usr/lib/a/b/email", False),
    ("*.log", "/var/log/app.log", True),
    ("*.log", "/var/log/app.log.1", False),
    ("/srv/*/cache", "/srv/x/cache/y", True),
    ("/srv/*/cache", "/srv/x/y/cache", False),
    ("file/", "/a/file", True),
    ("[ab].txt", "/x/b.txt", True),
    ("[!ab].txt", "/x/c.txt", True),
    ("[!ab].txt", "/x/a.txt", False),
    ("a\\*b", "/x/a*b", True),
    ("a\\*b", "/x/axb", False),
])
def test_patterns_follow_restic(pattern: str, path: str, expected: bool) -> None:
    assert Matcher([pattern]).matches(path, path.rsplit("/", 1)[-1]) is expected


def test_matcher_records_what_matched() -> None:
    m = Matcher(["*.txt", "nothing-here", "/etc"])
    assert m.matches("/etc/hosts") and m.matches("/home/a.txt") and not m.matches("/home/b")
    assert m.unmatched() == ["nothing-here"]


def test_restore_include_of_a_relative_path_and_one_that_matches_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPWELL_TESTONLY_WEAK_KDF", "1")
    monkeypatch.setenv("KEEPWELL_PASSWORD", "pw")
    location = str(tmp_path / "repo")
    with Repository.init(LocalBackend(location), "pw") as r, \
            r.new_snapshot("files", ["/usr/lib/py"]) as w:
        for name in ("stdlib/email/parser.py", "stdlib/email/utils.py", "stdlib/json/x.py"):
            w.add_bytes(f"usr/lib/py/{name}", name.encode())
        w.commit()
    target = tmp_path / "t"
    res = CliRunner().invoke(app, ["-r", location, "restore", "latest", "--target", str(target),
                                   "--include", "stdlib/email"])
    assert res.exit_code == 0, res.output
    got = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert got == ["usr/lib/py/stdlib/email/parser.py", "usr/lib/py/stdlib/email/utils.py"]

    res = CliRunner().invoke(app, ["-r", location, "restore", "latest", "--target",
                                   str(tmp_path / "t2"), "--include", "stdlib/json",
                                   "--include", "stdlib/xml"])
    assert res.exit_code == 3, res.output
    assert "--include stdlib/xml matched nothing" in res.output
    assert (tmp_path / "t2" / "usr/lib/py/stdlib/json/x.py").exists()

    res = CliRunner().invoke(app, ["-r", location, "restore", "latest", "--target",
                                   str(tmp_path / "t3"), "--include", "nowhere"])
    assert res.exit_code == 1 and "--include nowhere matched nothing" in res.output
