"""Repository checks as jobs: ``keepwell check-repository`` runs one through `run_job`, so the
check is recorded in the job history (action ``check``, its ``source`` the repository's name)
like a backup or a drill, and the web app shows each repository's last check.

A check that finds errors is ``failed`` with the count of errors and the first one; its
``details`` hold ``errors``, ``warnings``, ``read_data`` (whether data packs were read, and
which subset: ``all``, ``n/m``, ``x%`` or a size), ``packs_read`` and ``blobs_checked``.
"""

from __future__ import annotations

from keepwell.control.jobs import JobContext, JobOutcome, JobSpec, open_job_repository
from keepwell.repository.check import DataSubset, check


def run_check(spec: JobSpec, ctx: JobContext) -> JobOutcome:
    subset_text = spec.params.get("read_data_subset")
    subset = DataSubset() if not subset_text else (
        DataSubset(fraction=1.0) if subset_text == "all" else DataSubset.parse(subset_text))
    repo = open_job_repository(spec, ctx)
    try:
        report = check(repo, subset=subset)
    finally:
        repo.close()
    details = {"errors": len(report.errors), "warnings": len(report.warnings),
               "read_data": subset_text or None, "packs_read": report.packs_read,
               "blobs_checked": report.blobs_checked}
    if report.ok:
        return JobOutcome("succeeded", details=details)
    return JobOutcome("failed", error=f"{len(report.errors)} errors found; first: "
                                      f"{report.errors[0]}", error_type="CheckFailed",
                      details=details)
