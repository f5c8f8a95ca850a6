"""Object-store backends through obstore: ``s3://`` (AWS and S3-compatible), ``gs://``, ``az://``.

`ObjectStoreBackend` maps the backend interface onto any obstore store and classifies every
error into `keepwell.errors`; the factories below build the store from a URL, the standard
environment variables and keyword options.

S3 configuration, strongest first: keyword options (``endpoint``, ``region``,
``access_key_id``, ``secret_access_key``, ``session_token``, ``profile``), then the standard
variables (``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``), then the shared
files of ``AWS_PROFILE`` (``~/.aws/credentials`` and ``~/.aws/config``, or the files named by
``AWS_SHARED_CREDENTIALS_FILE`` and ``AWS_CONFIG_FILE``). Plain HTTP is allowed exactly when
the endpoint URL is ``http://``.

Semantics: a create-only put is one conditional request (``If-None-Match: *``), so two writers
can never both succeed; an overwrite of a large object uses a multipart upload, which S3
publishes atomically on completion. ``delete`` of a missing object is an error, as the contract
wants, at the cost of one HEAD request. obstore retries a little by itself (connection errors,
5xx), except for create-only puts, whose failures must reach
`keepwell.backends.wrappers.RetryingBackend` as they are (see `ObjectStoreBackend`); longer
retries are its job too.
"""

from __future__ import annotations

import configparser
import contextlib
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    InvalidPathError,
    NotSupportedError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
    UnknownConfigurationKeyError,
)

from keepwell.backends.base import ObjectInfo, check_name
from keepwell.backends.resilience import stall_timeout
from keepwell.backends.spool import Payload, Spool, open_upload_spool
from keepwell.errors import (
    BackendError,
    ConfigurationError,
    KeepwellError,
    ObjectExistsError,
    ObjectNotFoundError,
    PermanentBackendError,
    StallError,
    TransientBackendError,
)

MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 16 * 1024 * 1024
_STATUS = re.compile(r"status code: (\d{3})")
_XML_CODE = re.compile(r"<Code>([^<]+)</Code>")


def _short(exc: BaseException) -> str:
    """The first useful line of an obstore error, without the debug dump."""
    text = str(exc).split("\n\nDebug source:", 1)[0]
    code = _XML_CODE.search(text)
    first = text.split("<?xml", 1)[0].strip().rstrip(":")
    if code:
        first = f"{first} ({code.group(1)})"
    return first[:400]


NO_CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; "
                       "see docs/storage.md")
# what obstore's error says when it asked the cloud's instance metadata service for credentials
_METADATA_PATHS = ("/latest/api/token", "/latest/meta-data/")
_TIMED_OUT = re.compile(r"kind: Timeout|TimedOut|timed out", re.IGNORECASE)
_OS_MESSAGE = re.compile(r'message: "([^"]+)"')
_HTTP_KIND = re.compile(r"HttpError \{\s*kind: (\w+)")
# S3 answers a DeleteObjects request (how obstore deletes) with 200 and an error per key; these
# codes say the credentials may not delete, which no retry changes
_DELETE_DENIED = re.compile(
    r'DeleteFailed \{[^}]*code: "(AccessDenied|AllAccessDisabled|InvalidAccessKeyId)"')


def _cause(exc: BaseException) -> str | None:
    """Why a request failed on the network, from the debug dump of an obstore error:
    ``"stalled"`` for a timeout, the system's message (connection refused, reset...), or the
    kind of HTTP failure; None when the store answered."""
    text = str(exc)
    if _TIMED_OUT.search(text):
        return "stalled"
    found = _OS_MESSAGE.findall(text)
    if found:
        return str(found[-1][0]).lower() + str(found[-1][1:])
    kind = _HTTP_KIND.search(text)
    return f"connection {kind.group(1).lower()}" if kind else None


