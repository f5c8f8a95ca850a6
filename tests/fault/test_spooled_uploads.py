"""Packs for S3 and SFTP are built in spool files (keepwell.backends.spool) and uploaded from
them, through a TCP proxy that cuts or refuses connections.

What must hold: an upload cut once is tried again from the start of the spool file and stores
exactly its bytes; the spool files of a run are freed once it ends, whether its uploads
succeeded or finally failed, and none is left in the directory they were made in.
"""

# ruff: noqa: F811

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keepwell.backends.base import Backend
from keepwell.backends.objectstore import from_url as s3_from_url
from keepwell.backends.resilience import Backoff
from keepwell.backends.sftp import from_url as sftp_from_url
from keepwell.backends.spool import Spool
from keepwell.backends.wrappers import CachedBackend, RetryingBackend
from keepwell.errors import BackendError
from keepwell.repository import Repository
from keepwell.repository.check import check
from tests.backend_contract import open_spool_files
from tests.integration.conftest_remote import BUCKET
from tests.servers.proxy import FaultProxy
from tests.servers.seaweed import SeaweedServer
from tests.servers.sshd import SshServer

pytestmark = [
    pytest.mark.integration,
    # paramiko's read-ahead thread dies with a traceback when a connection is cut under it
    pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
]


@dataclass
class Remote:
    """One server seen through the faulty proxy and directly (to check the truth)."""

    proxy: FaultProxy
    via_proxy: Callable[[str], Backend]
    direct: Callable[[str], Backend]


@pytest.fixture(params=["s3", "sftp"])
def remote(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    if request.param == "s3":
        seaweed: SeaweedServer = request.getfixturevalue("seaweed")
        env = seaweed.env()
        creds = {"access_key_id": env["AWS_ACCESS_KEY_ID"],
                 "secret_access_key": env["AWS_SECRET_ACCESS_KEY"], "region": env["AWS_REGION"]}
        with FaultProxy(seaweed.s3_port) as proxy:
            yield Remote(
                proxy,
                # no retries inside obstore: RetryingBackend does them, from the spool
                lambda prefix: s3_from_url(f"s3://{BUCKET}/{prefix}",
                                           endpoint=f"http://127.0.0.1:{proxy.port}",
                                           max_retries=0, stall_timeout=5, **creds),
                lambda prefix: s3_from_url(f"s3://{BUCKET}/{prefix}", endpoint=seaweed.endpoint,
                                           **creds))
    else:
        sshd: SshServer = request.getfixturevalue("sshd")
        base = tmp_path_factory.mktemp("sftp-spools")
        opts = {"known_hosts": str(sshd.known_hosts), "identity": str(sshd.identity)}
        with FaultProxy(sshd.port) as proxy:
            sshd.trust_port(proxy.port)
            yield Remote(
                proxy,
                lambda prefix: sftp_from_url(sshd.url(str(base / prefix), port=proxy.port),
                                             timeout=5, connect_timeout=5, **opts),
                lambda prefix: sftp_from_url(sshd.url(str(base / prefix)), **opts))


def retrying(b: Backend, attempts: int = 4) -> RetryingBackend:
    return RetryingBackend(b, attempts=attempts, backoff=Backoff(base=0.05, cap=0.2))


def test_an_upload_cut_once_is_read_again_from_the_spool(remote: Remote, tmp_path: Path) -> None:
    prefix = f"cut-{uuid.uuid4().hex[:8]}"
    b = retrying(remote.via_proxy(prefix))
    spool = b.open_spool(str(tmp_path))
    assert isinstance(spool, Spool)
    data = os.urandom(6 * 1024 * 1024 + 11)
    for start in range(0, len(data), 700_000):
        spool.write(data[start:start + 700_000])
    remote.proxy.cut_after(len(data) // 2)  # half-way through the first attempt's body
    try:
        b.put("data/ab/pack", spool)
    finally:
        remote.proxy.clear()
    assert remote.proxy.cuts >= 1
    assert b.retries == 1
    assert open_spool_files(tmp_path)  # the owner has not closed it yet
    spool.close()
    assert open_spool_files(tmp_path) == []
    assert remote.direct(prefix).get("data/ab/pack") == data
    assert os.listdir(tmp_path) == []
    b.close()


def _repository(remote: Remote, prefix: str, cache: Path, attempts: int) -> Repository:
    """A repository made directly, opened through the proxy with spools in ``cache``."""
    Repository.init(remote.direct(prefix), "pw")
    stack = CachedBackend(retrying(remote.via_proxy(prefix), attempts), cache)
    return Repository.open(stack, "pw")


def _backup(repo: Repository, pieces: list[bytes]) -> None:
    with repo.new_snapshot("stdin", ["x"]) as w:
        for i, piece in enumerate(pieces):
            w.add_bytes(f"f{i}", piece)
        w.commit()


def test_spool_files_are_gone_after_a_run(remote: Remote, tmp_path: Path) -> None:
    prefix = f"run-{uuid.uuid4().hex[:8]}"
    repo = _repository(remote, prefix, tmp_path / "cache", attempts=4)
    pieces = [os.urandom(3_000_000) for _ in range(12)]  # two data packs and more
    remote.proxy.cut_after(5_000_000)  # one upload fails once on the way
    try:
        _backup(repo, pieces)
    finally:
        remote.proxy.clear()
    assert remote.proxy.cuts >= 1
    assert open_spool_files(tmp_path) == []
    assert [p for p in (tmp_path / "cache").rglob(".tmp-*")] == []
    again = Repository.open(remote.direct(prefix), "pw")
    report = check(again, read_data_fraction=1.0)
    assert report.ok, report.errors
    snap = again.list_snapshots()[0]
    for i, piece in enumerate(pieces):
        assert b"".join(again.iter_file(snap, f"f{i}")) == piece


def test_spool_files_are_gone_after_a_failed_upload(remote: Remote, tmp_path: Path) -> None:
    prefix = f"fail-{uuid.uuid4().hex[:8]}"
    repo = _repository(remote, prefix, tmp_path / "cache", attempts=2)
    remote.proxy.outage_after(1_000_000)  # the network goes down during the first upload
    try:
        with pytest.raises(BackendError):
            _backup(repo, [os.urandom(3_000_000) for _ in range(12)])
    finally:
        remote.proxy.clear()
    assert open_spool_files(tmp_path) == []
    assert [p for p in (tmp_path / "cache").rglob(".tmp-*")] == []
