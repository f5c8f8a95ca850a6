"""Backup and restore through the repository engine on real S3 (SeaweedFS) and SFTP (OpenSSH)
servers, and a backup interrupted mid-upload (network cut, kill -9) that the next run completes.

After every scenario the whole repository is checked object by object: each name under data/,
tree/, index/ and snapshots/ is the BLAKE3 hash of the stored bytes, so no partial or corrupt
object is visible, and the restore is byte-exact.
"""

# ruff: noqa: F811

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from keepwell.backends.base import Backend
from keepwell.backends.objectstore import from_url as s3_from_url
from keepwell.backends.registry import open_backend
from keepwell.backends.resilience import Backoff
from keepwell.backends.wrappers import RetryingBackend
from keepwell.errors import KeepwellError
from keepwell.repository import Repository, open_repository
from tests.integration.conftest_remote import BUCKET
from tests.servers.proxy import FaultProxy
from tests.servers.seaweed import SeaweedServer

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"
HASHED = ("data/", "tree/", "index/", "snapshots/")


@pytest.fixture(autouse=True)
def weak_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPWELL_TESTONLY_WEAK_KDF", "1")


@pytest.fixture(scope="module")
def payload() -> dict[str, bytes]:
    rng = __import__("random").Random(42)
    files = {f"docs/note-{i:03d}.txt": f"note {i}\n".encode() * (i + 1) for i in range(60)}
    files["db/dump.sql"] = b"INSERT INTO t VALUES (1, 'x');\n" * 200_000  # ~6 MB, compressible
    files["media/big.bin"] = rng.randbytes(36 * 1024 * 1024)  # incompressible: several data packs
    files["empty"] = b""
    return files


def backup(repo: Repository, files: dict[str, bytes]) -> str:
    with repo.new_snapshot("files", ["/data"], host="e2e") as w:
        for path, data in files.items():
            if len(data) > 1024 * 1024:
                w.add_stream(path, io.BytesIO(data))
            else:
                w.add_bytes(path, data)
        snap = w.commit()
    return str(snap.id)


def assert_restores(location: str, files: dict[str, bytes], cache: Path | None = None) -> None:
    opts = {"cache_dir": str(cache)} if cache else {}
    with open_repository(location, PASSWORD, **opts) as repo:
        snap = repo.find_snapshot("latest")
        seen = {p for p, node in repo.walk(snap) if node.type == "file"}
        assert seen == set(files)
        for path, data in files.items():
            assert b"".join(repo.iter_file(snap, path)) == data, path


def assert_sound(backend: Backend) -> dict[str, int]:
    """Every content-named object is whole: its name is the hash of its bytes."""
    counts: dict[str, int] = {}
    for info in backend.list(""):
        top = info.name.split("/", 1)[0] + "/"
        counts[top] = counts.get(top, 0) + 1
        if info.name.startswith(HASHED):
            data = backend.get(info.name)
            assert len(data) == info.size
            assert blake3.blake3(data).hexdigest() == info.name.rsplit("/", 1)[1], info.name
    return counts


# --- round trips ---------------------------------------------------------------------------------