def classify(exc: BaseException, what: str, stall: float | None = None) -> KeepwellError:
    """Turn an obstore (or builtin) exception into the keepwell error it means. ``stall``: the
    seconds the request was given without an answer (for the message of a stall)."""
    if any(m in str(exc) for m in _METADATA_PATHS):
        # no credentials anywhere but a metadata service that is not there (not on EC2)
        return PermanentBackendError(f"{what}: no S3 credentials found", hint=NO_CREDENTIALS_HINT)
    detail = _short(exc)
    if isinstance(exc, FileNotFoundError):
        if "NoSuchBucket" in str(exc) or "ContainerNotFound" in str(exc):  # S3, Azure
            return PermanentBackendError(
                f"{what}: the bucket does not exist", hint="create the bucket first"
            )
        return ObjectNotFoundError(f"{what}: not found")
    if isinstance(exc, AlreadyExistsError | PreconditionError):
        return ObjectExistsError(f"{what}: already exists")
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError) \
            or _DELETE_DENIED.search(str(exc)):
        return PermanentBackendError(
            f"{what}: access denied: {detail}", hint="check the credentials and their permissions"
        )
    if isinstance(exc, UnknownConfigurationKeyError):
        return ConfigurationError(f"{what}: {detail}")
    if isinstance(exc, InvalidPathError | NotSupportedError | ValueError):
        return PermanentBackendError(f"{what}: {detail}")
    status = _STATUS.search(str(exc))
    if status:
        code = int(status.group(1))
        if 400 <= code < 500 and code not in (408, 409, 423, 429):
            return PermanentBackendError(f"{what}: {detail}")
        # 5xx, throttling: worth another try
        return TransientBackendError(f"{what}: {detail}")
    cause = _cause(exc)
    if cause == "stalled":
        waited = f" for {stall:.0f}s" if stall else ""
        return StallError(f"{what}: no answer{waited} (stalled)")
    # timeouts, resets, refused connections: worth another try
    return TransientBackendError(f"{what}: {cause or detail}")


# An upload's progress cannot be seen through obstore: an upload counts as stalled when it has
# had no answer for the stall time plus the time its bytes need at half the upload rate measured
# so far (`UPLOAD_FLOOR` before one was measured). Each stalled upload halves the rate assumed,
# so the next attempt on a link slower than thought is twice as patient.
UPLOAD_FLOOR = 1024 * 1024  # bytes per second
_MEASURED_FROM = 1024 * 1024  # uploads this large tell the rate
_MAX_WAIT = 64  # stall times: the most an upload store waits for an answer

StoreBuilder = Callable[[dict[str, Any], dict[str, Any]], Any]  # client, retry options -> store


