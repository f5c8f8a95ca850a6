"""Include/exclude patterns for file trees, with the rules restic documents.

A pattern is matched against the absolute path of each file and directory ("/"-separated, the
path as backed up), on whole path components:

- ``foo`` matches a component named ``foo`` anywhere: ``/a/foo`` and ``/a/foo/b``, not
  ``/a/foobar``. A relative pattern of several components (``stdlib/email``) matches that run of
  components anywhere in the path (``/usr/lib/stdlib/email/x.py``).
- A leading ``/`` anchors the pattern at the root: ``/bin`` matches ``/bin/bash``, not
  ``/usr/bin``. A trailing ``/`` is ignored.
- ``*``, ``?`` and ``[...]`` match within one component (never across a ``/``); ``**`` as a
  whole component matches any number of components, none included (``foo/**/bar`` matches
  ``/foo/bar`` and ``/x/foo/a/b/bar``). ``\\`` escapes the next character.

A pattern that matches a directory matches everything below it, except in a `Matcher` made
with ``below=False`` (``find``), which matches only a path the pattern ends at: ``*.txt`` finds
the files named so, ``/home/alice`` that one directory. ``ignore_case=True`` (``--iexclude``,
``find --ignore-case``) compares letters without regard to case. A `Matcher` also records which
of its patterns matched something, so a restore can say which ``--include`` selected nothing.

`Selection` is what a file backup leaves out, restic's exclusion options in one object the walk
asks: by path (``--exclude``, ``--iexclude`` and their files), by tag file
(``--exclude-if-present NAME[:HEADER]``, ``--exclude-caches``: a directory holding the tag file,
starting with HEADER if one is given, keeps only the tag file itself), and by size
(``--exclude-larger-than``: regular files above it). It decides from what the walk already has
(the directory's listing, the entry's stat): the only extra reads are of a tag file that is
present and must start with a header.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from keepwell.errors import UsageError


def read_pattern_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as exc:
        raise UsageError(f"cannot read exclude file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"exclude file {path} is not UTF-8 text") from None


def _component(glob: str) -> str:
    """The regular expression of one path component's glob (never matching a "/")."""
    out = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        i += 1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i < n:
            out.append(re.escape(glob[i]))
            i += 1
        elif c == "[":
            j = i
            if j < n and glob[j] in "!^":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: a literal "["
                out.append(re.escape(c))
                continue
            body = glob[i:j]
            i = j + 1
            negate = body[:1] in ("!", "^")
            if negate:
                body = body[1:]
            body = body.replace("\\", "\\\\").replace("/", "")
            out.append(f"[^/{body}]" if negate else f"[{body}]")
        else:
            out.append(re.escape(c))
    return "".join(out)


def pattern_regex(pattern: str, *, below: bool = True) -> str:
    """The regular expression (for `re.search` on an absolute path) of one pattern; ``below``:
    it matches what is below a matching directory too."""
    anchored = pattern.startswith("/")
    parts = [p for p in pattern.strip("/").split("/") if p]
    seq = "".join("(?:/[^/]+)*" if p == "**" else "/" + _component(p) for p in parts)
    return ("^" if anchored else "") + seq + ("(?=/|$)" if below else "$")


class Matcher:
    def __init__(self, patterns: Iterable[str], *, ignore_case: bool = False,
                 below: bool = True) -> None:
        self.patterns = [p for p in patterns if p.strip()]
        flags = re.IGNORECASE if ignore_case else 0
        self._each = [re.compile(pattern_regex(p, below=below), flags) for p in self.patterns]
        self._any = re.compile("|".join(f"(?:{r.pattern})" for r in self._each),
                               flags) if self._each else None
        self._matched: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def matches(self, path: str, name: str | None = None) -> bool:
        """True if a pattern matches this absolute path (so also when one matches a directory
        above it). ``name`` (the last component) is accepted for callers that have it."""
        if self._any is None or self._any.search(path) is None:
            return False
        if len(self._matched) < len(self._each):
            for i, r in enumerate(self._each):
                if i not in self._matched and r.search(path):
                    self._matched.add(i)
        return True

    matches_within = matches  # a pattern matching a parent directory matches already

    def unmatched(self) -> list[str]:
        """The patterns that have matched nothing so far."""
        return [p for i, p in enumerate(self.patterns) if i not in self._matched]


@dataclass(frozen=True)
class TagFile:
    """``--exclude-if-present NAME[:HEADER]``: a directory holding NAME (starting with HEADER,
    if given) is left out but for NAME itself."""

    name: str
    header: bytes = b""

    @classmethod
    def parse(cls, spec: str) -> TagFile:
        name, _, header = spec.partition(":")
        if not name or "/" in name or name in (".", ".."):
            raise UsageError(f"--exclude-if-present {spec!r}: expected a file name, optionally "
                             "followed by :HEADER (e.g. .nobackup or CACHEDIR.TAG:Signature: ...)")
        return cls(name, os.fsencode(header))

    def marks(self, directory: str) -> bool:
        """Whether this tag file, listed in ``directory``, marks it (its header matches)."""
        if not self.header:
            return True
        try:
            with open(os.path.join(directory, self.name), "rb") as f:
                return f.read(len(self.header)) == self.header
        except OSError:  # unreadable or not a file: it marks nothing, as in restic
            return False


# the Cache Directory Tagging Specification (https://bford.info/cachedir/)
CACHEDIR_TAG = TagFile("CACHEDIR.TAG", b"Signature: 8a477f597d28d172789f06886806bc55")


class Selection:
    """What a file backup leaves out (see the module doc)."""

    def __init__(self, excludes: Iterable[str] = (), *, iexcludes: Iterable[str] = (),
                 tag_files: Iterable[TagFile] = (), larger_than: int | None = None) -> None:
        self.excludes = Matcher(excludes)
        self.iexcludes = Matcher(iexcludes, ignore_case=True)
        self.by_path = bool(self.excludes or self.iexcludes)
        self.tag_files = tuple(dict.fromkeys(tag_files))
        self.larger_than = larger_than

    def __bool__(self) -> bool:
        return self.by_path or bool(self.tag_files) or self.larger_than is not None

    def skips_path(self, path: str) -> bool:
        """Whether a path pattern leaves out this absolute path."""
        return self.by_path and (self.excludes.matches(path) or self.iexcludes.matches(path))

    def skips_size(self, st: os.stat_result) -> bool:
        """Whether ``--exclude-larger-than`` leaves out the entry of this stat."""
        return (self.larger_than is not None and st.st_size > self.larger_than
                and stat.S_ISREG(st.st_mode))

    def kept_names(self, directory: str, names: Iterable[str]) -> set[str] | None:
        """The names a directory keeps given its tag files (``names``: its listing), or None
        when no tag file marks it: then it keeps all of them. Each tag file that marks it
        leaves out everything but itself, so two different ones leave nothing."""
        if not self.tag_files:
            return None
        present = set(names)
        marking = {t.name for t in self.tag_files if t.name in present and t.marks(directory)}
        if not marking:
            return None
        return marking if len(marking) == 1 else set()
