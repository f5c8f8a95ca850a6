"""The import direction of ARCHITECTURE.md: cli → control → sources → repository → backends."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "keepwell"
ORDER = ["backends", "repository", "sources", "control", "fleet", "web", "cli"]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "keepwell":
        return None
    return ORDER.index(parts[1]) if parts[1] in ORDER else None


def test_imports_point_inward() -> None:
    bad = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        own = _layer(".".join(rel.parts))
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                target = _layer(name)
                if target is not None and target > own:
                    bad.append(f"{rel} imports {name}")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)
