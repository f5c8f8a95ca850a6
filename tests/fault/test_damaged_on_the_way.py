"""Bytes damaged between the storage and keepwell are not damage in storage.

An S3 server reached through a proxy that answers a ``GET`` with ``200`` and bytes that are not
the object's (a truncated body with a matching length, or a changed byte), or says that an
object it lists does not exist, once: ``check
--read-data`` and ``repair packs`` read the pack again, find it whole, say that something on
the way damaged it, and record nothing. Recording it would take intact data out of use for
good: check would report the snapshot damaged on every run, and ``repair packs`` would salvage
the other blobs and leave the pack to the next prune, losing the blob for real.
"""

from __future__ import annotations

import random
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fault.cli import kw, ok
from tests.integration.conftest_remote import BUCKET
from tests.servers.httpproxy import Tamper, TamperingProxy
from tests.servers.seaweed import SeaweedServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def proxy(seaweed: SeaweedServer) -> Iterator[TamperingProxy]:
    with TamperingProxy(seaweed.s3_port) as p:
        yield p


Damage = Callable[[bytes], bytes | tuple[int, bytes]]


def once(damage: Damage, prefix: str = "/data/") -> Tamper:
    """A tamper function that damages the first whole GET of an object under ``prefix``."""
    done: list[str] = []

    def tamper(method: str, path: str, body: bytes) -> bytes | tuple[int, bytes] | None:
        if method != "GET" or prefix not in path or "?" in path or done:
            return None
        done.append(path)
        return damage(body)

    return tamper


