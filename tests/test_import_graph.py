"""No import circle anywhere in ``tad_torchtune``: module-level and lazy (function-level) imports alike.

A lazy import hides a circle from the interpreter but not from the reader: two modules that need each other
are one piece of code in two files. Edges are read with ``ast`` from every module of the package; an import of
a package (``tad_torchtune.models``) counts as an import of its ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tad_torchtune

ROOT = Path(tad_torchtune.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: {tad_torchtune modules it imports}}`` (resolving ``from pkg import name`` to a submodule)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for target in targets:
                if not target.startswith("tad_torchtune"):
                    continue
                # The longest known module that the dotted name starts with.
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of module names (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _without_reexports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    # A package's __init__ re-exports its own submodules (edges package -> its submodule): not a dependency of
    # the package's code, and every submodule import passes through it.
    return {m: {n for n in deps if not n.startswith(m + ".")} for m, deps in graph.items()}


def test_no_import_circle_in_the_package():
    graph = _without_reexports(import_graph())
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
