"""The one grammar of durations, sizes and percentages (`keepwell.units`), and that every door
reads it the same: the command line (forget, postgres/mysql forget, prune, check, the WAL
hooks) and the configuration file."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from keepwell.backends.local import LocalBackend
from keepwell.control.config import parse_config
from keepwell.errors import ConfigurationError, UsageError
from keepwell.repository import Repository
from keepwell.sources.postgres.hooks import HookSettings
from keepwell.sources.postgres.walcommand import main
from keepwell.units import (
    UnitError,
    parse_duration,
    parse_percent,
    parse_seconds,
    parse_size,
)

CLI = "import sys; from keepwell.cli.main import run; sys.argv[0] = 'keepwell'; run()"


@pytest.mark.parametrize("text,seconds", [
    ("90s", 90), ("30min", 1800), ("30m", 1800), ("30M", 1800), ("2h", 7200), ("7d", 604800),
    ("2w", 14 * 86400), ("6mo", 180 * 86400), ("1y", 365 * 86400), ("1y6mo", 545 * 86400),
    ("1h30min", 5400), ("1h 30m", 5400), ("1.5h", 5400), ("250ms", 0.25), ("0", 0),
    ("3600", 3600), (3600, 3600), (2.5, 2.5),
])
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_seconds(text) == seconds
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "soon", "1h30", "-5s", "1e5", "5%", "6 months", "1..5h",
                                  ".5h", -1, True, None, float("inf")])
def test_what_is_not_a_duration(text: object) -> None:
    with pytest.raises(UnitError) as caught:
        parse_seconds(text, "--grace")  # type: ignore[arg-type]
    assert str(caught.value).startswith("--grace: ")
    assert isinstance(caught.value, UsageError) and caught.value.exit_code == 2


def test_durations_that_choose_what_to_keep_refuse_m_and_bare_numbers() -> None:
    with pytest.raises(UnitError, match="'6m' is ambiguous: write 6mo for months or 6min for "
                                        "minutes"):
        parse_duration("6m", "--keep-within", retention=True)
    with pytest.raises(UnitError, match="write 1y6mo for months or 1y6min for minutes"):
        parse_duration("1y6m", "--keep-within", retention=True)
    for bare in ("30", 30):
        with pytest.raises(UnitError, match="30 has no unit"):
            parse_duration(bare, "--keep-within", retention=True)
    assert parse_duration("6mo", retention=True) == timedelta(days=180)
    assert parse_duration("36h", retention=True) == timedelta(hours=36)


@pytest.mark.parametrize("text,size", [
    ("512", 512), ("512b", 512), ("10K", 10240), ("10k", 10240), ("10KiB", 10240),
    ("10KB", 10240), ("2M", 2 << 20), ("2 MiB", 2 << 20), ("1G", 1 << 30), ("1.5GiB", 3 << 29),
    ("1T", 1 << 40), ("1P", 1 << 50), ("0", 0), (1234, 1234),
])
def test_sizes_are_binary(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["10 parsecs", "1 2", "-1", "b", "G", "2GG", "", "1e3"])
def test_what_is_not_a_size(text: str) -> None:
    with pytest.raises(UnitError, match="^--max-repack-size: expected a size such as 512, 64K"):
        parse_size(text, "--max-repack-size")
    with pytest.raises(UnitError, match="^--max-repack-size: a size cannot be negative"):
        parse_size(-5, "--max-repack-size")


def test_percentages() -> None:
    assert parse_percent("5%") == 5 and parse_percent("12.5 %") == 12.5
    assert parse_percent("100%") == 100 and parse_percent("0%") == 0
    assert parse_percent("10", sign_required=False) == 10
    for bad in ("5", "101%", "x%", "-1%"):
        with pytest.raises(UnitError, match="from 0% to 100%"):
            parse_percent(bad, "--max-unused")


def test_the_wal_hooks_read_sizes_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    assert HookSettings.resolve(spool_max="512MiB").spool_max == 512 << 20
    monkeypatch.setenv("KEEPWELL_PG_SPOOL_MAX", "2G")
    assert HookSettings.resolve().spool_max == 2 << 30
    monkeypatch.setenv("KEEPWELL_PG_SPOOL_MAX", "lots")
    with pytest.raises(UnitError, match="^KEEPWELL_PG_SPOOL_MAX: expected a size"):
        HookSettings.resolve()


def test_the_wal_uploader_reads_its_idle_time_as_a_duration(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spool = str(tmp_path / "spool")
    assert main(["upload", "--spool", spool, "--idle-exit", "a while"]) == 2
    assert capsys.readouterr().err == ("keepwell: --idle-exit: expected a duration such as 90s, "
                                       "30min, 2h, 7d, 2w, 6mo, 1y or 1y6mo, got 'a while'\n")
    assert not os.path.exists(spool)  # refused before anything was touched
    assert main(["push", "p", "--async", "--spool", spool, "--spool-max", "4 parsecs"]) == 2
    assert "--spool-max: expected a size" in capsys.readouterr().err


# -- the configuration file -----------------------------------------------------------------------
CONFIG = """\
repositories: {main: {location: repo, password: "env:PW"}}
limits: {upload: %s, job_timeout: %s}
sources:
  home:
    kind: files
    repository: main
    paths: [data]
    retention: {keep_within: %s}
