"""Hot reload: what changed between the configuration in force and a newly read one.

`diff_configs(old, new)` compares two validated configurations and returns a `ConfigChange`:
the sources and drills added, removed and changed, and whether the budgets changed. The daemon
applies a change without stopping running jobs (`keepwell.control.daemon.Daemon.reload`): a
job already running keeps the settings it started with; what starts afterwards uses the new
ones.

Some settings are bound to what the daemon opened at start (the job history it locked, the
sockets it listens on, the log format): a change to one of them *refuses* the reload, with the
setting's name, and the configuration in force stays (`RESTART_ONLY`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keepwell.control.config import Config
from keepwell.errors import ConfigurationError

# settings the daemon binds at start: changing them needs a restart
RESTART_ONLY = ("history", "history_password", "log_json", "metrics.listen", "web.listen",
                "web.token", "web.viewer_token", "web.tls_cert", "web.tls_key", "tracing.otlp_endpoint",
                "tracing.service_name")


def _setting(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@dataclass
class ConfigChange:
    added: list[str] = field(default_factory=list)  # sources
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    drills_added: list[str] = field(default_factory=list)
    drills_removed: list[str] = field(default_factory=list)
    drills_changed: list[str] = field(default_factory=list)
    limits_changed: bool = False

    def summary(self) -> dict[str, Any]:
        """The change as log-event fields (empty lists left out)."""
        fields: dict[str, Any] = {k: ",".join(v) for k, v in vars(self).items()
                                  if isinstance(v, list) and v}
        if self.limits_changed:
            fields["limits_changed"] = True
        return fields


def _split(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(n for n in set(old) & set(new) if old[n] != new[n])
    return added, removed, changed


def diff_configs(old: Config, new: Config) -> ConfigChange:
    """The change from ``old`` to ``new``; `ConfigurationError` when ``new`` changes a setting
    that needs a restart."""
    for dotted in RESTART_ONLY:
        if _setting(old, dotted) != _setting(new, dotted):
            raise ConfigurationError(f"{dotted} cannot change while the daemon runs",
                                     hint=f"restart the daemon to change {dotted}")
    change = ConfigChange()
    # a source's repository settings are part of what its jobs run with
    sources_old = {n: (s, old.repositories[s.repository]) for n, s in old.sources.items()}
    sources_new = {n: (s, new.repositories[s.repository]) for n, s in new.sources.items()}
    change.added, change.removed, change.changed = _split(sources_old, sources_new)
    change.drills_added, change.drills_removed, change.drills_changed = _split(
        dict(old.drills), dict(new.drills))
    change.limits_changed = any(
        getattr(old, k) != getattr(new, k)
        for k in ("limits", "retries", "circuit_breaker", "alerts", "notifications", "timezone",
                  "scratch", "repositories"))
    return change