@pytest.fixture(params=["s3", "sftp"])
def remote_url(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.getfixturevalue(f"{request.param}_url")


def test_backup_and_restore(remote_url: str, payload: dict[str, bytes], tmp_path: Path) -> None:
    repo = Repository.init(open_backend(remote_url), PASSWORD)
    start = time.monotonic()
    with repo:
        backup(repo, payload)
    took = time.monotonic() - start
    print(
        f"{remote_url.split(':')[0]}: backup of {sum(map(len, payload.values())) >> 20} MiB "
        f"in {took:.2f}s"
    )
    assert_restores(remote_url, payload, cache=tmp_path / "cache")
    # A second run stores nothing new but the snapshot and its small objects.
    with open_repository(remote_url, PASSWORD) as repo:
        before = {i.name for i in repo.backend.list("data/")}
        backup(repo, payload)
        assert {i.name for i in repo.backend.list("data/")} == before
        assert len(repo.list_snapshots()) == 2
    counts = assert_sound(open_backend(remote_url))
    # a pack closes at 16 MiB or more and a chunk is at most 8 MiB: 36 MiB needs 2 packs at least
    assert counts["data/"] >= 2


# --- a network cut in the middle of the upload ---------------------------------------------------


def test_s3_backup_cut_mid_upload_then_completed(
    seaweed: SeaweedServer,
    payload: dict[str, bytes],
    s3_env: dict[str, str],
) -> None:
    prefix = f"cut-{uuid.uuid4().hex[:8]}"
    url = f"s3://{BUCKET}/{prefix}"
    Repository.init(open_backend(url), PASSWORD).close()
    with FaultProxy(seaweed.s3_port) as proxy:

        def through_proxy() -> Backend:
            inner = s3_from_url(
                url, endpoint=f"http://127.0.0.1:{proxy.port}", max_retries=0, read_timeout=2
            )
            return RetryingBackend(inner, attempts=3, backoff=Backoff(base=0.05, cap=0.2))

        # Run 1: the network goes away for good once ~20 MiB went up.
        repo = Repository.open(through_proxy(), PASSWORD)
        proxy.outage_after(20 * 1024 * 1024)
        with pytest.raises(KeepwellError):
            backup(repo, payload)
        repo.close()
        proxy.clear()
        first = proxy.bytes_up
        assert not list(open_backend(url).list("snapshots/"))
        assert_sound(open_backend(url))

        # Run 2: the network is back; the backup completes.
        with Repository.open(through_proxy(), PASSWORD) as repo:
            backup(repo, payload)
        second = proxy.bytes_up - first
    print(f"cut run sent {first >> 20} MiB, the completing run {second >> 20} MiB")
    assert_restores(url, payload)
    assert_sound(open_backend(url))


# --- kill -9 in the middle of the upload ---------------------------------------------------------

_CHILD = """
import io, os, sys
from keepwell.repository import open_repository
url, path = sys.argv[1], sys.argv[2]
with open(path, "rb") as f:
    data = f.read()
repo = open_repository(url, os.environ["PW"], limit_upload=int(sys.argv[3]))
with repo.new_snapshot("files", ["/data"], host="e2e") as w:
    w.add_stream("media/big.bin", io.BytesIO(data))
    w.commit()
print("done", flush=True)
"""


def test_sftp_backup_killed_mid_upload_then_completed(
    sftp_url: str,
    payload: dict[str, bytes],
    tmp_path: Path,
) -> None:
    Repository.init(open_backend(sftp_url), PASSWORD).close()
    big = payload["media/big.bin"]
    src = tmp_path / "big.bin"
    src.write_bytes(big)
    root = Path("/" + sftp_url.split("/", 3)[3])
    env = {
        **os.environ,
        "PW": PASSWORD,
        "KEEPWELL_TESTONLY_WEAK_KDF": "1",
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
    }
    # 12 MiB/s: the first 16 MiB pack lands after ~1.5 s, the whole upload would take ~3 s.
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, sftp_url, str(src), str(12 * 1024)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30

        def packs_landed() -> bool:
            return any(p.is_file() for p in (root / "data").glob("*/[0-9a-f]*"))

        while not packs_landed():
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "no pack was uploaded"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    backend = open_backend(sftp_url)
    assert not list(backend.list("snapshots/"))
    assert_sound(backend)

    packs_before = len(list(backend.list("data/")))
    with open_repository(sftp_url, PASSWORD) as repo:
        backup(repo, {"media/big.bin": big})
    print(
        f"packs stored by the killed run: {packs_before}, after the completing run: "
        f"{len(list(backend.list('data/')))}"
    )
    assert_restores(sftp_url, {"media/big.bin": big})
    assert_sound(open_backend(sftp_url))
    leftovers = [p for p in root.rglob(".tmp-*")]
    print(f"temporary files left by the killed run: {len(leftovers)}")
