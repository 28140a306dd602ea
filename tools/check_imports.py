"""Check that repfold's imports follow its layers and form no cycle, function-local imports included.

    python tools/check_imports.py        # prints the import graph's summary; exit 1 on a cycle or a layer breach

Every ``import`` / ``from ... import`` of a repfold module is an edge, wherever it stands (module level, inside a
function, inside a class); only those under ``if TYPE_CHECKING:`` are left out (they never run). The layers,
lowest first, and what each may import (besides itself):

    repfold.report                        nothing of repfold
    repfold.core                          repfold.report
    repfold.patterns (the rule library)   repfold.core.affine
    repfold.frontends                     core, report, patterns
    repfold.adapters                      frontends, core, report
    repfold.api                           adapters, frontends, core, report
    repfold.cli, repfold.__main__         api and everything below

Data flows frontend -> driver -> engine -> algebra, never back. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import networkx as nx  # (a dependency of repfold: its dataflow questions)

ROOT = Path(__file__).resolve().parent.parent

# layer -> the layers it may import (a module may always import its own layer's modules)
LAYERS = {
    "repfold.report": set(),
    "repfold.core": {"repfold.report"},
    "repfold.patterns": {"repfold.core.affine"},
    "repfold.frontends": {"repfold.core", "repfold.report", "repfold.patterns"},
    "repfold.adapters": {"repfold.frontends", "repfold.core", "repfold.report"},
    "repfold.api": {"repfold.adapters", "repfold.frontends", "repfold.core", "repfold.report"},
    "repfold.cli": {"repfold.api", "repfold.adapters", "repfold.frontends", "repfold.core", "repfold.report"},
    "repfold.__main__": {"repfold.cli"},
}


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (the rule library is ``repfold.patterns``)."""
    found = {}
    for base, name in ((ROOT / "repfold", "repfold"), (ROOT / "patterns", "repfold.patterns")):
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            dotted = ".".join((name, *parts))
            found[dotted.removesuffix(".__init__")] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """The repfold modules that module ``name`` imports, with the line of each import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []

    def resolve(target: str, names: list[str], line: int) -> None:
        for n in names:  # ``from pkg import submodule`` imports the submodule
            if f"{target}.{n}" in known:
                out.append((f"{target}.{n}", line))
                break
        else:
            if target in known:
                out.append((target, line))

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name in known:
                        out.append((alias.name, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package
                    for _ in range(child.level - 1):
                        base = base.rpartition(".")[0]
                    target = f"{base}.{child.module}" if child.module else base
                else:
                    target = child.module or ""
                if target == "repfold" or target.startswith("repfold."):
                    resolve(target, [a.name for a in child.names], child.lineno)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return [(m, line) for m, line in out if m != name]


def layer(name: str) -> str | None:
    return next((k for k in sorted(LAYERS, key=len, reverse=True) if name == k or name.startswith(k + ".")), None)


def allowed(src: str, dst: str) -> bool:
    a, b = layer(src), layer(dst)
    if b is None or dst == "repfold":  # the package itself (its lazy public names)
        return src in ("repfold", "repfold.__main__") or dst != "repfold"
    if a is None or a == b:
        return True
    return any(dst == k or dst.startswith(k + ".") for k in LAYERS[a])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, each a cycle or several (sorted)."""
    g = nx.DiGraph([(a, b) for a, bs in graph.items() for b in bs])
    return sorted(sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1)


def main() -> int:
    found = modules()
    known = set(found)
    graph: dict[str, set[str]] = {}
    breaches = []
    local = 0
    for name, path in found.items():
        edges = imports(name, path, known)
        graph[name] = {m for m, _ in edges}
        for m, line in edges:
            if not allowed(name, m):
                breaches.append(f"{path.relative_to(ROOT)}:{line}: {name} ({layer(name)}) imports {m} ({layer(m)})")
        tree = ast.parse(path.read_text())
        local += sum(isinstance(n, (ast.Import, ast.ImportFrom)) and n.col_offset > 0 for n in ast.walk(tree))
    found_cycles = cycles(graph)
    edges = sum(len(v) for v in graph.values())
    print(f"{len(found)} modules, {edges} imports between them ({local} indented imports, function-local "
          f"or conditional, counted too): {len(found_cycles)} import cycles, {len(breaches)} layer breaches")
    for c in found_cycles:
        print("cycle:", " <-> ".join(c))
    for b in breaches:
        print("layer breach:", b)
    return 1 if found_cycles or breaches else 0


if __name__ == "__main__":
    sys.exit(main())
