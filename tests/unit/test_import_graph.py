"""The package's import graph, read from the source: no cycles, and a worker wing on the stdlib.

The graph is built from the AST of every ``handoff/*.py``: ``from . import x``, ``from ._x import
y``, ``import handoff._x`` and ``from handoff._x import y``, at module level, inside functions and
under ``if TYPE_CHECKING:``. Each edge remembers which of the three it is, because they differ:

- Module-level and in-function imports run. A cycle of them is a runtime cycle: whichever module
  is imported first sees the other half-initialised (or the cycle is only hidden by importing
  late). ``test_no_import_cycle_at_runtime`` follows these edges.
- TYPE_CHECKING imports never run, so they cannot make a runtime cycle; they still make the two
  modules one unit for a reader and for mypy, which is the coupling issue 9 asks to cut ("no
  import cycle anywhere in the package"). ``test_no_import_cycle_even_for_type_checkers``
  follows every edge.

The imports ``handoff/__init__.py`` makes through ``importlib`` (its ``_EXPORTS``) are not
statements; ``test_worker_wing_imports_only_the_stdlib`` checks their modules by name.
"""

from __future__ import annotations

import ast
import functools
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import handoff

PACKAGE = Path(handoff.__file__).parent
Kind = Literal["module level", "in a function", "TYPE_CHECKING"]

# What `import handoff` and a worker's calls load (ARCHITECTURE.md "Two wings"): stdlib only.
WORKER_WING = frozenset(
    {
        "handoff",
        "handoff._address",
        "handoff._errors",
        "handoff._fdname",
        "handoff._launchd",
        "handoff._listen_fds",
        "handoff._match",
        "handoff._passing",
        "handoff._platform",
        "handoff._sdnotify",
        "handoff._worker",
    }
)
# The exports that are not the worker wing's: async put/get, for trio programs.
TRIO_EXPORTS = frozenset({"._passing_trio"})


@dataclass(frozen=True)
class Import:
    target: str  # a module of the package, or the top-level name of another package
    kind: Kind
    line: int


def module_name(path: Path) -> str:
    return "handoff" if path.stem == "__init__" else f"handoff.{path.stem}"


