"""The control plane's configuration: ``keepwell.yaml`` as validated, typed models.

`load_config(path)` reads the YAML, validates it with pydantic, and reports the first problems as
one `ConfigurationError` that names the file, the line and the key (pydantic's error locations are
mapped back to YAML node marks through PyYAML's ``compose``). Relative paths in the file are
taken relative to the file's own directory.

Words: a *repository* is where snapshots go (with an optional *replica*); a *source* is one thing
that is backed up (files, sqlite, postgres, mysql) on a *schedule* into a repository, kept by its
*retention* policy (`keepwell.repository.retention`); a *drill* restores a source's newest
snapshot into scratch space and checks it. A source's *site* names the fleet workers that may run
its jobs (`keepwell.fleet`). Sizes and durations follow `keepwell.units` (``10M``,
``1GiB``; ``90s``, ``15min``, ``2h``; a retention's ``keep_within`` refuses ``m`` and bare
numbers). Secrets are references (``env:NAME``, ``file:PATH``), never inline.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from keepwell.control.schedule import Schedule
from keepwell.control.secrets import check_reference
from keepwell.errors import ConfigurationError, UsageError
from keepwell.repository.retention import Policy
from keepwell.units import parse_seconds, parse_size


def _retention_duration(value: Any) -> str:
    """A ``keep_within*`` duration, checked as retention reads it and kept as written."""
    parse_seconds(value, retention=True)
    return str(value).strip()


def default_history() -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "keepwell", "history.db")


def _secret(value: Any) -> str:
    return check_reference(str(value))


def _location(value: Any) -> str:
    """A repository's location: secrets are never written in the file, not even in a URL."""
    text = str(value)
    if "://" in text and ":" in text.split("://", 1)[1].split("/", 1)[0].rpartition("@")[0]:
        raise ValueError("do not write the password in the location: use an SSH key, or set "
                         "KEEPWELL_SFTP_PASSWORD in keepwell's environment")
    return text


