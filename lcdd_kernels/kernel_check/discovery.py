"""Find every Triton kernel of a package from its sources, without importing them.

A function counts when one of its decorators names ``jit`` (``@triton.jit``, ``@jit``,
``@triton.jit(...)``); autotune/heuristics decorators wrap such a function, so they need no rule
of their own. Sources are scanned rather than imported modules inspected, so a kernel in a module
nothing imports yet is still found.
"""

from __future__ import annotations

import ast
import pathlib


def _names_jit(node: ast.expr) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    if isinstance(target, ast.Attribute):
        return target.attr == "jit"
    return isinstance(target, ast.Name) and target.id == "jit"


def jit_functions(root: pathlib.Path, package: str) -> dict[str, list[str]]:
    """{module name: [jit function names]} for every ``.py`` file under ``root`` (the package
    directory whose import name is ``package``)."""
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if "jit" not in text:
            continue
        tree = ast.parse(text, filename=str(path))
        names = [n.name for n in tree.body
                 if isinstance(n, ast.FunctionDef) and any(_names_jit(d) for d in n.decorator_list)]
        if names:
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = names
    return found


def called_names(src: str) -> set[str]:
    """Names called anywhere in a kernel's source: the jit helpers it inlines."""
    names = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return names