class ObjectStoreBackend:
    """The backend interface over one obstore store (one bucket and prefix).

    ``build(client, retry)`` makes a store with those obstore client and retry options. Reads
    and listings use one store whose ``read_timeout`` is the stall time (it restarts with every
    byte that arrives, so only a silent connection trips it). Uploads go through stores whose
    ``read_timeout`` covers the upload (see `UPLOAD_FLOOR`), made as needed, one for each
    multiple of half the stall time that an upload was given. Create-only puts go through stores that never retry by themselves:
    if the answer to a conditional PUT that did succeed is lost, a silent retry would meet "412
    exists" and report our own object as someone else's; the failure must reach RetryingBackend
    as transient (ambiguous), which then compares contents.
    """

    def __init__(
        self,
        build: StoreBuilder,
        location: str,
        *,
        client: dict[str, Any],
        retry: dict[str, Any],
        stall: float,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        endpoint: str | None = None,
    ) -> None:
        self._build = build
        self._client = client
        self._retry = retry
        self.stall = stall
        self.store = build(client, retry)
        self._put_stores: dict[tuple[int, bool], Any] = {}
        self._lock = threading.Lock()
        self._rate: float | None = None  # upload bytes per second, as measured (None: not yet)
        self.location = location
        # the server (an S3-compatible endpoint, or the provider's own): errors name it, and
        # the same bucket and prefix on two servers are two stores (a cache keeps them apart)
        self.endpoint = endpoint
        self.cache_identity = f"{location} at {endpoint}" if endpoint else location
        self.multipart_threshold = multipart_threshold

    def _what(self, verb: str, name: str) -> str:
        at = f" at {self.endpoint}" if self.endpoint else ""
        return f"{verb} {name} in {self.location}{at}"

    # -- uploads ---------------------------------------------------------------------------------
    def allowance(self, size: int) -> float:
        """Seconds an upload of ``size`` bytes may go without an answer."""
        with self._lock:
            rate = 2 * UPLOAD_FLOOR if self._rate is None else self._rate
        return self.stall + size / (rate / 2)

    def _put_store(self, seconds: float, create: bool) -> tuple[Any, float]:
        # one store per half stall time of patience (uploads of one size share it)
        rung = min(math.ceil(2 * seconds / self.stall), 2 * _MAX_WAIT)
        wait = rung * self.stall / 2
        with self._lock:
            store = self._put_stores.get((rung, create))
            if store is None:
                client = {**self._client, "read_timeout": timedelta(seconds=wait),
                          "timeout": max(self._client["timeout"], timedelta(seconds=2 * wait))}
                retry = {**self._retry, "max_retries": 0} if create else self._retry
                store = self._put_stores[rung, create] = self._build(client, retry)
        return store, wait

    def _uploaded(self, size: int, seconds: float) -> None:
        if size >= _MEASURED_FROM and seconds > 0:
            with self._lock:
                sample = size / seconds
                self._rate = sample if self._rate is None else 0.7 * self._rate + 0.3 * sample

    def open_spool(self, directory: str | None = None) -> Spool:
        """A spool (keepwell.backends.spool) in ``directory``, else in $TMPDIR, for ``put``."""
        return open_upload_spool(directory, self.location)

    def put(self, name: str, data: Payload, *, overwrite: bool = False) -> None:
        check_name(name)
        what = self._what("writing", name)
        size = len(data)
        multipart = overwrite and size > self.multipart_threshold
        store, wait = self._put_store(self.allowance(MULTIPART_CHUNK if multipart else size),
                                      create=not overwrite)
        # a spool is read from its file by each attempt, mapped: no copy of it in the heap
        # (obstore reads a buffer in place; a single request needs the whole body at once)
        mapped = data.mapped() if isinstance(data, Spool) else contextlib.nullcontext(data)
        started = time.monotonic()
        try:
            with mapped as body:
                try:
                    self._put_body(store, name, body, overwrite, multipart)
                finally:
                    del body  # no traceback of an error may keep the map (and its file) alive
        except KeepwellError:
            raise  # the spool could not be read
        except Exception as exc:
            err = classify(exc, what, wait)
            if isinstance(err, StallError):
                with self._lock:  # perhaps only a slower link than measured: be more patient
                    self._rate = (self._rate or 2 * UPLOAD_FLOOR) / 2
            raise err from None
        self._uploaded(size, time.monotonic() - started)

    @staticmethod
    def _put_body(store: Any, name: str, body: bytes | bytearray | memoryview, overwrite: bool,
                  multipart: bool) -> None:
        if not overwrite:
            # A conditional put is always one request: S3 cannot make a multipart upload
            # conditional through obstore, and one PUT holds up to 5 GiB.
            obstore.put(store, name, body, mode="create", use_multipart=False)
        elif multipart:
            obstore.put(store, name, body, use_multipart=True, chunk_size=MULTIPART_CHUNK)
        else:
            obstore.put(store, name, body, use_multipart=False)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_name(name)
        what = self._what("reading", name)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        if length == 0:
            self.stat(name)
            return b""
        try:
            if length is not None:
                return bytes(obstore.get_range(self.store, name, start=offset, length=length))
            if offset:
                result = obstore.get(self.store, name, options={"range": {"offset": offset}})
            else:
                result = obstore.get(self.store, name)
            return bytes(result.bytes())
        except Exception as exc:
            err = classify(exc, what, self.stall)
            if "status code: 416" in str(exc) and self.stat(name).size <= offset:
                return b""  # a range that starts at or past the end is empty, as for files
            raise err from None

    def stat(self, name: str) -> ObjectInfo:
        check_name(name)
        try:
            meta = obstore.head(self.store, name)
        except Exception as exc:
            raise classify(exc, self._what("stat of", name), self.stall) from None
        return ObjectInfo(name, int(meta["size"]))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # obstore lists whole path segments; list the enclosing "directory" and filter.
        directory = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        what = self._what("listing", prefix or "/")
        try:
            stream = obstore.list(self.store, prefix=directory or None, chunk_size=1000)
            chunks = iter(stream)
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    return
                for meta in chunk:
                    path = meta["path"]
                    if path.startswith(prefix):
                        yield ObjectInfo(path, int(meta["size"]))
        except BackendError:
            raise
        except Exception as exc:
            raise classify(exc, what, self.stall) from None

    def delete(self, name: str) -> None:
        # S3's DELETE succeeds on a missing key; the contract wants not-found reported.
        self.stat(name)
        try:
            obstore.delete(self.store, name)
        except Exception as exc:
            raise classify(exc, self._what("deleting", name), self.stall) from None

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"ObjectStoreBackend({self.location!r})"


# --- configuration -------------------------------------------------------------------------------


