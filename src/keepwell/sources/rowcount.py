"""The drill's row-count check, the same for every database kind.

A drill may name tables, each with a minimum number of rows (``tables`` in its settings). On a
restored copy, every named table must exist and hold at least its minimum; the rows of the named
tables are counted, or of every user table when the drill names none (or when the kind counts
them all anyway: SQLite). Each kind says what its tables are and how to count one
(`TableReader`), and how a name given in the drill is completed into a table's full name
(``TABLE`` → ``DB.SCHEMA.TABLE`` for PostgreSQL, ``DB.TABLE`` for MySQL).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from keepwell.errors import IntegrityError

SHOWN = 200  # row counts kept in a run's details


class TableReader(Protocol):
    def tables(self) -> list[str]:
        """The full names of the user tables, in a stable order."""

    def count(self, table: str) -> int:
        """The rows of one of them."""


def count_rows(db: TableReader, wanted: Mapping[str, int], *,
               full_name: Callable[[str], str] = str, every: bool = False) -> dict[str, int]:
    """Rows per table: of the ``wanted`` ones (each must exist and hold at least its minimum),
    or of every table when none is wanted or ``every`` is set."""
    present = db.tables()
    named = {full_name(name): minimum for name, minimum in wanted.items()}
    have = set(present)
    for table in named:
        if table not in have:
            raise IntegrityError(f"drill: table {table} is missing from the restore")
    counts = {t: db.count(t) for t in (present if every or not named else named)}
    for table, minimum in named.items():
        if counts[table] < minimum:
            raise IntegrityError(f"drill: table {table} holds {counts[table]} rows, fewer than "
                                 f"the {minimum} the drill expects")
    return counts


def figures(counts: Mapping[str, int]) -> dict[str, Any]:
    """The details a drill records of its row counts."""
    return {"tables": len(counts), "rows": sum(counts.values()),
            "row_counts": dict(list(counts.items())[:SHOWN])}