"""


def test_the_configuration_reads_the_same_grammar(tmp_path: Path) -> None:
    cfg = parse_config(CONFIG % ("5MB", "90m", "6mo"), tmp_path / "keepwell.yaml")
    assert cfg.limits.upload == 5 << 20  # binary, as everywhere
    assert cfg.limits.job_timeout == 90 * 60  # m is minutes
    assert cfg.sources["home"].retention is not None
    assert cfg.sources["home"].retention.keep_within == "6mo"


@pytest.mark.parametrize("within,message", [
    ("6m", "keepwell.yaml:8: sources.home.retention.keep_within: '6m' is ambiguous: write 6mo "
           "for months or 6min for minutes"),
    ("604800", "keepwell.yaml:8: sources.home.retention.keep_within: 604800 has no unit"),
])
def test_the_configuration_refuses_an_ambiguous_retention(tmp_path: Path, within: str,
                                                           message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_config(CONFIG % ("1M", "1h", within), tmp_path / "keepwell.yaml")
    assert message in str(caught.value)


# -- the command line -----------------------------------------------------------------------------
def kw(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CLI, *args],
                          env={**os.environ, "KEEPWELL_TESTONLY_WEAK_KDF": "1",
                               "KEEPWELL_PASSWORD": "pw", **(env or {})},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def repo(tmp_path: Path) -> str:
    location = str(tmp_path / "repo")
    with Repository.init(LocalBackend(location), "pw") as r, r.new_snapshot("files", ["/d"]) as w:
        w.add_bytes("d/f", b"content")
        w.commit()
    return location


@pytest.mark.parametrize("command", [["forget"], ["postgres", "forget"], ["mysql", "forget"]])
def test_keep_within_6m_means_the_same_in_every_forget(repo: str, command: list[str]) -> None:
    proc = kw("-r", repo, *command, "--keep-within", "6m", "--dry-run")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "keepwell: --keep-within: '6m' is ambiguous: write 6mo for months or 6min for minutes"]
    proc = kw("-r", repo, *command, "--keep-within", "6mo", "--dry-run")
    assert proc.returncode == 0, proc.stderr


def test_prune_takes_minutes_as_m_and_sizes_as_everywhere(repo: str) -> None:
    proc = kw("-r", repo, "prune", "--grace", "5m", "--max-repack-size", "1GiB", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    proc = kw("-r", repo, "prune", "--grace", "soon")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("keepwell: --grace: expected a duration such as 90s, 30min, "
                                   "2h, 7d, 2w, 6mo, 1y or 1y6mo, got 'soon'")
    proc = kw("-r", repo, "check", "--read-data-subset", "150%")
    assert proc.returncode == 2 and "--read-data-subset" in proc.stderr