def _timedelta(value: object, default: float) -> timedelta:
    if value is None:
        return timedelta(seconds=default)
    if isinstance(value, timedelta):
        return value
    return timedelta(seconds=float(value))  # type: ignore[arg-type]


def client_options(endpoint: str | None, options: dict[str, Any], stall: float) -> dict[str, Any]:
    """HTTP client settings: timeouts that detect a stalled connection within ``stall`` seconds
    (a read silent that long; uploads: see `ObjectStoreBackend`), http only when asked."""
    return {
        "allow_http": bool(endpoint and endpoint.startswith("http://")),
        "connect_timeout": _timedelta(options.pop("connect_timeout", None), min(10.0, stall)),
        # A whole request may take long on a slow link; a silent connection may not.
        "timeout": _timedelta(options.pop("timeout", None), 600),
        "read_timeout": _timedelta(options.pop("read_timeout", None), stall),
    }


def retry_config(options: dict[str, Any], stall: float) -> dict[str, Any]:
    """obstore's own quick retries (5xx, resets); none after a request that stalled (its time
    is spent already: the retry wrapper decides)."""
    return {
        "max_retries": int(options.pop("max_retries", 3)),
        "retry_timeout": _timedelta(options.pop("retry_timeout", None), stall),
        "backoff": {
            "init_backoff": timedelta(milliseconds=100),
            "max_backoff": timedelta(seconds=5),
            "base": 2,
        },
    }


def _stall(options: dict[str, Any]) -> float:
    given = options.pop("stall_timeout", None)
    return float(given) if given is not None else stall_timeout()


def _aws_profile(profile: str) -> dict[str, str]:
    """Credentials, region and endpoint of a profile from the shared AWS files."""
    out: dict[str, str] = {}
    creds_file = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
    config_file = os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")
    creds = configparser.RawConfigParser()
    creds.read(os.path.expanduser(creds_file))
    if creds.has_section(profile):
        sec = creds[profile]
        for src, dst in (
            ("aws_access_key_id", "access_key_id"),
            ("aws_secret_access_key", "secret_access_key"),
            ("aws_session_token", "session_token"),
        ):
            if sec.get(src):
                out[dst] = sec[src]
    config = configparser.RawConfigParser()
    config.read(os.path.expanduser(config_file))
    section = profile if profile == "default" else f"profile {profile}"
    if config.has_section(section):
        sec = config[section]
        if sec.get("region"):
            out["region"] = sec["region"]
        if sec.get("endpoint_url"):
            out["endpoint"] = sec["endpoint_url"]
    if not out:
        raise ConfigurationError(
            f"AWS profile {profile!r} not found in {creds_file} or {config_file}"
        )
    return out


def _credentials_given(settings: dict[str, str], opts: dict[str, Any]) -> bool:
    """Whether anything but an instance metadata service can give credentials (or none are
    needed: an anonymous bucket)."""
    env = os.environ
    return bool(settings.get("access_key_id") or env.get("AWS_ACCESS_KEY_ID")
                or env.get("AWS_WEB_IDENTITY_TOKEN_FILE")
                or env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
                or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
                or opts.get("skip_signature") or env.get("AWS_SKIP_SIGNATURE"))


