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


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _import_graph() -> dict[str, set[str]]:
    """Every module's imports of other keepwell modules, wherever they stand: at the top, inside
    a function, under ``TYPE_CHECKING``, relative or absolute. A name taken from a package
    (``from keepwell.repository import Repository``) depends on the package's ``__init__``; the
    package a module merely lives in does not count (its facade imports its modules, not the
    reverse)."""
    paths = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base
                           for a in node.names]
            for target in targets:
                while target and target not in paths:
                    target = target.rpartition(".")[0]  # a name inside a module
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_cycle_finder_sees_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_through_others() -> None:
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles (break each by moving what both need into a lower module):\n" \
        + "\n".join(" <-> ".join(c) for c in cycles)
