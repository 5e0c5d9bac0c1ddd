"""No import circle in the package: no module imports one that (directly or through others)
imports it back. Read from the source with ``ast``, so that an import inside a function (run
later, lazily) counts as much as one at the top: a lazy import only hides a circle until the
function is first called. Imports under ``if TYPE_CHECKING:`` never run and are left out."""

from __future__ import annotations

import ast
import pathlib

import lcdd_kernels

ROOT = pathlib.Path(lcdd_kernels.__file__).resolve().parent
PACKAGE = "lcdd_kernels"

def _module_names() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((PACKAGE,) + parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}. ``from X import name`` is an edge to ``X.name``
    when that is a module, else to ``X`` (the package ``__init__`` that defines the name)."""
    modules = _module_names()
    graph = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]
        edges = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = here
                for _ in range(node.level - 1 if node.level else 0):
                    base = base.rpartition(".")[0]
                base = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_graph_sees_imports_of_every_form():
    graph = import_graph()
    # relative module import, relative name import (edge to the package), lazy import in a function
    assert "lcdd_kernels.ops.masked_delta" in graph["lcdd_kernels.ops"]
    assert "lcdd_kernels._backend" in graph["lcdd_kernels.ops.masked_delta"]
    assert "lcdd_kernels.ops.masked_delta_triton" in graph["lcdd_kernels.ops.masked_delta"]
    assert "lcdd_kernels.ops._blocks" in graph["lcdd_kernels.ops.masked_delta_triton"]


def test_circles_are_found():
    # a planted circle of three, next to a chain: only the circle is reported
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [("a", "b", "c")]


def test_no_module_imports_one_that_imports_it_back():
    found = circles(import_graph())
    assert not found, f"import circles: {found}"
