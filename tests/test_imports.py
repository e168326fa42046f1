"""The package's import structure: no module imports, even lazily or for type checking, one that imports it back."""

import ast
from pathlib import Path

from airlora import registry
from airlora.allocators import names
from airlora.config import ALLOCATORS

PACKAGE = Path(__file__).resolve().parents[1] / "airlora"


def import_graph() -> dict[str, set[str]]:
    """Module -> the airlora modules it names in any import statement (top level, in functions, TYPE_CHECKING)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in modules.items():
        named = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from airlora import registry` imports the submodule, not the package's own names
                named |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                named |= {alias.name for alias in node.names}
        graph[module] = {m for m in named if m in modules and m != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert {"airlora.config", "airlora.data", "airlora.textstats", "airlora.allocators"} <= set(graph)
    assert "airlora.textstats" in graph["airlora.data"] and "airlora.config" in graph["airlora.allocators.random"]
    assert {"airlora.runner", "airlora.config"} <= graph["airlora"]  # the API's lazy imports count too
    assert "airlora.registry" in graph["airlora.config"] and "airlora" not in graph["airlora.config"]
    assert cycles(graph) == []


def test_the_config_names_exactly_the_built_in_allocators():
    assert sorted(ALLOCATORS) == sorted(registry.BUILTIN) and set(ALLOCATORS) <= set(names())
