"""Fleet settings: the ``fleet:`` section, sites, the address override, schedules as Temporal
reads them, and the request a run carries."""

from __future__ import annotations

from pathlib import Path

import pytest

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
