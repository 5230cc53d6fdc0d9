"""The package's import graph: dependencies point one way.

Every module of ``swinv2`` is parsed (nothing is imported or run) and each ``import`` of a
``swinv2`` module becomes an edge, whether it sits at module level or inside a function: an
import moved into a function still makes the modules depend on each other, it only hides the
cycle until the function runs. The graph must have no cycle, no module may import a ``swinv2``
module inside a function (imports of optional third-party packages there are fine), and the
model core must not reach the training or task code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "swinv2"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
CORE = ("swinv2.layers", "swinv2.model", "swinv2.variants")
NOT_IN_CORE = ("swinv2.train", "swinv2.tasks")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute name ``from <...> import`` refers to, relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The package modules an import statement loads: a name imported from a package counts as
    its submodule when there is one, and ``from . import x`` names ``x`` only (the package that
    holds the importing module is already loaded)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        origin = _resolve(node, module, MODULES[module].name == "__init__.py")
        names = ([origin] if node.module else []) + [f"{origin}.{alias.name}" for alias in node.names]
    return [n for n in names if n in MODULES]


def _under_type_checking(stack: list[ast.AST]) -> bool:
    return any(isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test) for n in stack)


def _imports(module: str) -> list[tuple[str, bool, int]]:
    """(imported package module, inside a function, line) for each import in ``module``."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found = []

    def visit(node: ast.AST, stack: list[ast.AST]) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not _under_type_checking(stack):
            local = any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) for n in stack)
            found.extend((target, local, node.lineno) for target in _targets(node, module) if target != module)
        for child in ast.iter_child_nodes(node):
            visit(child, stack + [node])

    visit(tree, [])
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _edges() -> dict[str, set[str]]:
    return {m: {target for target, _, _ in imports} for m, imports in GRAPH.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return sorted(out)


def _reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in edges[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_graph_is_read():
    """The parser sees the package: a known edge is there, so an empty graph cannot pass."""
    assert "swinv2.model" in MODULES and "swinv2.layers" in _edges()["swinv2.model"]


def test_no_import_cycles():
    cycles = _cycles(_edges())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_function_local_import_of_the_package(module):
    local = [f"{MODULES[module].relative_to(ROOT.parent)}:{line} imports {target}"
             for target, inside, line in GRAPH[module] if inside]
    assert not local, "\n".join(local)


@pytest.mark.parametrize("module", CORE)
def test_the_model_core_does_not_reach_training_or_tasks(module):
    reached = sorted(m for m in _reachable(module, _edges()) if m.startswith(NOT_IN_CORE))
    assert not reached, f"{module} reaches {reached}"


def test_the_checks_catch_what_they_look_for():
    """A cycle and a reach into training, on a made-up graph."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _reachable("d", edges) == {"a", "b", "c"}
