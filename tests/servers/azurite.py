"""A real Azure Blob Storage emulator (Azurite) on loopback, for tests.

`AzuriteServer` runs Azurite's blob service alone (``azurite-blob``, from the npm package that
``.ci/install.d/azurite.sh`` installs into ``/opt/keepwell-azurite``) on a free port of
127.0.0.1, with its data in a directory of its own and telemetry off. It serves the well-known
development account ``devstoreaccount1`` with path-style URLs
(``http://127.0.0.1:PORT/devstoreaccount1/<container>/<blob>``). `create_container` makes a
container with one SharedKey-signed request, since obstore cannot create containers.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import os
import shutil
import subprocess
import time
from email.utils import formatdate
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from tests.servers import free_port, launch, stop_group, wait_for_port, wait_ready

# Azurite's published development account (the same for every emulator installation).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
API_VERSION = "2021-08-06"
PREFIX = Path(os.environ.get("KEEPWELL_AZURITE_PREFIX", "/opt/keepwell-azurite"))


def azurite_binary() -> str | None:
    """``azurite-blob`` as installed by .ci/install.d/azurite.sh, else from PATH."""
    beside = PREFIX / "node_modules" / ".bin" / "azurite-blob"
    if beside.exists() and shutil.which("node"):
        return str(beside)
    return shutil.which("azurite-blob")


def signed_request(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    host: str = "127.0.0.1",
) -> tuple[int, bytes]:
    """One SharedKey-signed Blob service request; ``path`` starts with ``/devstoreaccount1``."""
    parts = urlsplit(path)
    hdrs = {
        "x-ms-date": formatdate(usegmt=True),
        "x-ms-version": API_VERSION,
        **{k.lower(): v for k, v in (headers or {}).items()},
    }
    content_length = str(len(body)) if body else ""
    canonical_headers = "".join(
        f"{k}:{hdrs[k].strip()}\n" for k in sorted(hdrs) if k.startswith("x-ms-")
    )
    # Path-style (emulator) URLs name the account in the path too, so it appears twice here.
    resource = f"/{ACCOUNT}{parts.path}"
    for key, value in sorted(parse_qsl(parts.query, keep_blank_values=True)):
        resource += f"\n{key.lower()}:{value}"
    to_sign = "\n".join(
        [
            method,
            hdrs.get("content-encoding", ""),
            hdrs.get("content-language", ""),
            content_length,
            hdrs.get("content-md5", ""),
            hdrs.get("content-type", ""),
            "",  # Date: x-ms-date is used instead
            hdrs.get("if-modified-since", ""),
            hdrs.get("if-match", ""),
            hdrs.get("if-none-match", ""),
            hdrs.get("if-unmodified-since", ""),
            hdrs.get("range", ""),
            canonical_headers + resource,
        ]
    )
    signature = base64.b64encode(
        hmac.new(base64.b64decode(ACCOUNT_KEY), to_sign.encode(), hashlib.sha256).digest()
    ).decode()
    hdrs["authorization"] = f"SharedKey {ACCOUNT}:{signature}"
    hdrs["content-length"] = str(len(body))
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class AzuriteServer:
    """``azurite-blob`` bound to 127.0.0.1 on a free port, data under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = workdir / "azurite.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables that point obstore's Azure store at this emulator.

        In emulator mode obstore (object_store) takes the blob endpoint from
        ``AZURITE_BLOB_STORAGE_URL`` (``endpoint`` is ignored there) and allows plain HTTP.
        """
        return {
            "AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT,
            "AZURE_STORAGE_ACCOUNT_KEY": ACCOUNT_KEY,
            "AZURE_STORAGE_USE_EMULATOR": "true",
            "AZURITE_BLOB_STORAGE_URL": self.endpoint,
        }

    def start(self, timeout: float = 30.0) -> AzuriteServer:
        binary = azurite_binary()
        if binary is None:
            raise FileNotFoundError("azurite-blob not found: bash .ci/install.d/azurite.sh")
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        argv = [
            binary,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(self.port),
            "--location",
            str(data),
            "--silent",
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
        ]
        self.proc = launch(argv, self.workdir, self.log_path)
        try:
            wait_for_port(self.port, timeout)
            # a signed container listing that answers 200 says the service and the account work
            wait_ready(self.proc, lambda: signed_request(self.port, "GET", f"/{ACCOUNT}?comp=list"),
                       what="Azurite", log_path=self.log_path, timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def create_container(self, name: str) -> None:
        status, body = signed_request(self.port, "PUT", f"/{ACCOUNT}/{name}?restype=container")
        if status not in (201, 409):  # 409: it exists already
            raise RuntimeError(f"cannot create container {name}: {status} {body[:300]!r}")

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_group(self.proc)
        self.proc = None

    def __enter__(self) -> AzuriteServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # pragma: no cover - manual use: start one and wait
    import json
    import tempfile

    with AzuriteServer(Path(tempfile.mkdtemp(prefix="kw-azurite-"))) as srv:
        srv.create_container("keepwell")
        print(json.dumps(srv.env()), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(3600)
