"""The local cache of a remote repository, against real SeaweedFS servers: it belongs to one
repository (its id and its server), and a damaged cache file is read again, never trusted.

Every command runs as a real ``keepwell`` process with its cache under the test's directory.
"""

# ruff: noqa: F811

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from keepwell.backends.registry import open_backend
from tests.fault.cli import kw, ok
from tests.integration.conftest_remote import BUCKET
from tests.servers.seaweed import SeaweedServer

pytestmark = pytest.mark.integration


def files(root: Path) -> Path:
    (root / "d").mkdir(parents=True)
    (root / "d" / "a").write_bytes(b"alpha\n" * 10_000)
    (root / "b").write_bytes(b"beta\n")
    return root


def env_of(cache: Path, endpoint: str | None = None) -> dict[str, str]:
    out = {"XDG_CACHE_HOME": str(cache)}
    if endpoint:
        out["AWS_ENDPOINT_URL"] = endpoint
    return out


def wipe(url: str, endpoint: str | None = None) -> None:
    backend = open_backend(url, **({"endpoint": endpoint} if endpoint else {}))
    for info in list(backend.list("")):
        backend.delete(info.name)


def test_a_repository_made_anew_at_the_same_url_is_not_served_the_old_cache(
        s3_url: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    src = files(tmp_path / "src")
    ok(kw(s3_url, "init", env=env_of(cache)))
    ok(kw(s3_url, "backup", str(src), env=env_of(cache)))
    ok(kw(s3_url, "snapshots", env=env_of(cache)))  # everything it reads is cached now
    wipe(s3_url)
    ok(kw(s3_url, "init", env=env_of(cache)))
    assert "0 snapshots" in ok(kw(s3_url, "snapshots", env=env_of(cache)))
    ok(kw(s3_url, "backup", str(src), env=env_of(cache)))
    assert "no errors were found" in ok(kw(s3_url, "check", "--read-data", env=env_of(cache)))


@pytest.fixture(scope="module")
def second_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed-2")).start()
    try:
        server.create_bucket(BUCKET)
        server.warm_up(BUCKET)
        yield server
    finally:
        server.stop()


def test_the_same_bucket_and_prefix_on_two_servers_have_two_caches(
        s3_url: str, seaweed: SeaweedServer, second_server: SeaweedServer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    src = files(tmp_path / "src")
    here, there = env_of(cache, seaweed.endpoint), env_of(cache, second_server.endpoint)
    ok(kw(s3_url, "init", env=here))
    ok(kw(s3_url, "backup", str(src), env=here))
    ok(kw(s3_url, "init", env=there))
    for env in (here, there, here):
        listed = ok(kw(s3_url, "snapshots", env=env))
        assert ("1 snapshots" if env is here else "0 snapshots") in listed
    ok(kw(s3_url, "backup", str(src), env=there))
    assert "no errors were found" in ok(kw(s3_url, "check", "--read-data", env=there))
    wipe(s3_url, second_server.endpoint)


def test_a_damaged_cache_file_is_read_again(s3_url: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    src = files(tmp_path / "src")
    ok(kw(s3_url, "init", env=env_of(cache)))
    ok(kw(s3_url, "backup", str(src), env=env_of(cache)))
    cached = sorted(p for p in (cache / "keepwell").rglob("*")
                    if p.is_file() and p.parent.name in ("index", "snapshots"))
    assert cached, "the backup filled the cache"
    for p in cached:
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
    out = tmp_path / "out"
    ok(kw(s3_url, "restore", "latest", "--target", str(out), env=env_of(cache)))
    assert (out / str(src).lstrip("/") / "d" / "a").read_bytes() == (src / "d" / "a").read_bytes()
    assert "no errors were found" in ok(kw(s3_url, "check", env=env_of(cache)))
