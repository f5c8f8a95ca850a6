"""The S3 backend against a real SeaweedFS gateway: the shared contract, plus S3 specifics."""

# ruff: noqa: F811

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepwell.backends.base import Backend
from keepwell.backends.objectstore import ObjectStoreBackend, from_url
from keepwell.backends.registry import open_backend
from keepwell.backends.wrappers import wrap
from keepwell.errors import (
    ConfigurationError,
    ObjectNotFoundError,
    PermanentBackendError,
    TransientBackendError,
)
from tests.backend_contract import BackendContract, RemoteSpoolContract, SpooledPuts
from tests.servers.seaweed import SeaweedServer

pytestmark = pytest.mark.integration


class TestS3Contract(BackendContract):
    @pytest.fixture
    def backend(self, s3_url: str) -> Iterator[Backend]:
        b = open_backend(s3_url)
        assert isinstance(b, ObjectStoreBackend)
        yield b
        b.close()


class TestWrappedS3Contract(BackendContract):
    @pytest.fixture
    def backend(self, s3_url: str, tmp_path: os.PathLike[str]) -> Iterator[Backend]:
        b = wrap(open_backend(s3_url), cache_dir=tmp_path, max_concurrent=4)
        yield b
        b.close()


class TestSpooledS3Contract(RemoteSpoolContract):
    @pytest.fixture
    def backend(self, s3_url: str, tmp_path: Path) -> Iterator[Backend]:
        b = SpooledPuts(open_backend(s3_url), str(tmp_path))
        yield b
        b.close()


class TestSpooledWrappedS3Contract(RemoteSpoolContract):
    """Spools in the cache directory, stored through the usual wrappers."""

    @pytest.fixture
    def backend(self, s3_url: str, tmp_path: Path) -> Iterator[Backend]:
        b = SpooledPuts(wrap(open_backend(s3_url), cache_dir=tmp_path, max_concurrent=4))
        yield b
        b.close()
        assert b.spooled == 0 or b.last_directory.startswith(str(tmp_path))


def test_options_override_environment(
    seaweed: SeaweedServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    env = seaweed.env()
    b = from_url(
        "s3://keepwell/opts",
        endpoint=env["AWS_ENDPOINT_URL"],
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    b.put("config", b"c", overwrite=True)
    assert b.get("config") == b"c"


def test_profile_from_shared_files(
    seaweed: SeaweedServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: os.PathLike[str],
) -> None:
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    env = seaweed.env()
    creds = os.path.join(tmp_path, "credentials")
    config = os.path.join(tmp_path, "config")
    with open(creds, "w") as f:
        f.write(
            f"[backup]\naws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\n"
            f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}\n"
        )
    with open(config, "w") as f:
        f.write(f"[profile backup]\nregion = us-east-1\nendpoint_url = {env['AWS_ENDPOINT_URL']}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", creds)
    monkeypatch.setenv("AWS_CONFIG_FILE", config)
    monkeypatch.setenv("AWS_PROFILE", "backup")
    b = open_backend("s3://keepwell/profile")
    b.put("keys/k", b"k", overwrite=True)
    assert b.get("keys/k") == b"k"
    monkeypatch.setenv("AWS_PROFILE", "nope")
    with pytest.raises(ConfigurationError):
        open_backend("s3://keepwell/profile")


def test_wrong_secret_is_permanent(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    b = open_backend(s3_url)
    with pytest.raises(PermanentBackendError, match="access denied"):
        b.get("config")


def test_missing_bucket_is_permanent(s3_env: dict[str, str]) -> None:
    b = open_backend("s3://no-such-bucket-here/x")
    with pytest.raises(PermanentBackendError, match="bucket does not exist"):
        b.get("config")


def test_unreachable_endpoint_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    b = open_backend("s3://keepwell/x", max_retries=0)
    with pytest.raises(TransientBackendError):
        b.stat("config")


def test_ranged_reads_at_and_past_the_end(s3_url: str) -> None:
    b = open_backend(s3_url)
    b.put("data/aa/r", b"0123456789")
    assert b.get("data/aa/r", 10) == b""
    assert b.get("data/aa/r", 10, 5) == b""
    assert b.get("data/aa/r", 8, 100) == b"89"
    assert b.get("data/aa/r", 3, 0) == b""
    with pytest.raises(ObjectNotFoundError):
        b.get("data/aa/none", 10, 5)


def test_multipart_overwrite_of_a_large_object(s3_url: str) -> None:
    b = from_url(s3_url, multipart_threshold=1024 * 1024)
    data = os.urandom(20 * 1024 * 1024)
    b.put("data/bb/mp", data[:100], overwrite=True)
    b.put("data/bb/mp", data, overwrite=True)  # 2 parts of 16 MiB and 4 MiB
    assert b.stat("data/bb/mp").size == len(data)
    assert b.get("data/bb/mp") == data


def test_list_prefix_that_is_not_a_directory(s3_url: str) -> None:
    b = open_backend(s3_url)
    for name in ("data/0a/x", "data/0b/y", "data/1c/z"):
        b.put(name, b"1")
    assert sorted(i.name for i in b.list("data/0")) == ["data/0a/x", "data/0b/y"]
