"""The SFTP backend (paramiko): ``sftp://[user@]host[:port]/absolute/path``.

Words:
    connection  one SSH transport with one SFTP channel; a `SftpBackend` keeps a small pool of
                them (``connections``, default 4) so threads work in parallel, and drops any
                connection that failed or went dead; the next call connects again.

Reads of whole objects and of ranges over 256 KiB run one at a time (``parallel_reads``,
default 1): paramiko's read-ahead does its work in Python threads, and several of them at once
in one process fight over the GIL so badly that together they read at a third of the speed of
one (measured on loopback: one read 100-120 MiB/s, four at once about 30 MiB/s in total).
Writes do not suffer from it and run in parallel.

Stalls: a request that gets no answer for ``timeout`` seconds (default: the stall time,
``KEEPWELL_STALL_TIMEOUT``) fails with `StallError`, and so does a connection whose SSH
handshake does not complete within ``connect_timeout``; the connection is dropped without
waiting for the server to confirm anything more.

Trust and keys: the server's host key must be in a known_hosts file (``known_hosts`` option or
``KEEPWELL_SFTP_KNOWN_HOSTS``, else ``~/.ssh/known_hosts``); unknown or changed keys are refused.
Authentication uses, in order, the ``identity`` option or ``KEEPWELL_SFTP_IDENTITY``, the SSH
agent, and the keys in ``~/.ssh``; ``KEEPWELL_SFTP_PASSWORD`` is tried if set. ``~/.ssh/config``
is read for the host's ``HostName``, ``User``, ``Port`` and ``IdentityFile``. A path that starts
with ``/~/`` is relative to the login directory.

Writes: an object is written to a temporary name in its directory, fsynced when the server
supports ``fsync@openssh.com``, and then renamed. A create-only put uses the plain SFTP rename,
which OpenSSH performs with ``link()`` + ``unlink()`` and which fails if the name exists (no
overwrite, no race); an overwrite uses ``posix-rename@openssh.com``. Temporary names start with
``.tmp-`` and are never listed.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import logging
import os
import posixpath
import queue
import socket
import stat as statmod
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import paramiko

from keepwell import tokens
from keepwell.backends.base import ObjectInfo, check_name
from keepwell.backends.resilience import stall_timeout
from keepwell.backends.spool import Payload, Spool, open_upload_spool, payload_pieces
from keepwell.errors import (
    BackendError,
    ConfigurationError,
    ObjectExistsError,
    ObjectNotFoundError,
    PermanentBackendError,
    StallError,
    TransientBackendError,
)

# paramiko logs a failed connection at ERROR level; with no handler, Python would print it on
# stderr beside keepwell's own one-line error, which already says what happened
logging.getLogger("paramiko").addHandler(logging.NullHandler())

T = TypeVar("T")
_TMP_PREFIX = ".tmp-"
_WRITE_PIECE = 1024 * 1024
_LARGE_READ = 256 * 1024


def _stalled(exc: BaseException) -> bool:
    """A timeout: no answer for the channel's timeout, or an SSH handshake that did not
    complete in time (paramiko then reports "No existing session" from the authentication
    that follows, or a banner it could not read)."""
    text = str(exc).lower()
    return isinstance(exc, socket.timeout | TimeoutError) or (
        isinstance(exc, paramiko.SSHException) and "errno" not in text
        and ("banner" in text or "no existing session" in text))


def classify(exc: BaseException, what: str, stall: float | None = None) -> BackendError:
    """Turn a paramiko or socket exception into the keepwell error it means. ``stall``: the
    seconds a request was given without an answer (for the message of a stall)."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, paramiko.BadHostKeyException):
        return PermanentBackendError(
            f"{what}: the server's host key changed",
            hint="check known_hosts; this may be an attack",
        )
    if isinstance(exc, paramiko.AuthenticationException) and "saw eof" in str(exc).lower():
        # paramiko's word for a connection that went away during authentication: no answer
        # about the key was given, and a new connection may well be let in
        return TransientBackendError(f"{what}: connection lost during authentication ({exc})")
    if isinstance(exc, paramiko.AuthenticationException) and "timeout" in str(exc).lower():
        # paramiko's "Authentication timeout.": the server said nothing about the key within
        # the time given (a frozen server or link), which a new connection may well get past
        waited = f" for {stall:.0f}s" if stall else ""
        return StallError(f"{what}: no answer{waited} while authenticating (stalled)")
    if isinstance(exc, paramiko.AuthenticationException):
        return PermanentBackendError(
            f"{what}: authentication failed: {exc}",
            hint="check the SSH key (KEEPWELL_SFTP_IDENTITY, ssh-agent) and the user name",
        )
    if isinstance(exc, paramiko.SSHException) and "known_hosts" in str(exc):
        return PermanentBackendError(
            f"{what}: the server's host key is unknown",
            hint="add it to known_hosts (ssh-keyscan) or set KEEPWELL_SFTP_KNOWN_HOSTS",
        )
    if isinstance(exc, socket.gaierror):
        return PermanentBackendError(f"{what}: unknown host ({exc})")
    if _stalled(exc):
        waited = f" for {stall:.0f}s" if stall else ""
        return StallError(f"{what}: no answer{waited} (stalled)")
    if isinstance(exc, paramiko.SSHException | EOFError):
        return TransientBackendError(f"{what}: connection lost ({exc or type(exc).__name__})")
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOENT:
            return ObjectNotFoundError(f"{what}: not found")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return PermanentBackendError(f"{what}: permission denied")
        if exc.errno is None and "socket is closed" in str(exc).lower():
            return TransientBackendError(f"{what}: connection lost")
        if exc.errno is None:
            # An SFTP status "Failure": the server answered and refused (disk full, not a
            # directory, ...). Retrying would meet the same answer.
            return PermanentBackendError(f"{what}: the server refused: {exc}")
        return TransientBackendError(f"{what}: {exc.strerror or exc}")
    return TransientBackendError(f"{what}: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _opened(sftp: paramiko.SFTPClient, path: str, mode: str) -> Iterator[paramiko.SFTPFile]:
    """An open remote file, closed at the end; after a stall it is dropped without waiting for
    the server to confirm the close (it would stall as long again)."""
    f = sftp.open(path, mode)
    try:
        yield f
    except BaseException as exc:
        if not (_stalled(exc) or isinstance(exc, EOFError | paramiko.SSHException)):
            with contextlib.suppress(Exception):
                f.close()
        raise
    f.close()


class _Connection:
    def __init__(self, client: paramiko.SSHClient, sftp: paramiko.SFTPClient) -> None:
        self.client = client
        self.sftp = sftp

    def alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sftp.close()
        with contextlib.suppress(Exception):
            self.client.close()


class SftpBackend:
    def __init__(
        self,
        host: str,
        root: str,
        *,
        port: int = 22,
        user: str | None = None,
        password: str | None = None,
        identity: str | None = None,
        known_hosts: str | None = None,
        connections: int = 4,
        parallel_reads: int = 1,
        timeout: float | None = None,
        connect_timeout: float | None = None,
        location: str | None = None,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        self.host = host
        self.port = port
        self.user = user or getpass.getuser()
        self.root = root.rstrip("/") or ("/" if root.startswith("/") else ".")
        self.password = password
        self.identity = identity
        self.known_hosts = known_hosts
        # the stall time: how long a request may go without an answer (the channel's timeout)
        self.timeout = float(timeout) if timeout is not None else stall_timeout()
        self.connect_timeout = (float(connect_timeout) if connect_timeout is not None
                                else min(15.0, self.timeout))
        self.location = location or f"sftp://{self.user}@{host}:{port}/{root.lstrip('/')}"
        self._idle: queue.LifoQueue[_Connection] = queue.LifoQueue()
        self._open = 0
        self._slots = threading.BoundedSemaphore(connections)
        self._read_slots = threading.BoundedSemaphore(max(1, parallel_reads))
        self._lock = threading.Lock()
        self._known_dirs: set[str] = set()
        self._closed = False

    # --- connections ---------------------------------------------------------------------------

    def _connect(self) -> _Connection:
        client = paramiko.SSHClient()
        try:
            if self.known_hosts:
                if not os.path.exists(self.known_hosts):
                    raise ConfigurationError(f"known_hosts file {self.known_hosts} not found")
                client.load_host_keys(self.known_hosts)
            else:
                client.load_system_host_keys()
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            client.connect(
                self.host,
                port=self.port,
                username=self.user,
                password=self.password,
                key_filename=self.identity,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                allow_agent=True,
                look_for_keys=True,
            )
            transport = client.get_transport()
            if transport is not None:
                transport.set_keepalive(15)
            sftp = client.open_sftp()
            sftp.get_channel().settimeout(self.timeout)
        except BaseException:
            client.close()
            raise
        return _Connection(client, sftp)

    def _take(self, what: str) -> _Connection:
        if self._closed:
            raise PermanentBackendError(f"{what}: the backend was closed")
        self._slots.acquire()
        try:
            while True:
                try:
                    conn = self._idle.get_nowait()
                except queue.Empty:
                    break
                if conn.alive():
                    return conn
                self._discard(conn)  # the server or the network dropped it while idle
            try:
                conn = self._connect()
                with self._lock:
                    self._open += 1
                return conn
            except ConfigurationError:
                raise
            except Exception as exc:
                raise classify(exc, f"{what}: connecting to {self.host}:{self.port}",
                               self.connect_timeout) from None
        except BaseException:
            self._slots.release()
            raise

    def _give_back(self, conn: _Connection, healthy: bool) -> None:
        if healthy and conn.alive() and not self._closed:
            self._idle.put(conn)
        else:
            self._discard(conn)
        self._slots.release()

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        with self._lock:
            self._open -= 1

    @property
    def open_connections(self) -> int:
        return self._open

    def _run(self, what: str, fn: Callable[[paramiko.SFTPClient], T]) -> T:
        conn = self._take(what)
        healthy = True
        try:
            return fn(conn.sftp)
        except BackendError:
            raise
        except Exception as exc:
            if not conn.alive():
                # Whatever paramiko raised ("Socket is closed", EOF, ...), the connection died.
                healthy = False
                raise TransientBackendError(f"{what}: connection lost ({exc})") from None
            # An SFTP status leaves the channel usable; anything else may have left requests
            # in flight.
            healthy = (
                type(exc) is OSError or isinstance(exc, FileNotFoundError | PermissionError)
            ) and not isinstance(exc, TimeoutError)
            raise classify(exc, what, self.timeout) from None
        finally:
            self._give_back(conn, healthy)

    # --- paths ---------------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        check_name(name)
        return posixpath.join(self.root, name)

    def _makedirs(self, sftp: paramiko.SFTPClient, directory: str) -> None:
        if directory in self._known_dirs or directory in ("", "/", "."):
            return
        try:
            attrs = sftp.stat(directory)
            if attrs.st_mode is not None and not statmod.S_ISDIR(attrs.st_mode):
                raise PermanentBackendError(f"{directory} on {self.host} is not a directory")
        except FileNotFoundError:
            self._makedirs(sftp, posixpath.dirname(directory))
            try:
                sftp.mkdir(directory, 0o700)
            except OSError:
                # Another writer may have made it in the meantime; only a missing dir is an error.
                sftp.stat(directory)
        with self._lock:
            self._known_dirs.add(directory)

    # --- the interface -------------------------------------------------------------------------

    def open_spool(self, directory: str | None = None) -> Spool:
        """A spool (keepwell.backends.spool) in ``directory``, else in $TMPDIR, for ``put``."""
        return open_upload_spool(directory, self.location)

    def put(self, name: str, data: Payload, *, overwrite: bool = False) -> None:
        final = self._path(name)
        directory = posixpath.dirname(final)
        tmp = posixpath.join(directory, f"{_TMP_PREFIX}{tokens.token_hex(8)}")

        def do(sftp: paramiko.SFTPClient) -> None:
            self._makedirs(sftp, directory)
            try:
                with _opened(sftp, tmp, "wb") as f:
                    f.set_pipelined(True)
                    for piece in payload_pieces(data, _WRITE_PIECE):  # a spool: from its start
                        f.write(piece)
                    f.flush()
                    self._fsync(sftp, f)
                if overwrite:
                    sftp.posix_rename(tmp, final)
                else:
                    try:
                        sftp.rename(tmp, final)
                    except OSError as exc:
                        # Only an SFTP status "Failure" (a plain OSError without errno) may mean
                        # "exists"; a timeout (also errno-less) says nothing about the rename.
                        if type(exc) is OSError and exc.errno is None and self._exists(sftp, final):
                            raise ObjectExistsError(
                                f"{name} already exists in {self.location}"
                            ) from None
                        raise
            except BaseException as exc:
                if not (_stalled(exc) or isinstance(exc, EOFError | paramiko.SSHException)):
                    with contextlib.suppress(Exception):  # the server answers: tidy up
                        sftp.remove(tmp)
                raise

        self._run(f"writing {name} in {self.location}", do)

    @staticmethod
    def _fsync(sftp: paramiko.SFTPClient, f: paramiko.SFTPFile) -> None:
        # paramiko has no public call for the OpenSSH extension; a server without it only
        # makes the write less durable, never wrong.
        try:
            sftp._request(paramiko.sftp.CMD_EXTENDED, "fsync@openssh.com", f.handle)
        except OSError as exc:
            if exc.errno is not None:
                raise

    @staticmethod
    def _exists(sftp: paramiko.SFTPClient, path: str) -> bool:
        try:
            sftp.stat(path)
            return True
        except FileNotFoundError:
            return False

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")

        def do(sftp: paramiko.SFTPClient) -> bytes:
            with _opened(sftp, path, "rb") as f:
                size = f.stat().st_size or 0
                end = size if length is None else min(size, offset + length)
                want = max(0, end - offset)
                if want == 0:
                    return b""
                # paramiko concatenates bytes when one read() spans many requests (quadratic on
                # large objects): ask for pieces of one request each and join them once.
                piece = paramiko.SFTPFile.MAX_REQUEST_SIZE
                ranges = [(o, min(piece, offset + want - o)) for o in range(offset, end, piece)]
                if offset == 0 and want == size:
                    f.prefetch(size)
                    data = b"".join([f.read(n) for _, n in ranges])
                else:
                    data = b"".join(f.readv(ranges))
            if len(data) != want:
                raise TransientBackendError(
                    f"reading {name} in {self.location}: got {len(data)} of {want} bytes"
                )
            return data

        # The slot is taken before a connection (waiting with an open file slowed the reads
        # down again); a whole-object read counts as large, its size is not known yet.
        large = length is None or length > _LARGE_READ
        with self._read_slots if large else contextlib.nullcontext():
            return self._run(f"reading {name} in {self.location}", do)

    def stat(self, name: str) -> ObjectInfo:
        path = self._path(name)
        attrs = self._run(f"stat of {name} in {self.location}", lambda s: s.stat(path))
        if attrs.st_mode is not None and statmod.S_ISDIR(attrs.st_mode):
            raise ObjectNotFoundError(f"stat of {name} in {self.location}: not found")
        return ObjectInfo(name, attrs.st_size or 0)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""

        def walk(sftp: paramiko.SFTPClient) -> list[ObjectInfo]:
            found: list[ObjectInfo] = []
            stack = [base]
            while stack:
                rel = stack.pop()
                directory = posixpath.join(self.root, rel) if rel else self.root
                try:
                    entries = sftp.listdir_attr(directory)
                except FileNotFoundError:
                    continue
                for entry in sorted(entries, key=lambda e: e.filename, reverse=True):
                    if entry.filename.startswith(_TMP_PREFIX):
                        continue
                    name = f"{rel}/{entry.filename}" if rel else entry.filename
                    mode = entry.st_mode or 0
                    if statmod.S_ISDIR(mode):
                        if name.startswith(prefix) or prefix.startswith(name + "/"):
                            stack.append(name)
                    elif name.startswith(prefix):
                        found.append(ObjectInfo(name, entry.st_size or 0))
            found.sort(key=lambda i: i.name)
            return found

        # One connection walks the whole listing; the result is small (names and sizes).
        yield from self._run(f"listing {prefix or '/'} in {self.location}", walk)

    def delete(self, name: str) -> None:
        path = self._path(name)
        self._run(f"deleting {name} in {self.location}", lambda s: s.remove(path))

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._discard(self._idle.get_nowait())
            except queue.Empty:
                return

    def __repr__(self) -> str:
        return f"SftpBackend({self.location!r})"


def _ssh_config(host: str) -> dict[str, Any]:
    path = os.path.expanduser("~/.ssh/config")
    if not os.path.exists(path):
        return {}
    try:
        return dict(paramiko.SSHConfig.from_path(path).lookup(host))
    except Exception:
        return {}


def from_url(url: str, **options: Any) -> SftpBackend:
    """``sftp://[user[:password]@]host[:port]/path``; see the module docstring."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "sftp" or not parts.hostname:
        raise ConfigurationError(f"expected sftp://[user@]host[:port]/path, got {url!r}")
    alias = parts.hostname
    cfg = _ssh_config(alias)
    host = str(cfg.get("hostname", alias))
    try:
        port = int(parts.port or cfg.get("port", 22))
    except ValueError:
        raise ConfigurationError(f"bad port in {url!r}") from None
    user = unquote(parts.username) if parts.username else cfg.get("user")
    password = (
        unquote(parts.password)
        if parts.password
        else options.pop("password", None) or os.environ.get("KEEPWELL_SFTP_PASSWORD")
    )
    path = unquote(parts.path) or "/"
    root = (path[3:] or ".") if path.startswith("/~/") else path
    identity = options.pop("identity", None) or os.environ.get("KEEPWELL_SFTP_IDENTITY")
    if identity is None and cfg.get("identityfile"):
        files = [os.path.expanduser(p) for p in cfg["identityfile"]]
        identity = [p for p in files if os.path.exists(p)] or None
    known_hosts = options.pop("known_hosts", None) or os.environ.get("KEEPWELL_SFTP_KNOWN_HOSTS")
    netloc = f"{user}@{alias}" if user else alias
    location = f"sftp://{netloc}:{parts.port}{path}" if parts.port else f"sftp://{netloc}{path}"
    return SftpBackend(
        host,
        root,
        port=port,
        user=user,
        password=password,
        identity=identity,
        known_hosts=known_hosts,
        location=location,
        **options,
    )
