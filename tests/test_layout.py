"""The package's layout rules: imports point down only (no cycle between modules), and a private
name (leading underscore) stays inside its module."""

from __future__ import annotations

import ast
from pathlib import Path

import onnxlr

PACKAGE = Path(onnxlr.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> imported onnxlr modules, and every private name imported across modules."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                pairs = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                pairs = [(f"{node.module}.{a.name}", None) if f"{node.module}.{a.name}" in modules
                         else (node.module, a.name) for a in node.names]
            else:
                continue
            for target, symbol in pairs:
                if not target.startswith("onnxlr"):
                    continue
                while target not in modules:
                    target = target.rpartition(".")[0]
                if target != name:
                    edges[name].add(target)
                if symbol and symbol.startswith("_") and not symbol.startswith("__"):
                    private.append(f"{name} imports {target}.{symbol}")
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_import_graph_has_no_cycle():
    edges, _ = _imports(_modules())
    # a package's __init__ re-exports its modules: an edge from a module back up to its own
    # package's __init__ would be a cycle, and is caught here too
    assert _cycles(edges) == []


def test_no_private_name_is_imported_across_modules():
    assert _imports(_modules())[1] == []


def test_the_checker_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
