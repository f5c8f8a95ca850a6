"""``--cache-dir``/``KEEPWELL_CACHE_DIR`` and ``keepwell cache [--cleanup]``.

The cache of a remote repository goes where ``--cache-dir`` says, else where
``KEEPWELL_CACHE_DIR`` says (the command line wins); ``cache`` lists the repository caches with
their size and last use, and ``--cleanup`` removes those unused for longer than
``--max-unused`` (30 days by default), leaving everything else in the directory alone. The real
``keepwell`` command runs in a subprocess; the remote repository is on a real SeaweedFS server.
"""

# ruff: noqa: F811

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from keepwell.backends.local import LocalBackend
from keepwell.backends.wrappers import CachedBackend
from tests.fault.cli import kw, ok

DAY = 86400


def _make_cache(base: Path, group: str, repository_id: str, tmp_path: Path, age_days: float,
                payload: bytes) -> Path:
    """A repository cache written by the cache wrapper itself, last used ``age_days`` ago."""
    store = tmp_path / f"store-{repository_id}"
    store.mkdir()
    cached = CachedBackend(LocalBackend(str(store)), base / group)
    cached.bind(repository_id)
    cached.put("index/" + "ab" * 32, payload)
    directory = base / group / repository_id
    when = time.time() - age_days * DAY
    os.utime(directory, (when, when))
    return directory


def _cache(*args: str, env: dict[str, str] | None = None) -> Any:
    return kw("unused", *args, env=env)


def test_cache_lists_and_cleans_up_only_unused_repository_caches(tmp_path: Path) -> None:
    base = tmp_path / "caches"
    fresh = _make_cache(base, "g1", "a" * 64, tmp_path, 1, b"f" * 3000)
    old = _make_cache(base, "g2", "b" * 64, tmp_path, 40, b"o" * 5000)
    older = _make_cache(base, "g3", "c" * 64, tmp_path, 100, b"x")
    (base / "not-a-cache").mkdir()
    (base / "not-a-cache" / "keep").write_text("mine")

    listed = json.loads(ok(_cache("--cache-dir", str(base), "cache", "--json")))
    assert listed["base"] == str(base)
    by_id = {c["repository_id"]: c for c in listed["caches"]}
    assert set(by_id) == {"a" * 64, "b" * 64, "c" * 64}
    assert by_id["b" * 64]["size"] >= 5000 and by_id["b" * 64]["location"] == str(tmp_path / f"store-{'b' * 64}")
    assert 39 < by_id["b" * 64]["unused_days"] < 41
    text = ok(_cache("--cache-dir", str(base), "cache"))
    assert "3 caches in" in text and "bbbbbbbbbbbb" in text

    out = json.loads(ok(_cache("--cache-dir", str(base), "cache", "--cleanup", "--max-unused", "60d",
                               "--json")))
    assert [c["repository_id"] for c in out["removed"]] == ["c" * 64]
    assert not older.exists() and not older.parent.exists() and old.exists()
    text = ok(_cache("--cache-dir", str(base), "cache", "--cleanup"))  # 30 days by default
    assert f"removed {old}" in text
    assert not old.exists() and fresh.exists()
    assert (base / "not-a-cache" / "keep").read_text() == "mine"

    # KEEPWELL_CACHE_DIR when no --cache-dir; the command line wins over it
    via_env = json.loads(ok(_cache("cache", "--json", env={"KEEPWELL_CACHE_DIR": str(base)})))
    assert [c["path"] for c in via_env["caches"]] == [str(fresh)]
    other = tmp_path / "other"
    both = json.loads(ok(_cache("--cache-dir", str(other), "cache", "--json",
                                env={"KEEPWELL_CACHE_DIR": str(base)})))
    assert both["base"] == str(other) and both["caches"] == []


def test_bad_cache_options_are_one_line(tmp_path: Path) -> None:
    for args, words in ((("cache", "--cleanup", "--max-unused", "soon"), "--max-unused"),
                        (("cache", "--max-unused", "3d"), "--cleanup"),
                        (("cache", "--max-unused", "30d"), "--cleanup")):  # the default too
        r = _cache("--cache-dir", str(tmp_path), *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def _ids_under(base: Path) -> set[str]:
    return {p.parent.name for p in base.glob("*/*/.repository")}


@pytest.mark.integration
def test_cache_dir_of_a_remote_repository(s3_url: str, tmp_path: Path) -> None:
    xdg, env_dir, option_dir = tmp_path / "xdg", tmp_path / "env", tmp_path / "option"
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data" * 1000)
    env = {"XDG_CACHE_HOME": str(xdg)}
    ok(kw(s3_url, "init", env=env))
    ok(kw(s3_url, "--cache-dir", str(option_dir), "backup", str(src), env=env))
    (rid,) = _ids_under(option_dir)
    assert not xdg.exists()
    ok(kw(s3_url, "snapshots", env={**env, "KEEPWELL_CACHE_DIR": str(env_dir)}))
    assert _ids_under(env_dir) == {rid}
    before = os.stat(next(option_dir.glob(f"*/{rid}"))).st_mtime
    os.utime(next(option_dir.glob(f"*/{rid}")), (before - 50 * DAY, before - 50 * DAY))
    ok(kw(s3_url, "--cache-dir", str(option_dir), "snapshots",
          env={**env, "KEEPWELL_CACHE_DIR": str(env_dir)}))
    # the command line won, and opening the repository recorded a use of its cache
    listed = json.loads(ok(kw(s3_url, "--cache-dir", str(option_dir), "cache", "--json")))
    assert [c["repository_id"] for c in listed["caches"]] == [rid]
    assert listed["caches"][0]["unused_days"] < 1 and listed["caches"][0]["location"].startswith("s3://")
