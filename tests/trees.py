"""Helpers shared by tests that compare file trees."""

from __future__ import annotations

import os
import random
from pathlib import Path


def make_tree(root: Path, *, notes: int, parts: int, repeat: int, random_mib: int, seed: int) -> None:
    """Text notes of growing sizes in a few directories, one incompressible file, an empty file
    and a symlink."""
    for i in range(notes):
        p = root / f"docs/part-{i % parts}/note-{i:03d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"note {i}\n".encode() * (i * repeat + 1))
    (root / "media").mkdir()
    (root / "media/random.bin").write_bytes(random.Random(seed).randbytes(random_mib * 1024 * 1024))
    (root / "empty").write_bytes(b"")
    (root / "link").symlink_to("docs/part-0/note-000.txt")


def tree_contents(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = p.read_bytes()
            else:
                out[rel] = "dir"
    return out
