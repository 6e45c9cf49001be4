"""The import graph of src/rlhf, read from the source (ast): every `import rlhf...` and `from rlhf... import ...`,
module-level or inside a function (a lazy import is still a dependency), but not under `if TYPE_CHECKING:`."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its __init__.py)."""
    modules = {}
    for path in sorted((SRC / "rlhf").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported_names(tree: ast.AST) -> list[str]:
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from rlhf import tracking` imports a module; `from rlhf.config import Params` a name from one
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
            names.append(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (and, for a submodule, the packages above it, which Python runs
    first)."""
    modules = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {
            imported for imported in _imported_names(ast.parse(path.read_text(), str(path))) if imported in modules
        }
        parents = {name.rsplit(".", depth)[0] for depth in range(1, name.count(".") + 1)}
        graph[name] = (targets | parents) & modules.keys() - {name}
    return graph


def closure(graph: dict[str, set[str]], start: str, stop: frozenset[str] = frozenset()) -> set[str]:
    """`start` and every module it reaches, not following edges into `stop`."""
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module in seen or module in stop:
            continue
        seen.add(module)
        todo.extend(graph[module])
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component larger than a module (Tarjan's algorithm), as a module path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            connect(module)
    return components
