"""The command lines PostgreSQL runs for keepwell: ``archive_command`` and ``restore_command``.

PostgreSQL runs them through ``/bin/sh -c`` as the server's user, so they name programs by
absolute path: the ``keepwell-wal`` console script beside this interpreter (or ``python -m`` of
the hook module when it is missing) and the *push fast path* ``keepwell-wal-push``, a POSIX shell
script installed beside it (``script-files``) and shipped as package data too. The fast path
acknowledges a segment the background uploader has already archived without starting Python;
see ``keepwell-wal-push`` itself for the rule.
"""

from __future__ import annotations

import os
import shlex
import sys

FAST_PUSH = "keepwell-wal-push"
HOOK = "keepwell-wal"


def hook_command() -> list[str]:
    """How a server calls keepwell's WAL hooks: the lean script beside this interpreter."""
    script = os.path.join(os.path.dirname(sys.executable), HOOK)
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "keepwell.sources.postgres.walcommand"]


def push_command() -> list[str]:
    """The start of an archive_command line: the shell fast path when it can find the hook."""
    hook = hook_command()
    installed = os.path.join(os.path.dirname(sys.executable), FAST_PUSH)
    if len(hook) == 1 and os.access(installed, os.X_OK):
        return [installed]
    shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), FAST_PUSH)
    if len(hook) == 1 and os.path.isfile(shipped):
        # Installed before the script was: run the package's copy, naming the hook explicitly.
        return ["env", f"KEEPWELL_WAL_HOOK={hook[0]}", "/bin/sh", shipped]
    return [*hook, "push"]


def _quote(argv: list[str], placeholders: tuple[str, ...]) -> str:
    return " ".join(a if a in placeholders else shlex.quote(a) for a in argv)


def archive_command(*, asynchronous: bool, spool: str | None, spool_max: str | None = None,
                    cluster: str | None = None, repo: str | None = None,
                    password_file: str | None = None,
                    also: list[tuple[str, str | None]] | None = None) -> str:
    """The archive_command line for these settings (``%p`` left for PostgreSQL); `also`: more
    (repository, password file or None for the first one's) to archive into (`fanout`)."""
    argv = push_command()
    if asynchronous:
        argv.append("--async")
    if spool:
        argv += ["--spool", os.path.abspath(spool)]
    if spool_max:
        argv += ["--spool-max", spool_max]
    if cluster and cluster != "main":
        argv += ["--cluster", cluster]
    def location(r: str) -> str:
        return os.path.abspath(r) if "://" not in r else r

    if repo:
        argv += ["--repo", location(repo)]
    if password_file:
        argv += ["--password-file", os.path.abspath(password_file)]
    for extra, extra_pw in also or []:
        argv += ["--repo", location(extra)]
        if extra_pw:
            argv += ["--password-file", os.path.abspath(extra_pw)]
    return _quote([*argv, "%p"], ("%p",))


def restore_command(*, repo: str, password_file: str, cluster: str,
                    policy: list[str] | None = None) -> str:
    """The restore_command line that fetches archived WAL (``%f`` and ``%p`` left); `policy`
    are the options of the restore's fetch policy (`walguard.FetchPolicy.args`)."""
    argv = [*hook_command(), "fetch", "%f", "%p", "--repo", repo,
            "--password-file", password_file, "--cluster", cluster, *(policy or [])]
    return _quote(argv, ("%f", "%p"))


def conf_line(setting: str, value: str) -> str:
    """``setting = 'value'`` as postgresql.conf wants it (single quotes doubled)."""
    return f"{setting} = '{value.replace(chr(39), chr(39) * 2)}'"
