"""Patterns that end at the path they match (``find``), case-insensitive patterns, and times."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from keepwell.errors import UsageError
from keepwell.sources.files.select import Matcher
from keepwell.units import parse_time


def test_a_find_pattern_matches_the_path_it_ends_at_only() -> None:
    m = Matcher(["*.txt", "/srv/data", "alice/*.pdf", "/home/**"], below=False)
    assert m.matches("/a/b/notes.txt") and not m.matches("/a/notes.txt/inner")
    assert m.matches("/srv/data") and not m.matches("/srv/data/file")
    assert m.matches("/x/alice/a.pdf") and not m.matches("/x/alice/sub/a.pdf")
    assert m.matches("/home") and m.matches("/home/bob/deep")
    assert Matcher(["/srv/data"]).matches("/srv/data/file")  # the backup grammar: below too


def test_ignore_case() -> None:
    assert Matcher(["*.TXT"], ignore_case=True).matches("/a/notes.txt")
    assert not Matcher(["*.TXT"]).matches("/a/notes.txt")
    assert Matcher(["/Home/Alice"], ignore_case=True).matches("/home/alice/x")


def test_times() -> None:
    assert parse_time("2026-11-24T17:05:00Z") == datetime(2026, 11, 24, 17, 5, tzinfo=UTC)
    assert parse_time("2026-11-24").tzinfo is not None  # the local zone
    before = datetime.now(UTC).timestamp() - 7 * 86400
    assert abs(parse_time("7d").timestamp() - before) < 60
    for bad, words in (("soon", "expected a time"), ("6m", "ambiguous"), ("30", "no unit")):
        with pytest.raises(UsageError, match=words):
            parse_time(bad, "--oldest")


def test_read_data_subset_groups_cover_every_pack_once() -> None:
    from keepwell.repository.check import DataSubset

    sizes = {f"data/{i:02x}/{i:02x}{'ab' * 31}": 1000 for i in range(256)}
    groups = [DataSubset.parse(f"{n}/5").choose(sizes) for n in range(1, 6)]
    assert sorted(p for g in groups for p in g) == sorted(sizes)
    assert all(groups) and groups[1] == DataSubset.parse("2/5").choose(sizes)
    assert len(DataSubset.parse("10%").choose(sizes)) == 25
    assert len(DataSubset.parse("10K").choose(sizes)) == 11  # until 10 KiB is reached
    assert DataSubset.parse("100%").choose(sizes) == sorted(sizes)
    for bad in ("150%", "0%", "0", "0/3", "4/3", "1/0", "a/b", "abc", "0K", "-1G"):
        with pytest.raises(UsageError, match="--read-data-subset"):
            DataSubset.parse(bad)