def _split(url: str, scheme: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme.lower() != scheme or not parts.netloc:
        raise ConfigurationError(f"expected {scheme}://bucket[/prefix], got {url!r}")
    return parts.netloc, parts.path.strip("/")


def from_url(url: str, **options: Any) -> ObjectStoreBackend:
    """``s3://bucket[/prefix]``: see the module docstring for where settings come from."""
    from obstore.store import S3Store

    bucket, prefix = _split(url, "s3")
    env = os.environ
    opts = dict(options)
    multipart_threshold = int(opts.pop("multipart_threshold", MULTIPART_THRESHOLD))
    profile = opts.pop("profile", None) or env.get("AWS_PROFILE")
    have_env_keys = bool(env.get("AWS_ACCESS_KEY_ID"))
    settings: dict[str, str] = {}
    if profile and not (have_env_keys or opts.get("access_key_id")):
        settings.update(_aws_profile(profile))
    endpoint = (
        opts.pop("endpoint", None)
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
        or env.get("AWS_ENDPOINT")
        or settings.pop("endpoint", None)
    )
    region = (
        opts.pop("region", None)
        or env.get("AWS_REGION")
        or env.get("AWS_DEFAULT_REGION")
        or settings.pop("region", None)
        or "us-east-1"
    )
    stall = _stall(opts)
    client = client_options(endpoint, opts, stall)
    retry = retry_config(opts, stall)
    for key in ("access_key_id", "secret_access_key", "session_token"):
        if opts.get(key):
            settings[key] = opts.pop(key)
    if endpoint and not _credentials_given(settings, opts):
        # an S3-compatible server (not AWS): no instance metadata service can give credentials
        location = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        raise ConfigurationError(f"no S3 credentials for {location}", hint=NO_CREDENTIALS_HINT)
    config: dict[str, Any] = {**settings, "region": region}
    if endpoint:
        config["endpoint"] = endpoint.rstrip("/")
        # S3-compatible servers (SeaweedFS, MinIO, Ceph) want path-style requests.
        config.setdefault("virtual_hosted_style_request", False)
    config.update(opts)  # anything else is an obstore S3 setting, e.g. server_side_encryption

    def build(client: dict[str, Any], retry: dict[str, Any]) -> Any:
        return S3Store(bucket, prefix=prefix or None, config=config,  # type: ignore[arg-type]
                       client_options=client, retry_config=retry)  # type: ignore[arg-type]

    location = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    return _backend(build, url, location, client=client, retry=retry, stall=stall,
                    multipart_threshold=multipart_threshold,
                    endpoint=config.get("endpoint") or f"https://s3.{region}.amazonaws.com")


def _backend(build: StoreBuilder, url: str, location: str, **kw: Any) -> ObjectStoreBackend:
    try:
        return ObjectStoreBackend(build, location, **kw)
    except Exception as exc:
        raise ConfigurationError(f"cannot configure {url}: {_short(exc)}") from None


def _generic_from_url(url: str, options: dict[str, Any]) -> ObjectStoreBackend:
    from obstore.store import from_url as store_from_url

    opts = dict(options)
    stall = _stall(opts)
    client = client_options(None, opts, stall)
    retry = retry_config(opts, stall)

    def build(client: dict[str, Any], retry: dict[str, Any]) -> Any:
        return store_from_url(url, client_options=client, retry_config=retry,  # type: ignore[call-overload]
                              **opts)

    return _backend(build, url, url.rstrip("/"), client=client, retry=retry, stall=stall)


def gcs_from_url(url: str, **options: Any) -> ObjectStoreBackend:
    """``gs://bucket[/prefix]``; credentials as obstore reads them (GOOGLE_* variables)."""
    _split(url, "gs")
    return _generic_from_url(url, options)


def _azure_endpoint(options: dict[str, Any]) -> str | None:
    """The blob endpoint to use instead of ``https://{account}.blob.core.windows.net``, if any:
    the ``endpoint`` option, else ``AZURE_STORAGE_ENDPOINT`` or ``AZURE_ENDPOINT`` (the
    variables obstore itself reads)."""
    env = os.environ
    endpoint = (
        options.pop("endpoint", None)
        or env.get("AZURE_STORAGE_ENDPOINT")
        or env.get("AZURE_ENDPOINT")
    )
    return str(endpoint).rstrip("/") if endpoint else None


def azure_from_url(url: str, **options: Any) -> ObjectStoreBackend:
    """``az://container[/prefix]``; account and credentials from the AZURE_STORAGE_* variables.

    As for S3, plain HTTP is allowed exactly when the endpoint (the ``endpoint`` option or
    ``AZURE_STORAGE_ENDPOINT``) is ``http://``, e.g. ``http://127.0.0.1:10000/devstoreaccount1``
    for a local Azurite. With ``AZURE_STORAGE_USE_EMULATOR=true`` obstore itself talks to Azurite
    (at ``AZURITE_BLOB_STORAGE_URL``, default ``http://127.0.0.1:10000``) over HTTP with the
    emulator's development account unless another is given.
    """
    from obstore.store import AzureStore

    _split(url, "az")
    opts = dict(options)
    endpoint = _azure_endpoint(opts)
    if endpoint is None:
        return _generic_from_url(url, opts)
    stall = _stall(opts)
    client = client_options(endpoint, opts, stall)
    retry = retry_config(opts, stall)

    def build(client: dict[str, Any], retry: dict[str, Any]) -> Any:
        return AzureStore.from_url(url, endpoint=endpoint, client_options=client,  # type: ignore[arg-type]
                                   retry_config=retry, **opts)  # type: ignore[arg-type]

    return _backend(build, url, url.rstrip("/"), client=client, retry=retry, stall=stall,
                    endpoint=endpoint)
