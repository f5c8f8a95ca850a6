"""Durations, sizes and percentages as people write them: the one grammar keepwell reads.

Every option, configuration key and environment variable that takes a duration, a size or a
percentage is read here, so ``30m`` or ``2G`` means the same wherever it is written
(docs/operations.md, "Durations and sizes", is the user's copy of this grammar).

Durations: a number and a unit, several combined (largest first or not, ``1h30min`` = 5400 s);
the number may have a fraction (``1.5h``); case does not matter.

    ms   milliseconds          h    hours              mo   months (30 days each)
    s    seconds               d    days               y    years (365 days each)
    min  minutes (also ``m``)  w    weeks (7 days)

A bare number is seconds (``0``, ``3600``; a number in the configuration file too). ``m`` is
minutes everywhere. Where a duration chooses what to keep (``--keep-within``, ``keep_within``
and the ``--keep-within-*`` options) two forms are refused instead: ``m``, which restic reads as
months there, so ``6m`` would silently keep six minutes of a history meant to last six months
(write ``6mo`` or ``6min``), and a bare number, which would be seconds (write ``30d``).
Months and years have fixed lengths so that a duration is one plain length of time.

Sizes: a number and an optional binary unit: ``512`` (bytes), ``64K``, ``500M``, ``2G``, ``1T``,
``1P``, where K = 1024 bytes. ``KiB``/``MiB``/... and ``KB``/``MB``/... and a trailing ``B``
are accepted and mean the same (binary, as PostgreSQL reads ``kB`` and ``MB``); ``1.5G`` is
allowed and rounded down to whole bytes.

Percentages: a number from 0 to 100 followed by ``%`` (``5%``, ``12.5%``).

Times (a moment, such as ``find --newest``): ISO 8601, a date or a date and time
(``2026-11-24``, ``2026-11-24 17:05``, ``2026-11-24T17:05:00Z``), in the local zone (``TZ``)
unless it names one; or a duration before now, with a unit (``36h``, ``7d``), read as where a
duration chooses what to keep (no ``m``, no bare number).

A value that does not parse raises `UnitError`: a `UsageError` (exit 2) whose one line names the
option and the accepted forms, and a ``ValueError`` too, so the configuration's validators
report it at its file, line and key.
"""

from __future__ import annotations

from keepwell.errors import UsageError

TYPE_CHECKING = False  # this module is read by every archive_command: no typing, re, datetime
if TYPE_CHECKING:
    from datetime import datetime, timedelta

DURATION_EXAMPLES = "90s, 30min, 2h, 7d, 2w, 6mo, 1y or 1y6mo"
RETENTION_EXAMPLES = "36h, 7d, 2w, 6mo, 1y or 1y6mo"
SIZE_EXAMPLES = "512, 64K, 500M, 2G or 1TiB"

_DAY = 86400.0
_DURATION_UNITS = {
    "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": _DAY, "w": 7 * _DAY,
    "mo": 30 * _DAY, "y": 365 * _DAY,
}
_SIZE_UNITS = {"": 0, "b": 0} | {
    prefix + suffix: exponent
    for exponent, prefix in enumerate("kmgtp", start=1) for suffix in ("", "b", "ib")
}
_HUGE = 1e15  # larger numbers are mistakes (and would overflow a timedelta)
_DIGITS = frozenset("0123456789")
_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyz%")


class UnitError(UsageError, ValueError):
    """A duration, size or percentage that does not follow the grammar (exit 2)."""

    hint = ""


def _prefix(what: str) -> str:
    return f"{what}: " if what else ""


def _number(text: str) -> float | None:
    """A plain decimal number (digits, at most one point between digits), else None."""
    whole, point, fraction = text.partition(".")
    if not whole or not set(whole) <= _DIGITS or (point and not (
            fraction and set(fraction) <= _DIGITS)):
        return None
    return float(text)


def _terms(text: str) -> list[tuple[float, str]] | None:
    """``"1h 30min"`` -> [(1.0, "h"), (30.0, "min")]: numbers each followed by a unit (or by
    nothing), spaces allowed around them; None if the text is not of that shape."""
    terms: list[tuple[float, str]] = []
    s, i = text.lower(), 0
    while True:
        while i < len(s) and s[i].isspace():
            i += 1
        if i == len(s):
            return terms or None
        j = i
        while j < len(s) and (s[j] in _DIGITS or s[j] == "."):
            j += 1
        number = _number(s[i:j])
        while j < len(s) and s[j].isspace():
            j += 1
        k = j
        while k < len(s) and s[k] in _LETTERS:
            k += 1
        if number is None:
            return None
        terms.append((number, s[j:k]))
        i = k


