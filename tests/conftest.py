"""Suite-wide rules: a test that does not run is a failure.

The README's ``make test`` installs every server the suite needs, so a skip means something is
missing or broken, and a suite that skips can pass without testing anything. Every skip is
therefore reported as a failure, with its reason, unless ``KEEPWELL_ALLOW_SKIP=1`` is set (for a
developer's machine that lacks a server on purpose; CI never sets it).
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

ALLOW_SKIP = os.environ.get("KEEPWELL_ALLOW_SKIP") == "1"


def _refuse_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if ALLOW_SKIP or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"skipped, which counts as a failure: {reason} (install what is missing "
                       "with 'make test', or set KEEPWELL_ALLOW_SKIP=1 on purpose)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    _refuse_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, None, None]:
    outcome = yield
    _refuse_skip(outcome.get_result())


# the servers' fixtures, for every test that names them: S3 (SeaweedFS) and SFTP (OpenSSH) started
# once per session, and a PostgreSQL work directory with a repository
pytest_plugins = ["tests.integration.conftest_remote", "tests.servers.postgres"]