Size = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[float, BeforeValidator(parse_seconds)]
RetentionDuration = Annotated[str, BeforeValidator(_retention_duration)]
SecretRef = Annotated[str, BeforeValidator(_secret)]
Location = Annotated[str, BeforeValidator(_location)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Replica(_Model):
    """A mirror of the repository's objects: it opens with the repository's own password."""

    location: Location


class RepositoryConfig(_Model):
    location: Location
    password: SecretRef
    replica: Replica | None = None
    max_concurrent_jobs: int | None = Field(default=None, ge=1)
    adaptive: bool | None = None  # uploads adapt to the link (None: KEEPWELL_ADAPTIVE, else on)


class Retention(_Model):
    keep_last: int | None = Field(default=None, ge=0)
    keep_hourly: int | None = Field(default=None, ge=0)
    keep_daily: int | None = Field(default=None, ge=0)
    keep_weekly: int | None = Field(default=None, ge=0)
    keep_monthly: int | None = Field(default=None, ge=0)
    keep_yearly: int | None = Field(default=None, ge=0)
    keep_within: RetentionDuration | None = None
    keep_within_hourly: RetentionDuration | None = None
    keep_within_daily: RetentionDuration | None = None
    keep_within_weekly: RetentionDuration | None = None
    keep_within_monthly: RetentionDuration | None = None
    keep_within_yearly: RetentionDuration | None = None
    keep_tag: list[str] | None = None

    @model_validator(mode="after")
    def _policy(self) -> Retention:
        try:  # the rules the daemon will apply, checked now, with the file's line
            Policy.from_options(**self.as_kwargs())
        except UsageError as exc:
            said = re.sub(r"--keep-([a-z-]+)", lambda m: "keep_" + m[1].replace("-", "_"),
                          str(exc))  # the configuration's names, not the options'
            raise ValueError(said) from None
        return self

    def as_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class RetryPolicy(_Model):
    attempts: int = Field(default=3, ge=1, le=100)
    base: Duration = 30.0
    cap: Duration = 1800.0


class BreakerPolicy(_Model):
    failure_threshold: int = Field(default=3, ge=1)
    reset_after: Duration = 900.0


class StreamConfig(_Model):
    """A long-running log streamer (WAL/binlog) that the daemon keeps alive."""

    command: list[str] = Field(min_length=1)
    restart_base: Duration = 1.0
    restart_cap: Duration = 300.0
    lag_alert: Duration | None = None


class IoLimits(_Model):
    """Block I/O limits per device: bytes (``20M``) and operations per second. ``devices``
    are paths whose disks are limited; by default the source's paths and a local repository."""

    read: Size | None = Field(default=None, gt=0)
    write: Size | None = Field(default=None, gt=0)
    read_iops: int | None = Field(default=None, gt=0)
    write_iops: int | None = Field(default=None, gt=0)
    devices: list[str] | None = None


class JobLimits(_Model):
    """Hard limits of a job and every process it starts (a cgroup; nice/ionice without one)."""

    cpu: float | None = Field(default=None, gt=0, le=1024)  # cores: 0.5 is half of one
    memory: Size | None = Field(default=None, ge=4 * 1024 * 1024)
    io: IoLimits | None = None
    nice: int | None = Field(default=None, ge=-20, le=19)
    ionice: Literal["realtime", "best-effort", "idle"] | None = None
    ionice_level: int | None = Field(default=None, ge=0, le=7)

    def over(self, base: JobLimits | None) -> JobLimits:
        """These limits, each unset one taken from ``base`` (a source's over its kind's)."""
        if base is None:
            return self
        mine = self.model_dump(exclude_none=True)
        merged = {**base.model_dump(exclude_none=True), **mine}
        if self.io is not None and base.io is not None:
            merged["io"] = {**base.io.model_dump(exclude_none=True),
                            **self.io.model_dump(exclude_none=True)}
        return JobLimits.model_validate(merged)


class _SourceBase(_Model):
    repository: Name
    schedule: str | None = None
    timezone: str | None = None
    priority: int = 0
    retention: Retention | None = None
    upload_limit: Size | None = None
    limits: JobLimits | None = None
    timeout: Duration | None = None
    retries: RetryPolicy | None = None
    expect_success_within: Duration | None = None
    tags: list[str] = Field(default_factory=list)
    enabled: bool = True
    site: Name = "default"  # fleet mode: only workers of this site run its jobs

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is not None:
            Schedule.parse(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str | None) -> str | None:
        if value is not None:
            Schedule.zone(value)
        return value


class FilesSource(_SourceBase):
    kind: Literal["files"]
    paths: list[str] = Field(min_length=1)
    excludes: list[str] = Field(default_factory=list)
    host: str | None = None
    # continuous: a supervised ``keepwell watch`` commits every change (docs/continuous.md),
    # beside whatever ``schedule`` also runs
    mode: Literal["scheduled", "continuous"] = "scheduled"
    max_delay: Duration = 1.0
    quiet_time: Duration = 0.2
    # how ``mode: continuous`` captures changes (keepwell watch --notify)
    notify: Literal["auto", "inotify", "fanotify"] = "auto"
    # ``mode: continuous``: alert when changes have waited longer than this for a snapshot
    # and the wait still grows, or when the watcher has been down that long
    lag_alert: Duration | None = None
    # scheduled backups read a filesystem snapshot (backup --fs-snapshot, docs/files.md)
    fs_snapshot: Literal["btrfs", "lvm", "auto"] | None = None


class SqliteSource(_SourceBase):
    kind: Literal["sqlite"]
    path: str


class DbConnection(_Model):
    host: str = "localhost"
    port: int | None = Field(default=None, ge=1, le=65535)
    socket: str | None = None
    user: str | None = None
    database: str | None = None
    password: SecretRef | None = None


class _DatabaseSource(_SourceBase):
    connection: DbConnection = Field(default_factory=DbConnection)
    mode: Literal["logical", "physical"] = "logical"
    stream: StreamConfig | None = None
    backup_command: list[str] | None = None
    drill_command: list[str] | None = None


class PostgresSource(_DatabaseSource):
    kind: Literal["postgres"]
    cluster: str = "main"  # the name its snapshots are filed under (keepwell postgres --cluster)


class MysqlSource(_DatabaseSource):
    kind: Literal["mysql"]
    server_name: str | None = None  # keepwell mysql --server-name (default: the host name)


SourceConfig = Annotated[
    FilesSource | SqliteSource | PostgresSource | MysqlSource, Field(discriminator="kind")
]


class Limits(_Model):
    upload: Size | None = None
    upload_burst: Size | None = None
    per_job_upload: Size | None = None
    max_concurrent_jobs: int = Field(default=2, ge=1)
    max_concurrent_per_repository: int | None = Field(default=None, ge=1)
    max_concurrent_per_host: int | None = Field(default=None, ge=1)
    job_timeout: Duration = 6 * 3600.0
    shutdown_grace: Duration = 60.0
    by_kind: dict[Literal["files", "sqlite", "postgres", "mysql", "drill"], JobLimits] = Field(
        default_factory=dict)  # hard limits of every job of a kind (a source's own win)
    cgroup_root: str = "/sys/fs/cgroup"


class Notification(_Model):
    webhook: str | None = None
    command: list[str] | None = None
    timeout: Duration = 10.0

    @model_validator(mode="after")
    def _one(self) -> Notification:
        if (self.webhook is None) == (self.command is None):
            raise ValueError("give exactly one of 'webhook' or 'command'")
        hook = self.webhook
        if hook is not None and not hook.startswith(("env:", "file:", "http://", "https://")):
            raise ValueError("webhook must be an http(s) URL, env:NAME or file:PATH")
        return self


class AlertPolicy(_Model):
    min_history: int = Field(default=5, ge=3)
    window: int = Field(default=30, ge=3)
    threshold: float = Field(default=5.0, gt=0)
    min_relative_change: float = Field(default=0.5, ge=0)
    min_bytes_change: Size = 1024 * 1024
    min_duration_change: Duration = 10.0
    stale_factor: float = Field(default=2.5, gt=1)


def _tables(value: Any) -> Any:
    """``tables`` is a list of names (each must exist) or a mapping name -> minimum rows."""
    if isinstance(value, list):
        return {str(v): 0 for v in value}
    return value


class DrillConfig(_Model):
    source: Name
    schedule: str | None = None
    timezone: str | None = None
    priority: int = -10
    max_rpo: Duration | None = None
    # Database drills: the OS user temporary servers run as (PostgreSQL refuses root; by
    # default 'postgres' when keepwell runs as root), the tables to count (default: all user
    # tables), pg_amcheck on or off, and how long the restored server may take to recover.
    run_as: str | None = None
    tables: Annotated[dict[str, Annotated[int, Field(ge=0)]], BeforeValidator(_tables)] = Field(
        default_factory=dict)
    amcheck: bool = True
    start_timeout: Duration = 600.0
    after_backup: bool = False  # fleet mode: run this drill after each backup of its source

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is not None:
            Schedule.parse(value)
        return value


class MetricsConfig(_Model):
    listen: str | None = "127.0.0.1:9377"

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[^:\s]*:\d{1,5}", value):
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9377")
        return value


def is_loopback(listen: str) -> bool:
    """Whether a ``HOST:PORT`` listen address is reachable from this host only."""
    host = listen.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


class WebConfig(_Model):
    """The dashboard and HTTP API (``keepwell web``; the daemon serves it when ``listen`` is
    set). A listen address beyond loopback needs a ``token`` (a secret reference): actions,
    pages and API then ask for it. Whoever holds ``token`` is an *operator* (sees and acts);
    whoever holds ``viewer_token`` is a *viewer* (sees every page and answer, may not act)."""

    listen: str | None = None
    token: SecretRef | None = None  # the operator's
    viewer_token: SecretRef | None = None  # read only
    tls_cert: str | None = None  # PEM files: serve HTTPS
    tls_key: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[^:\s]*:\d{1,5}", value):
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9378")
        return value

    @model_validator(mode="after")
    def _guarded(self) -> WebConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        if self.listen is not None and not is_loopback(self.listen) and self.token is None:
            raise ValueError(f"listening on {self.listen} (beyond loopback) needs a token:"
                             " token: env:NAME or file:PATH")
        if self.viewer_token is not None and self.token is None:
            raise ValueError("viewer_token needs token (the operator's): without it, anyone on"
                             " loopback may act")
        if self.viewer_token is not None and self.viewer_token == self.token:
            raise ValueError("viewer_token and token must be different secrets")
        return self

class FleetConfig(_Model):
    """Fleet mode: the Temporal cluster that schedules the jobs (``KEEPWELL_FLEET_ADDRESS``
    overrides the address)."""

    address: str = "127.0.0.1:7233"
    namespace: str = "default"
    tls: bool = False
    api_key: SecretRef | None = None
    # a step whose worker stops heartbeating for this long is retried on another worker
    heartbeat_timeout: Duration = 30.0

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not re.fullmatch(r"[^:\s]+:\d{1,5}", value):
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:7233")
        return value


class TracingConfig(_Model):
    """Traces of jobs over OTLP/HTTP (`keepwell.control.tracing`): ``otlp_endpoint`` is the
    collector's base URL (``http://127.0.0.1:4318``); unset, the standard
    ``OTEL_EXPORTER_OTLP_*`` variables may still turn tracing on."""

    otlp_endpoint: str | None = None
    service_name: str = "keepwell"

    @field_validator("otlp_endpoint")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"https?://[^/\s]+", value):
            raise ValueError("expected an http(s) URL, e.g. http://127.0.0.1:4318")
        return value


