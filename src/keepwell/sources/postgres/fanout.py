"""``archive_command`` into several repositories (``--repo`` given more than once).

Each repository gets the segment through its own push, with its own settings (its own
``--password-file`` when one is given per repository, in the same order) and, in asynchronous
mode, its own spool ``SPOOL/repo1``, ``SPOOL/repo2``, ... with its own uploader and bound.

When is a segment acknowledged (``archive_command`` exits 0)? When *every* repository has it
stored or durably spooled. So, asynchronously, a repository that is down does not hold the
others back: its segments wait in its spool (its uploader raises an alert, which ``postgres
check --spool SPOOL`` and the server log report) while the others go on, until its spool
reaches ``--spool-max``. Past that limit the push fails, for every repository, and PostgreSQL
keeps the WAL in pg_wal: nothing is ever dropped from one repository's archive to keep the
others going (pgBackRest's ``archive-push-queue-max`` drops it). Synchronously (no ``--async``)
a repository that fails fails the push at once; the others have the segment already, and
answer the retry at once.

Standard library only, like `hooks` (imported on every ``archive_command``).
"""

from __future__ import annotations

import os

from keepwell.errors import KeepwellError, UsageError
from keepwell.sources.postgres.hooks import HookSettings, push


def repo_spool(spool: str, index: int) -> str:
    """The spool of the `index`-th repository (from 1) of a fan-out."""
    return os.path.join(spool, f"repo{index}")


def settings_each(repos: list[str], password_files: list[str], base: HookSettings
                  ) -> list[HookSettings]:
    """One `HookSettings` per repository, in order."""
    if len(password_files) > 1 and len(password_files) != len(repos):
        raise UsageError(f"{len(repos)} repositories but {len(password_files)} password files",
                         hint="give one --password-file for all, or one per --repo, in order")
    out = []
    for i, repo in enumerate(repos, 1):
        pw = password_files[i - 1] if len(password_files) > 1 else (
            password_files[0] if password_files else base.password_file)
        out.append(HookSettings(repo, pw, base.cluster,
                                repo_spool(base.spool, i) if base.spool else None,
                                base.spool_max))
    return out


def push_to_all(path: str, each: list[HookSettings], *, asynchronous: bool) -> list[str]:
    """Archive `path` into every repository; what happened in each. The first failure is raised
    once all were tried, naming the repository."""
    outcomes: list[str] = []
    failed: list[tuple[str, KeepwellError]] = []
    for settings in each:
        try:
            outcomes.append(push(path, settings, asynchronous=asynchronous))
        except KeepwellError as exc:
            outcomes.append("failed")
            failed.append((str(settings.repo), exc))
    if failed:
        repo, first = failed[0]
        others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise KeepwellError(f"repository {repo}{others}: {first}", hint=first.hint)
    return outcomes


def spool_dirs(spool: str) -> list[tuple[str, str]]:
    """(label, directory) of the spools under `spool`: itself, or each repository's."""
    subs = sorted((d for d in os.listdir(spool) if d.startswith("repo") and d[4:].isdigit()),
                  key=lambda d: int(d[4:])) if os.path.isdir(spool) else []
    return [(d, os.path.join(spool, d)) for d in subs] or [("spool", spool)]
