"""Fleet settings: the ``fleet:`` section, sites, the address override, schedules as Temporal
reads them, and the request a run carries."""

from __future__ import annotations

from pathlib import Path

import pytest

from keepwell.backends.resilience import CircuitBreaker
from keepwell.control.config import FleetConfig, parse_config
from keepwell.errors import ConfigurationError
from keepwell.fleet.schedules import temporal_cron, wanted
from keepwell.fleet.target import fleet_address, run_request, task_queue

BASE = """
repositories:
  main: {location: /tmp/r, password: env:PW}
sources:
  db: {kind: sqlite, path: /tmp/x.db, repository: main, site: east, schedule: "0 3 * * *",
       retries: {attempts: 5, base: 10s, cap: 5min}}
  docs: {kind: files, paths: [/tmp/d], repository: main}
drills:
  db-check: {source: db, after_backup: true}
  nightly: {source: docs, schedule: "@daily"}
"""


def test_sites_and_fleet_section_defaults() -> None:
    cfg = parse_config(BASE, Path("/tmp/k.yaml"))
    assert cfg.sources["db"].site == "east" and cfg.sources["docs"].site == "default"
    assert cfg.fleet == FleetConfig()
    assert task_queue("east") == "keepwell-east"


def test_a_bad_address_is_one_line_with_its_place() -> None:
    with pytest.raises(ConfigurationError) as err:
        parse_config(BASE + "fleet: {address: nowhere}\n", Path("/tmp/k.yaml"))
    assert "k.yaml:11: fleet.address: expected HOST:PORT" in str(err.value)


def test_the_environment_overrides_the_address(monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = FleetConfig(address="10.0.0.1:7233")
    monkeypatch.delenv("KEEPWELL_FLEET_ADDRESS", raising=False)
    assert fleet_address(fleet) == "10.0.0.1:7233"
    monkeypatch.setenv("KEEPWELL_FLEET_ADDRESS", "127.0.0.1:9999")
    assert fleet_address(fleet) == "127.0.0.1:9999"


def test_cron_fields_as_temporal_reads_them() -> None:
    assert temporal_cron("0 3 * * *") == "0 3 * * *"
    assert temporal_cron("*/5 * * * * *") == "*/5 * * * * * *"  # seconds first, then a year
    assert temporal_cron("@daily") == "0 0 * * *"


def test_a_run_carries_site_retries_and_the_drill_after_backup() -> None:
    cfg = parse_config(BASE, Path("/tmp/k.yaml"))
    req = run_request(cfg, "backup", "db", 12.5)
    assert (req.site, req.attempts, req.retry_base, req.retry_cap, req.drill) == (
        "east", 5, 10.0, 300.0, "db-check")
    assert run_request(cfg, "drill", "nightly", None).site == "default"
    assert run_request(cfg, "backup", "docs", None).drill is None
    assert sorted(wanted(cfg)) == ["keepwell-backup-db", "keepwell-drill-nightly"]
    with pytest.raises(ConfigurationError, match="no source or drill named 'nope'"):
        run_request(cfg, "backup", "nope", None)


def test_a_run_says_which_steps_follow_its_backup_and_its_breaker_policy() -> None:
    doc = BASE.replace("  main: {location: /tmp/r, password: env:PW}",
                       "  main: {location: /tmp/r, password: env:PW, replica: {location: /tmp/m}}"
                       ) + "circuit_breaker: {failure_threshold: 4, reset_after: 10min}\n"
    doc = doc.replace("retries: {attempts: 5", "retention: {keep_last: 3}, retries: {attempts: 5")
    cfg = parse_config(doc, Path("/tmp/k.yaml"))
    req = run_request(cfg, "backup", "db", None)
    assert (req.retention, req.replica, req.breaker_threshold, req.breaker_reset) == (
        True, True, 4, 600.0)
    plain = run_request(parse_config(BASE, Path("/tmp/k.yaml")), "backup", "docs", None)
    assert (plain.retention, plain.replica) == (False, False)


def test_a_breaker_kept_elsewhere_comes_back_as_it_was() -> None:
    now = [100.0]
    first = CircuitBreaker(2, 30.0, clock=lambda: now[0])
    first.record_failure()
    first.record_failure()
    assert first.state == "open"
    again = CircuitBreaker(2, 30.0, clock=lambda: now[0])
    again.restore(*first.saved())
    assert again.state == "open" and not again.allow()
    now[0] += 30.0
    assert again.allow() and again.saved() == (2, 100.0, True)  # the trial run
    assert not again.allow()