class Config(_Model):
    version: Literal[1] = 1
    timezone: str = "UTC"
    history: str = Field(default_factory=default_history)
    history_password: SecretRef | None = None
    scratch: str | None = None
    log_json: bool = False
    repositories: dict[Name, RepositoryConfig] = Field(min_length=1)
    sources: dict[Name, SourceConfig] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)
    retries: RetryPolicy = Field(default_factory=RetryPolicy)
    circuit_breaker: BreakerPolicy = Field(default_factory=BreakerPolicy)
    alerts: AlertPolicy = Field(default_factory=AlertPolicy)
    notifications: list[Notification] = Field(default_factory=list)
    drills: dict[Name, DrillConfig] = Field(default_factory=dict)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        Schedule.zone(value)
        return value

    @field_validator("history")
    @classmethod
    def _history(cls, value: str) -> str:
        if value.startswith(("env:", "file:")):
            return check_reference(value)
        if value.startswith(("postgresql://", "postgres://")):
            netloc = value.split("://", 1)[1].split("/", 1)[0]
            if ":" in netloc.rpartition("@")[0]:
                raise ValueError("do not write the password in the history URL: give it as"
                                 " history_password (env:NAME or file:PATH), or give the"
                                 " whole URL as a reference (history: env:NAME)")
            return value
        if "://" in value and not value.startswith("sqlite://"):
            raise ValueError("the job history is a SQLite file path or a postgresql:// URL")
        return value.removeprefix("sqlite://")

    @model_validator(mode="after")
    def _references(self) -> Config:
        for name, src in self.sources.items():
            if src.repository not in self.repositories:
                raise _RefError(("sources", name, "repository"), src.repository, "repository")
        for name, drill in self.drills.items():
            if drill.source not in self.sources:
                raise _RefError(("drills", name, "source"), drill.source, "source")
        return self

    def source_timezone(self, name: str) -> str:
        return self.sources[name].timezone or self.timezone


