"""The SFTP backend against a real OpenSSH server: the shared contract, plus SFTP specifics."""

# ruff: noqa: F811

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepwell.backends.base import Backend
from keepwell.backends.registry import open_backend
from keepwell.backends.sftp import SftpBackend
from keepwell.backends.wrappers import wrap
from keepwell.errors import ObjectExistsError, PermanentBackendError
from tests.backend_contract import BackendContract, RemoteSpoolContract, SpooledPuts
from tests.servers.sshd import SshServer

pytestmark = pytest.mark.integration


class TestSftpContract(BackendContract):
    @pytest.fixture
    def backend(self, sftp_url: str) -> Iterator[Backend]:
        b = open_backend(sftp_url)
        assert isinstance(b, SftpBackend)
        yield b
        b.close()


class TestWrappedSftpContract(BackendContract):
    @pytest.fixture
    def backend(self, sftp_url: str, tmp_path: Path) -> Iterator[Backend]:
        b = wrap(open_backend(sftp_url), cache_dir=tmp_path / "cache", max_concurrent=3)
        yield b
        b.close()


class TestSpooledSftpContract(RemoteSpoolContract):
    @pytest.fixture
    def backend(self, sftp_url: str, tmp_path: Path) -> Iterator[Backend]:
        (tmp_path / "spools").mkdir()
        b = SpooledPuts(open_backend(sftp_url), str(tmp_path / "spools"))
        yield b
        b.close()


class TestSpooledWrappedSftpContract(RemoteSpoolContract):
    """Spools in the cache directory, stored through the usual wrappers."""

    @pytest.fixture
    def backend(self, sftp_url: str, tmp_path: Path) -> Iterator[Backend]:
        b = SpooledPuts(wrap(open_backend(sftp_url), cache_dir=tmp_path / "cache", max_concurrent=3))
        yield b
        b.close()
        assert b.spooled == 0 or b.last_directory.startswith(str(tmp_path / "cache"))


def test_objects_are_files_and_no_temporaries_remain(sftp_url: str) -> None:
    b = open_backend(sftp_url)
    b.put("data/00/x", b"1")
    with pytest.raises(ObjectExistsError):
        b.put("data/00/x", b"2")
    root = Path("/" + sftp_url.split("/", 3)[3])
    assert sorted(os.listdir(root / "data" / "00")) == ["x"]
    assert (root / "data" / "00" / "x").read_bytes() == b"1"


def test_unknown_host_key_is_refused(
    sshd: SshServer,
    sftp_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    monkeypatch.setenv("KEEPWELL_SFTP_KNOWN_HOSTS", str(empty))
    b = open_backend(sftp_url)
    with pytest.raises(PermanentBackendError, match="host key is unknown"):
        b.stat("config")


def test_wrong_key_is_refused(
    sftp_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    monkeypatch.setenv("KEEPWELL_SFTP_IDENTITY", str(other))
    monkeypatch.setenv("SSH_AUTH_SOCK", "")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh keys to fall back on
    b = open_backend(sftp_url)
    with pytest.raises(PermanentBackendError, match="authentication failed"):
        b.stat("config")


def test_parallel_threads_share_a_small_pool(sftp_url: str) -> None:
    b = open_backend(sftp_url, connections=3)
    assert isinstance(b, SftpBackend)
    blobs = {f"data/{i:02x}/obj": os.urandom(50_000 + i) for i in range(24)}
    errors: list[BaseException] = []
    peak = [0]

    def work(names: list[str]) -> None:
        try:
            for n in names:
                b.put(n, blobs[n])
                peak[0] = max(peak[0], b.open_connections)
                assert b.get(n) == blobs[n]
        except BaseException as exc:
            errors.append(exc)

    names = sorted(blobs)
    threads = [threading.Thread(target=work, args=(names[i::6],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert 1 <= peak[0] <= 3
    assert {i.name: i.size for i in b.list("data/")} == {n: len(d) for n, d in blobs.items()}


def test_reconnects_after_the_server_drops_the_connection(sftp_url: str) -> None:
    b = open_backend(sftp_url, connections=1)
    assert isinstance(b, SftpBackend)
    b.put("index/a", b"a")
    conn = b._idle.get_nowait()
    conn.client.get_transport().close()  # type: ignore[union-attr]
    b._idle.put(conn)
    assert b.get("index/a") == b"a"  # a dead pooled connection is replaced, not used