def parse_seconds(value: str | int | float, what: str = "", *, retention: bool = False) -> float:
    """``"1h30min"`` -> 5400.0. ``what`` names the option in the error (empty in the
    configuration, whose errors name the key). ``retention``: the duration chooses what to keep,
    so ``m`` and a bare number are refused (see the module's docstring)."""
    examples = RETENTION_EXAMPLES if retention else DURATION_EXAMPLES
    wrong = f"{_prefix(what)}expected a duration such as {examples}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UnitError(wrong)
    terms = _terms(value) if isinstance(value, str) else [(float(value), "")]
    if terms is None or any(unit not in _DURATION_UNITS and unit for _, unit in terms) or (
            len(terms) > 1 and any(not unit for _, unit in terms)):
        raise UnitError(wrong)
    if not all(0 <= n < _HUGE for n, _ in terms):
        raise UnitError(f"{_prefix(what)}a duration cannot be negative or endless (got "
                        f"{value!r})")
    if retention and not terms[0][1]:
        raise UnitError(f"{_prefix(what)}{terms[0][0]:g} has no unit: write one, as in "
                        f"{examples}")
    if retention and any(unit == "m" for _, unit in terms):
        def spelled(months_or_minutes: str) -> str:
            return "".join(f"{n:g}{months_or_minutes if u == 'm' else u}" for n, u in terms)

        raise UnitError(f"{_prefix(what)}{value!r} is ambiguous: write {spelled('mo')} for "
                        f"months or {spelled('min')} for minutes")
    return sum(n * _DURATION_UNITS.get(unit, 1.0) for n, unit in terms)


def parse_duration(value: str | int | float, what: str = "", *,
                   retention: bool = False) -> timedelta:
    """`parse_seconds` as a `timedelta`."""
    from datetime import timedelta  # not at the top: see TYPE_CHECKING above

    return timedelta(seconds=parse_seconds(value, what, retention=retention))


def parse_size(value: str | int | float, what: str = "") -> int:
    """``"2G"`` -> 2147483648; numbers are bytes."""
    wrong = f"{_prefix(what)}expected a size such as {SIZE_EXAMPLES}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UnitError(wrong)
    terms = _terms(value) if isinstance(value, str) else [(float(value), "")]
    if terms is None or len(terms) != 1 or terms[0][1] not in _SIZE_UNITS:
        raise UnitError(wrong)
    number, unit = terms[0]
    if not 0 <= number < _HUGE:
        raise UnitError(f"{_prefix(what)}a size cannot be negative or endless (got {value!r})")
    return int(number * 1024 ** _SIZE_UNITS[unit])


def parse_percent(value: str, what: str = "", *, sign_required: bool = True) -> float:
    """``"5%"`` -> 5.0, from 0 to 100. ``sign_required=False`` reads a bare number as a
    percentage too (for options that take nothing else)."""
    terms = _terms(value)
    if terms is None or len(terms) != 1 or terms[0][1] not in ("%", "" if not sign_required
                                                                else "%") or terms[0][0] > 100:
        raise UnitError(f"{_prefix(what)}expected a percentage from 0% to 100% such as 5% or "
                        f"12.5%, got {value!r}")
    return terms[0][0]


TIME_EXAMPLES = "2026-11-24, '2026-11-24 17:05', 2026-11-24T17:05:00Z or 7d (before now)"


def parse_time(value: str, what: str = "") -> datetime:
    """A moment, as the module's docstring says times are written; always with a zone."""
    from datetime import UTC, datetime  # not at the top: see TYPE_CHECKING above

    text = value.strip()
    try:
        moment = datetime.fromisoformat(text.replace(" UTC", "+00:00"))
    except ValueError:
        if _terms(text) is None:  # not a duration either
            raise UnitError(f"{_prefix(what)}expected a time such as {TIME_EXAMPLES}, got "
                            f"{value!r}") from None
        ago = parse_seconds(text, what, retention=True)  # its own error says what is wrong
        return datetime.fromtimestamp(datetime.now(UTC).timestamp() - ago, UTC)
    return moment if moment.tzinfo else moment.astimezone()


def human_bytes(n: float) -> str:
    """A byte count for people: ``512 B``, ``1.50 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
