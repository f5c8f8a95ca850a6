"""What the compatibility data (tests/data/compat-v1) records about a restored tree or database.

Shared by the script that writes the data with the released code (tests/data/make_compat_v1.py)
and the test that restores it with the current code (test_format_compat.py): both describe a
tree, or a database, the same way. Standard library only: the script runs it under the
released keepwell.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe_tree(root: str | Path) -> list[dict[str, Any]]:
    """Every entry under `root` (itself as "."), sorted by path bytes, as the manifest lists
    them: type, mode and mtime; size and sha256 of files; the target of symlinks; for names of
    one inode, the first such path as ``hardlink_group``. Described once on the tree backed up,
    once on the tree restored."""
    base = os.fsencode(root)
    found: list[tuple[bytes, os.stat_result]] = [(b"", os.lstat(base))]
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            found.append((os.path.relpath(path, base), os.lstat(path)))
    found.sort()
    groups: dict[tuple[int, int], bytes] = {}
    entries: list[dict[str, Any]] = []
    for rel, st in found:
        path = os.path.join(base, rel) if rel else base
        entry: dict[str, Any] = {"path": os.fsdecode(rel) or ".", "path_hex": rel.hex(),
                                 "mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns}
        if stat.S_ISDIR(st.st_mode):
            entry["type"] = "dir"
        elif stat.S_ISLNK(st.st_mode):
            entry.update(type="symlink", target=os.fsdecode(os.readlink(path)))
            del entry["mode"]  # a symlink's mode means nothing on Linux
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                data = f.read()
            entry.update(type="file", size=len(data), sha256=sha256(data))
            if st.st_nlink > 1:
                first = groups.setdefault((st.st_dev, st.st_ino), rel)
                entry["hardlink_group"] = os.fsdecode(first)
        else:
            entry["type"] = "other"
        entries.append(entry)
    return entries


def sqlite_facts(path: Path) -> dict[str, Any]:
    """Row counts of the two tables of the data's database and a digest of every row, in key
    order (what a restore must give back)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("items", "tags")}
        digest = hashlib.sha256()
        for row in con.execute("SELECT id, name, qty FROM items ORDER BY id"):
            digest.update(repr(row).encode())
        for row in con.execute("SELECT item, tag FROM tags ORDER BY rowid"):
            digest.update(repr(row).encode())
        return {"rows": rows, "rows_sha256": digest.hexdigest()}
    finally:
        con.close()


def pg_counts(cluster: Any) -> dict[str, int]:
    """Rows of the PostgreSQL table ``events`` by phase (before the base backup, after it,
    after the restore point)."""
    rows = cluster.sql("SELECT phase, count(*) FROM events GROUP BY phase ORDER BY phase")
    return {str(phase): int(n) for phase, n in rows}


MARIADB_TABLES = ("shop.items", "shop.audit", "other.notes")


def mariadb_counts(server: Any) -> dict[str, int]:
    """Rows of each MariaDB table the data holds."""
    return {t: int(server.sql(f"SELECT COUNT(*) FROM {t}")[0][0]) for t in MARIADB_TABLES}
