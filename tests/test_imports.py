"""The package's import graph has no cycles.

A cycle hidden behind a function-level import still ties the modules together: neither can be read, tested or moved
without the other, and the import works only as long as nobody moves it to the top. The scan reads every relative
(and absolute ``llmdrop.``) import of src/llmdrop, at module level and inside functions alike, without importing
anything. Imports under ``if TYPE_CHECKING:`` are left out: they never run, and annotations may name a type from
anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llmdrop"


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is named by its folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        out[name] = path
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` but those inside an ``if TYPE_CHECKING:`` block."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            yield from (n for child in node.orelse for n in _runtime_nodes_of(child))
            continue
        yield from _runtime_nodes_of(node)


def _runtime_nodes_of(node: ast.AST):
    yield node
    yield from _runtime_nodes(node)


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {module it imports: line of the first such import}; imports of the package itself are left out
    (``__init__`` re-exports lazily, by name)."""
    mods = _modules(root)
    top = root.name
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for m, path in mods.items():
        package = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                elif node.module and (node.module == top or node.module.startswith(top + ".")):
                    base = node.module
                else:
                    continue
                # `from . import x` and `from .export import gguf` name a module; `from .bench import compare` a name.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith(top + ".")]
            for t in targets:
                if t in mods and t not in (m, top):
                    graph[m].setdefault(t, node.lineno)
    return graph


def _components(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """Strongly connected sets of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every elementary cycle, each once, as [a, b, ..., a] starting from its smallest module name."""
    cycles: set[tuple[str, ...]] = set()
    for component in _components(graph):
        for start in sorted(component):
            # Cycles through `start` that use only modules after it: each cycle is found from its smallest module.
            allowed = {m for m in component if m >= start}

            def follow(v: str, path: list[str], allowed: set[str] = allowed, start: str = start) -> None:
                for w in sorted(graph[v]):
                    if w == start:
                        cycles.add((*path, start))
                    elif w in allowed and w not in path:
                        follow(w, [*path, w])

            follow(start, [start])
    return sorted(list(c) for c in cycles)


def describe(cycle: list[str], graph: dict[str, dict[str, int]], root: Path = PACKAGE) -> str:
    """One cycle as the imports that close it: ``llmdrop/a.py:12 imports llmdrop.b -> llmdrop/b.py:40 imports ...``."""
    files = _modules(root)
    return " -> ".join(f"{files[a].relative_to(root.parent).as_posix()}:{graph[a][b]} imports {b}"
                       for a, b in zip(cycle, cycle[1:]))


def test_the_scan_finds_a_cycle_and_its_lines(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    from .c import g\n")
    (pkg / "c.py").write_text("import os\nfrom pkg.a import x\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b": 1} and graph["pkg.b"] == {"pkg.a": 2, "pkg.c": 3}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert describe(["pkg.a", "pkg.b", "pkg.a"], graph, pkg) == "pkg/a.py:1 imports pkg.b -> pkg/b.py:2 imports pkg.a"


def test_no_import_cycles():
    graph = import_graph()
    cycles = import_cycles(graph)
    if cycles:
        pytest.fail(f"{len(cycles)} import cycle(s) in src/llmdrop; move what both sides need below them both:\n"
                    + "\n".join(describe(c, graph) for c in cycles), pytrace=False)


def test_type_only_imports_are_no_edges(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\nelse:\n"
                              "    from .c import y\n")
    (pkg / "c.py").write_text("")
    assert import_graph(pkg)["pkg.b"] == {"pkg.c": 5} and import_cycles(import_graph(pkg)) == []
