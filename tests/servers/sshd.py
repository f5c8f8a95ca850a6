"""A real OpenSSH server on loopback, for SFTP tests.

`SshServer` runs Debian's ``/usr/sbin/sshd`` in the foreground with a config, a host key, a
client key pair and a known_hosts file of its own, all generated in its directory, on a free
port of 127.0.0.1. It logs in as the user running the tests (root in CI) with that key only.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import subprocess
from pathlib import Path

from tests.servers import free_port, wait_for_port


def sshd_binary() -> str | None:
    for candidate in ("/usr/sbin/sshd", shutil.which("sshd")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "keepwell-test", "-f", str(path)],
        check=True,
    )
    return path.with_suffix(".pub").read_text().strip()


class SshServer:
    """``sshd -D`` on 127.0.0.1 with the internal SFTP server and one authorized key."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.user = getpass.getuser()
        self.proc: subprocess.Popen[bytes] | None = None
        self.host_key = workdir / "host_ed25519"
        self.identity = workdir / "id_ed25519"
        self.known_hosts = workdir / "known_hosts"
        self.log_path = workdir / "sshd.log"

    def url(self, path: str, port: int | None = None) -> str:
        """An ``sftp://`` URL for an absolute path on this server (``port`` to go via a proxy)."""
        return f"sftp://{self.user}@127.0.0.1:{port or self.port}/{path.lstrip('/')}"

    def env(self) -> dict[str, str]:
        return {
            "KEEPWELL_SFTP_KNOWN_HOSTS": str(self.known_hosts),
            "KEEPWELL_SFTP_IDENTITY": str(self.identity),
        }

    def trust_port(self, port: int) -> None:
        """Also accept this server's host key on another port (a proxy in front of it)."""
        key = " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])
        with open(self.known_hosts, "a") as f:
            f.write(f"[127.0.0.1]:{port} {key}\n")

    def start(self, timeout: float = 20.0) -> SshServer:
        binary = sshd_binary()
        if binary is None:
            raise FileNotFoundError("sshd not found: apt-get install openssh-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        host_pub = _keygen(self.host_key)
        client_pub = _keygen(self.identity)
        (self.workdir / "authorized_keys").write_text(client_pub + "\n")
        self.port = free_port()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {' '.join(host_pub.split()[:2])}\n")
        config = self.workdir / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.workdir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "UseDNS no",
                    "MaxSessions 64",
                    "MaxStartups 64:30:128",
                    "LogLevel INFO",
                    "Subsystem sftp internal-sftp",
                    "",
                ]
            )
        )
        # Debian's sshd refuses to start without its privilege-separation directory.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the server's lifetime
        self.proc = subprocess.Popen(
            [binary, "-D", "-e", "-f", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        try:
            wait_for_port(self.port, timeout)
        except BaseException:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"sshd exited; see {self.log_path}")
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        # The session's group holds the listener and every per-connection child.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> SshServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