def is_type_checking(test: ast.expr) -> bool:
    return ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def imports_of(path: Path) -> list[Import]:
    """Every import statement of one module, resolved to a package module or a top-level name."""
    found: list[Import] = []

    def resolve(module: str | None, level: int, names: list[str]) -> list[str]:
        if level == 0:
            if module is None:
                return []
            if module == "handoff" or module.startswith("handoff."):
                base = module
            else:
                return [module.split(".")[0]]
        else:
            base = "handoff" + (f".{module}" if module else "")
        if base != "handoff":
            return [base]
        # `from . import x`: the module handoff.x if there is one, else a name of the package.
        return [f"handoff.{n}" if (PACKAGE / f"{n}.py").exists() else "handoff" for n in names]

    def visit(node: ast.AST, kind: Kind) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, "TYPE_CHECKING")
                for stmt in child.orelse:
                    visit_stmt(stmt, kind)
                continue
            visit_stmt(child, kind)

    def visit_stmt(node: ast.AST, kind: Kind) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                for target in resolve(alias.name, 0, []):
                    found.append(Import(target, kind, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            for target in resolve(node.module, node.level, names):
                found.append(Import(target, kind, node.lineno))
        inner: Kind = (
            "in a function"
            if kind == "module level"
            and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            else kind
        )
        visit(node, inner)

    visit(ast.parse(path.read_text(), str(path)), "module level")
    return found


@functools.cache
def import_graph() -> dict[str, list[Import]]:
    """Each module of the package and its imports (of package modules and of anything else)."""
    return {module_name(path): imports_of(path) for path in sorted(PACKAGE.glob("*.py"))}


def cycles(graph: dict[str, list[Import]], kinds: set[Kind]) -> list[str]:
    """One cycle per strongly connected component of more than one module (or a self-import),
    written as ``a -(kind, line)-> b -> ... -> a``."""
    # Per pair of modules, the import that binds them most (module level, then in a function,
    # then TYPE_CHECKING): sorted weakest first, the dict keeps the strongest.
    strength = {"TYPE_CHECKING": 0, "in a function": 1, "module level": 2}
    edges = {
        name: {
            i.target: i
            for i in sorted(imports, key=lambda i: strength[i.kind])
            if i.kind in kinds and i.target in graph
        }
        for name, imports in graph.items()
    }
    # Tarjan's algorithm (recursive: the package has a few dozen modules).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges[node]:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    found = []
    for component in components:
        members = set(component)
        start = component[0]
        # A shortest way back to the start, inside the component.
        paths = {start: [start]}
        queue = [start]
        cycle: list[str] | None = None
        while queue and cycle is None:
            node = queue.pop(0)
            for target in sorted(edges[node]):
                if target == start:
                    cycle = [*paths[node], start]
                    break
                if target in members and target not in paths:
                    paths[target] = [*paths[node], target]
                    queue.append(target)
        assert cycle is not None
        steps = [
            f"{a} -({edges[a][b].kind}, line {edges[a][b].line})-> "
            for a, b in itertools.pairwise(cycle)
        ]
        found.append("".join(steps) + start)
    return found


def test_no_import_cycle_at_runtime() -> None:
    """Imports that run (module level and in functions) form no cycle."""
    found = cycles(import_graph(), {"module level", "in a function"})
    assert not found, "import cycles at runtime:\n" + "\n".join(found)


def test_no_import_cycle_even_for_type_checkers() -> None:
    """No cycle either when TYPE_CHECKING imports count: modules depend on each other one way."""
    found = cycles(import_graph(), {"module level", "in a function", "TYPE_CHECKING"})
    assert not found, "import cycles (counting TYPE_CHECKING imports):\n" + "\n".join(found)


def test_the_cycle_check_finds_a_cycle_through_a_function_and_type_checking() -> None:
    """The checker itself: a cycle of one in-function and one TYPE_CHECKING import is found."""
    graph = {
        "handoff.a": [Import("handoff.b", "in a function", 3), Import("os", "module level", 1)],
        "handoff.b": [Import("handoff.a", "TYPE_CHECKING", 7)],
        "handoff.c": [Import("handoff.a", "module level", 2)],
    }
    assert cycles(graph, {"module level", "in a function"}) == []
    assert cycles(graph, {"module level", "in a function", "TYPE_CHECKING"}) == [
        "handoff.a -(in a function, line 3)-> handoff.b -(TYPE_CHECKING, line 7)-> handoff.a"
    ]


def test_worker_wing_imports_only_the_stdlib() -> None:
    """The worker wing, and everything it imports when it runs, uses only the standard library.

    TYPE_CHECKING imports are left out (they never run): ``handoff/__init__.py`` names
    ``_passing_trio`` there so that type checkers know ``handoff.put``/``get``.
    """
    graph = import_graph()
    assert set(graph) >= WORKER_WING, "a module of WORKER_WING is gone: update the list"
    exported = {f"handoff{module}" for module in set(handoff._EXPORTS.values()) - TRIO_EXPORTS}
    assert exported <= WORKER_WING, "a public name lives outside the worker wing"
    problems = []
    for name in sorted(WORKER_WING):
        for imp in graph[name]:
            if imp.kind == "TYPE_CHECKING":
                continue
            if imp.target in graph:
                if imp.target not in WORKER_WING:
                    problems.append(f"{name}:{imp.line} imports {imp.target}, not of the wing")
            elif imp.target not in sys.stdlib_module_names:
                problems.append(f"{name}:{imp.line} imports {imp.target}, not of the stdlib")
    assert not problems, "\n".join(problems)
