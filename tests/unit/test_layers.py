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


# What the control plane may use of the sources layer: the interface and kind-agnostic helpers.
CONTROL_MAY_IMPORT = {"keepwell.sources.base", "keepwell.sources.tools"}
SOURCE_KINDS = {"files", "sqlite", "postgres", "mysql"}


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names
                      if node.module == "keepwell.sources"]
    return names


def test_the_control_plane_knows_sources_only_through_their_interface() -> None:
    bad = []
    for path in sorted((SRC / "control").rglob("*.py")):
        for name in _imports(path):
            if name.startswith("keepwell.sources") and name != "keepwell.sources" and not any(
                    name == allowed or name.startswith(allowed + ".")
                    for allowed in CONTROL_MAY_IMPORT):
                bad.append(f"{path.relative_to(SRC)} imports {name}")
    assert not bad, ("the control plane must reach sources through keepwell.sources.base:\n"
                     + "\n".join(bad))


def _names_a_kind(node: ast.expr) -> bool:
    values = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else [node]
    return any(isinstance(v, ast.Constant) and v.value in SOURCE_KINDS for v in values)


def test_the_control_plane_holds_no_branch_on_a_source_kind() -> None:
    bad = []
    for path in sorted((SRC / "control").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(_names_a_kind(s) for s in sides) and any(
                        "kind" in ast.unparse(s) for s in sides):
                    bad.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Dict) and any(
                    k is not None and _names_a_kind(k) for k in node.keys):
                bad.append(f"{path.relative_to(SRC)}:{node.lineno}: a table keyed by kind")
    assert not bad, "the control plane branches on a source kind:\n" + "\n".join(bad)
