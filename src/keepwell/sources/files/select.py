"""Include/exclude patterns for file trees (glob, as users of restic and borg expect).

A pattern with a "/" is matched against the whole path; one without against each name, so
``*.log`` excludes log files at any depth and ``/srv/cache`` excludes that directory.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from keepwell.errors import UsageError


def read_pattern_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as exc:
        raise UsageError(f"cannot read exclude file {path}: {exc.strerror}") from None


class Matcher:
    def __init__(self, patterns: Iterable[str]) -> None:
        self.full = [p.rstrip("/") for p in patterns if "/" in p.rstrip("/")]
        self.names = [p for p in patterns if "/" not in p.rstrip("/")]

    def __bool__(self) -> bool:
        return bool(self.full or self.names)

    def matches(self, path: str, name: str) -> bool:
        """True if this path (absolute, "/"-separated) or its name matches a pattern."""
        return any(fnmatchcase(name, p) for p in self.names) or any(
            fnmatchcase(path, p) for p in self.full
        )

    def matches_within(self, path: str) -> bool:
        """True if the path or any of its parent directories matches."""
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            if self.matches("/" + "/".join(parts[:i]), parts[i - 1]):
                return True
        return False