def truncate(body: bytes) -> bytes:
    return body[: len(body) // 2]


def flip(body: bytes) -> bytes:
    out = bytearray(body)
    out[len(out) // 2] ^= 0x10
    return bytes(out)


def missing(_body: bytes) -> tuple[int, bytes]:
    """The object the storage lists is said not to exist."""
    return 404, b"<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code></Error>"


def restored_through(proxy: TamperingProxy, tamper: Tamper, location: str, via: dict[str, str],
                     src: Path, out: Path) -> None:
    """Restore ``location`` into ``out`` through ``proxy`` damaging one answer as ``tamper``
    says: it must succeed and restore ``src`` exactly."""
    proxy.tamper = tamper
    before = proxy.tampered
    try:
        r = kw(location, "restore", "latest", "--target", str(out), env=via)
    finally:
        proxy.clear()
    assert proxy.tampered == before + 1
    assert r.returncode == 0, r.stdout + r.stderr
    got = out / str(src).lstrip("/")
    assert subprocess.run(["diff", "-r", str(src), str(got)]).returncode == 0


@pytest.mark.parametrize("damage", [truncate, flip, missing], ids=["truncated", "flipped", "missing"])
@pytest.mark.parametrize("command", [("check", "--read-data"), ("repair", "packs")],
                         ids=["check", "repair-packs"])
def test_a_pack_damaged_on_the_way_is_read_again(seaweed: SeaweedServer, proxy: TamperingProxy,
                                                 tmp_path: Path, damage: Damage,
                                                 command: tuple[str, ...]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    (src / "big").write_bytes(rng.randbytes(2_000_000))
    (src / "small").write_bytes(rng.randbytes(20_000))
    location = f"s3://{BUCKET}/otw-{uuid.uuid4().hex[:8]}"
    direct = {**seaweed.env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    via = {**direct, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    ok(kw(location, "init", env=direct))
    ok(kw(location, "backup", str(src), env=direct))

    proxy.tamper = once(damage)
    try:
        r = kw(location, *command, env=via)
    finally:
        proxy.clear()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "second" in r.stdout + r.stderr and "nothing was recorded" in r.stdout + r.stderr
    assert "damaged/" not in r.stdout + r.stderr

    # nothing was taken out of use: the repository checks clean, twice, and restores exact
    for _ in range(2):
        assert "no errors were found" in ok(kw(location, "check", "--read-data", env=direct))
    ok(kw(location, "prune", "--grace", "0", env=direct))
    ok(kw(location, "restore", "latest", "--target", str(tmp_path / "out"), env=direct))
    got = tmp_path / "out" / str(src).lstrip("/")
    assert subprocess.run(["diff", "-r", str(src), str(got)]).returncode == 0


@pytest.mark.parametrize("prefix", ["/keys/", "/index/", "/snapshots/", "/tree/"])
def test_a_small_object_damaged_on_the_way_is_read_again(seaweed: SeaweedServer,
                                                         proxy: TamperingProxy, tmp_path: Path,
                                                         prefix: str) -> None:
    """A key file, an index object, a snapshot or a tree pack read damaged once is read again:
    the restore works, and the damaged copy is not kept in the cache."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(random.Random(6).randbytes(50_000))
    location = f"s3://{BUCKET}/otw-{uuid.uuid4().hex[:8]}"
    direct = {**seaweed.env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    ok(kw(location, "init", env=direct))
    ok(kw(location, "backup", str(src), env=direct))

    # a new cache, so that every object is read from the server
    via = {**direct, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}",
           "XDG_CACHE_HOME": str(tmp_path / "cache2")}
    restored_through(proxy, once(flip, prefix), location, via, src, tmp_path / "out")
    r = kw(location, "check", env=via)
    assert r.returncode == 0 and "damaged" not in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("damage", [truncate, flip, missing], ids=["truncated", "flipped", "missing"])
@pytest.mark.parametrize("processes", ["0", "2"], ids=["in-process", "worker-processes"])
def test_a_restore_reads_a_range_damaged_on_the_way_again(
        seaweed: SeaweedServer, proxy: TamperingProxy, tmp_path: Path, damage: Damage,
        processes: str) -> None:
    """A data pack's range read damaged (or said missing) once is read again: the restore is
    whole and exact, on both restore paths (files written here, files of one blob written by
    worker processes)."""
    src = tmp_path / "src"
    rng = random.Random(7)
    for i in range(300):  # enough files of one blob for worker processes
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"f{i}").write_bytes(rng.randbytes(1500))
    (src / "big").write_bytes(rng.randbytes(3_000_000))
    location = f"s3://{BUCKET}/otw-{uuid.uuid4().hex[:8]}"
    direct = {**seaweed.env(), "XDG_CACHE_HOME": str(tmp_path / "cache"),
              "KEEPWELL_FILE_PROCESSES": processes}
    ok(kw(location, "init", env=direct))
    ok(kw(location, "backup", str(src), env=direct))
    via = {**direct, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    restored_through(proxy, once(damage), location, via, src, tmp_path / "out")


@pytest.mark.parametrize("damage", [truncate, flip], ids=["truncated", "flipped"])
def test_a_copy_reads_a_range_damaged_on_the_way_again(
        seaweed: SeaweedServer, proxy: TamperingProxy, tmp_path: Path, damage: Damage) -> None:
    """``copy`` from a repository whose answers are damaged once on the way reads the range
    again and copies every blob whole."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(8)
    (src / "big").write_bytes(rng.randbytes(2_500_000))
    for i in range(20):
        (src / f"f{i}").write_bytes(rng.randbytes(5000))
    location = f"s3://{BUCKET}/otw-{uuid.uuid4().hex[:8]}"
    direct = {**seaweed.env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    ok(kw(location, "init", env=direct))
    ok(kw(location, "backup", str(src), env=direct))
    dest = tmp_path / "dest"
    ok(kw(dest, "init", "--copy-chunker-params-from", location, env=direct))
    via = {**direct, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    proxy.tamper = once(damage)
    before = proxy.tampered
    try:
        r = kw(dest, "copy", "--from-repo", location, env=via)
    finally:
        proxy.clear()
    assert proxy.tampered == before + 1
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no errors were found" in ok(kw(dest, "check", "--read-data"))
    ok(kw(dest, "restore", "latest", "--target", str(tmp_path / "out")))
    got = tmp_path / "out" / str(src).lstrip("/")
    assert subprocess.run(["diff", "-r", str(src), str(got)]).returncode == 0
