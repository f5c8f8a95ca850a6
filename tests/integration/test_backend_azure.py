"""The ``az://`` backend (obstore's Azure store) against a real Azurite blob service: the shared
contract (plain and wrapped), the endpoint given explicitly over plain HTTP, a wrong account key,
and ``init``/``backup``/``restore``/``check --read-data`` through the command line.

Azurite comes from ``.ci/install.d/azurite.sh`` (npm, into /opt/keepwell-azurite); without it
these tests are skipped with the reason, as for the other servers. It serves the well-known
development account ``devstoreaccount1``; the store finds it through obstore's own variables
(``AZURE_STORAGE_ACCOUNT_NAME``, ``AZURE_STORAGE_ACCOUNT_KEY``, ``AZURE_STORAGE_USE_EMULATOR``
and ``AZURITE_BLOB_STORAGE_URL`` for the emulator's address).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepwell.backends.base import Backend
from keepwell.backends.objectstore import ObjectStoreBackend, azure_from_url
from keepwell.backends.registry import open_backend
from keepwell.backends.wrappers import wrap
from keepwell.errors import PermanentBackendError
from tests.backend_contract import BackendContract
from tests.servers.azurite import ACCOUNT, AzuriteServer, azurite_binary
from tests.trees import make_tree, tree_contents

pytestmark = pytest.mark.integration

CONTAINER = "keepwell"
KW = [sys.executable, "-m", "keepwell.cli.main"]
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    if azurite_binary() is None:
        pytest.skip("Azurite not installed (bash .ci/install.d/azurite.sh)")
    server = AzuriteServer(tmp_path_factory.mktemp("azurite")).start()
    try:
        server.create_container(CONTAINER)
        yield server
    finally:
        server.stop()


def _clear_azure_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("AZURE_", "AZURITE_")):
            monkeypatch.delenv(key)


@pytest.fixture
def az_env(azurite: AzuriteServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """obstore's Azure variables pointing at the emulator, set for the test's duration."""
    _clear_azure_env(monkeypatch)
    env = azurite.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def az_url(az_env: dict[str, str]) -> str:
    """A fresh, empty ``az://`` location (its own prefix in the test container)."""
    return f"az://{CONTAINER}/t-{uuid.uuid4().hex[:12]}"


class TestAzureContract(BackendContract):
    @pytest.fixture
    def backend(self, az_url: str) -> Iterator[Backend]:
        b = open_backend(az_url)
        assert isinstance(b, ObjectStoreBackend)
        yield b
        b.close()


class TestWrappedAzureContract(BackendContract):
    @pytest.fixture
    def backend(self, az_url: str, tmp_path: Path) -> Iterator[Backend]:
        b = wrap(open_backend(az_url), cache_dir=tmp_path, max_concurrent=4)
        yield b
        b.close()


def test_explicit_http_endpoint(azurite: AzuriteServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the emulator switch: the account's endpoint, as an option or in
    AZURE_STORAGE_ENDPOINT, over plain HTTP because it is an http:// URL."""
    _clear_azure_env(monkeypatch)
    env = azurite.env()
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", env["AZURE_STORAGE_ACCOUNT_NAME"])
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", env["AZURE_STORAGE_ACCOUNT_KEY"])
    endpoint = f"{azurite.endpoint}/{ACCOUNT}"
    b = azure_from_url(f"az://{CONTAINER}/endpoint-opt", endpoint=endpoint)
    b.put("config", b"c", overwrite=True)
    assert b.get("config") == b"c"
    monkeypatch.setenv("AZURE_STORAGE_ENDPOINT", endpoint + "/")
    b = open_backend(f"az://{CONTAINER}/endpoint-env")
    b.put("keys/k", b"k", overwrite=True)
    assert [i.name for i in b.list("keys/")] == ["keys/k"]


def test_wrong_key_is_permanent(az_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", base64.b64encode(b"w" * 64).decode())
    b = open_backend(az_url, max_retries=0)
    with pytest.raises(PermanentBackendError, match="access denied"):
        b.get("config")
    with pytest.raises(PermanentBackendError, match="access denied"):
        b.put("config", b"x")


def test_missing_container_is_permanent(az_env: dict[str, str]) -> None:
    b = open_backend(f"az://no-such-container-{uuid.uuid4().hex[:8]}/x", max_retries=0)
    with pytest.raises(PermanentBackendError, match="bucket does not exist"):
        b.get("config")
    with pytest.raises(PermanentBackendError, match="bucket does not exist"):
        b.put("config", b"x")


# --- through the command line --------------------------------------------------------------------


def kw(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KEEPWELL_PASSWORD": PASSWORD, "KEEPWELL_TESTONLY_WEAK_KDF": "1"}
    proc = subprocess.run([*KW, *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"keepwell {' '.join(args)}: rc {proc.returncode}\n{proc.stderr}"
    return proc


def test_cli_init_backup_restore_check(
    az_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for var in ("KEEPWELL_PASSWORD_FILE", "KEEPWELL_REPOSITORY"):
        monkeypatch.delenv(var, raising=False)
    data = tmp_path / "data"
    data.mkdir()
    make_tree(data, notes=20, parts=3, repeat=30, random_mib=3, seed=11)

    kw("-r", az_url, "init")
    kw("-r", az_url, "backup", str(data))
    names = {i.name.split("/", 1)[0] for i in open_backend(az_url).list("")}
    assert {"config", "data", "index", "snapshots"} <= names

    target = tmp_path / "restored"
    kw("-r", az_url, "restore", "latest", "--target", str(target))
    assert tree_contents(target / str(data).lstrip("/")) == tree_contents(data)

    proc = kw("-r", az_url, "check", "--read-data")
    assert "no errors were found" in proc.stdout
