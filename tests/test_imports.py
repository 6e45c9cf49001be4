"""The package's import graph has no cycle, lazy imports inside functions included."""

from __future__ import annotations

import ast

from code_graph import cycles, import_graph, module_files


def test_no_import_cycle_in_src_rlhf() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(cycle) for cycle in found)


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import() -> None:
    """The circle this test guards against went through an import inside a function."""
    graph = import_graph()
    graph["rlhf.storage"] = graph["rlhf.storage"] | {"rlhf.tracking"}  # as `checkpoints_root` once imported it
    assert any({"rlhf.storage", "rlhf.tracking"} <= set(cycle) for cycle in cycles(graph))


def test_the_list_of_steps_imports_nothing_from_the_project() -> None:
    """Everything reads the list of steps, rlhf.config included; a project import there would close a circle."""
    tree = ast.parse(module_files()["rlhf.steps"].read_text())
    imported = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not [node for node in imported if ast.unparse(node).split()[1].startswith("rlhf")]