class _RefError(ValueError):
    def __init__(self, loc: tuple[str, ...], value: str, what: str) -> None:
        super().__init__(f"unknown {what} {value!r}")
        self.loc = loc


class LoadedConfig:
    """A validated config with the file it came from (paths already made absolute)."""

    def __init__(self, config: Config, path: Path) -> None:
        self.config = config
        self.path = path

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def _absolute(base: Path, value: str) -> str:
    if "://" in value:
        return value
    return str((base / os.path.expanduser(value)).resolve())


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    if "history" not in data:
        data["history"] = default_history()
    elif isinstance(data.get("history"), str) and not data["history"].startswith(
            ("env:", "file:")):
        data["history"] = _absolute(base, data["history"])
    if isinstance(data.get("scratch"), str):
        data["scratch"] = _absolute(base, data["scratch"])
    web = data.get("web")
    if isinstance(web, dict):
        for key in ("tls_cert", "tls_key"):
            if isinstance(web.get(key), str):
                web[key] = _absolute(base, web[key])
    for repo in (data.get("repositories") or {}).values():
        if isinstance(repo, dict):
            if isinstance(repo.get("location"), str):
                repo["location"] = _absolute(base, repo["location"])
            replica = repo.get("replica")
            if isinstance(replica, dict) and isinstance(replica.get("location"), str):
                replica["location"] = _absolute(base, replica["location"])
    for src in (data.get("sources") or {}).values():
        if not isinstance(src, dict):
            continue
        if isinstance(src.get("paths"), list):
            src["paths"] = [_absolute(base, p) if isinstance(p, str) else p for p in src["paths"]]
        if isinstance(src.get("path"), str):  # a database file
            src["path"] = _absolute(base, src["path"])


_KIND_TAGS = {"files", "sqlite", "postgres", "mysql"}


def _node_for(root: yaml.Node | None, loc: tuple[Any, ...]) -> tuple[yaml.Node | None, bool]:
    """Walk a composed YAML tree along a pydantic error location.

    Returns the node to point at (for a mapping entry, its key, which is where a reader looks)
    and whether the whole location was found.
    """
    node, mark = root, root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    node, mark = value, key
                    break
            else:
                if part in _KIND_TAGS:
                    continue  # the discriminator tag pydantic inserts for tagged unions
                return mark, False
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return mark, False
            node = mark = node.value[part]
        else:
            return mark, False
    return mark, True


def _describe(path: Path, root: yaml.Node | None, loc: tuple[Any, ...], msg: str) -> str:
    shown = [p for i, p in enumerate(loc)
             if not (p in _KIND_TAGS and i == 2 and loc[0] == "sources")]
    key = ".".join(str(p) for p in shown) or "(top level)"
    node, exact = _node_for(root, loc)
    line = f":{node.start_mark.line + 1}" if node is not None else ""
    if not exact and "Field required" in msg:
        msg = "missing required key"
    return f"{path}{line}: {key}: {msg}"


_STR_TAG = "tag:yaml.org,2002:str"
# the sections whose keys are names, and the key of their entries that names another's
_NAME_SECTIONS = {"repositories": None, "sources": "repository", "drills": "source"}


def _names_as_written(root: yaml.Node | None, data: dict[str, Any]) -> None:
    """Names are text: a repository, source or drill named ``off``, ``no`` or ``2024`` (which
    YAML reads as a boolean or a number), and the references to it, are taken as written."""
    if not isinstance(root, yaml.MappingNode):
        return
    for key, value in root.value:
        section = data.get(key.value) if isinstance(key, yaml.ScalarNode) else None
        if (key.value not in _NAME_SECTIONS or not isinstance(value, yaml.MappingNode)
                or not isinstance(section, dict)):
            continue
        written = {yaml.safe_load(k.value): k.value for k, _ in value.value
                   if isinstance(k, yaml.ScalarNode) and k.tag != _STR_TAG}
        data[key.value] = section = {name if isinstance(name, str) else written.get(name, name):
                                     entry for name, entry in section.items()}
        ref = _NAME_SECTIONS[key.value]
        for name_node, entry_node in value.value:
            entry = section.get(name_node.value) if isinstance(name_node, yaml.ScalarNode) \
                else None
            if ref is None or not isinstance(entry_node, yaml.MappingNode) \
                    or not isinstance(entry, dict):
                continue
            for k, v in entry_node.value:
                if k.value == ref and isinstance(v, yaml.ScalarNode) and v.tag != _STR_TAG:
                    entry[ref] = v.value


def _refuse_duplicates(node: yaml.Node | None, path: Path, loc: tuple[str, ...]) -> None:
    """A key given twice in one mapping: YAML would silently keep the second (a source or a
    setting copied and not renamed would replace the first)."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, path, (*loc, str(i)))
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, yaml.Node] = {}
    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode):
            first = seen.setdefault(key.value, key)
            if first is not key:
                raise ConfigurationError(
                    f"{path}:{key.start_mark.line + 1}: {'.'.join((*loc, key.value))}: given "
                    f"twice (first on line {first.start_mark.line + 1}): keep one, or rename "
                    "one of them")
        _refuse_duplicates(value, path, (*loc, str(key.value)))


def _clean(msg: str) -> str:
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def parse_config(text: str, path: Path) -> Config:
    """Validate YAML text; errors name ``path``, the line and the key."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigurationError(f"{path}{where}: not valid YAML: {problem}") from None
    _refuse_duplicates(root, path, ())
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path}:1: the configuration must be a mapping of sections")
    _names_as_written(root, data)
    _resolve_paths(data, path.parent)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors()[:5]:
            loc = tuple(err["loc"])
            ctx_err = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_err, _RefError):
                loc = ctx_err.loc
            lines.append(_describe(path, root, loc, _clean(err["msg"])))
        more = exc.error_count() - len(lines)
        if more > 0:
            lines.append(f"... and {more} more problem(s)")
        raise ConfigurationError("; ".join(lines)) from None


def load_config(path: str | os.PathLike[str]) -> LoadedConfig:
    p = Path(path).expanduser().resolve()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read configuration {p}: {exc.strerror}",
            hint="pass --config or set KEEPWELL_CONFIG",
        ) from None
    return LoadedConfig(parse_config(text, p), p)
