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


# The floors of the package, bottom first: a module imports only from its own floor or below. Package markers
# (`__init__` files with nothing in them) stand on the ground floor.
FLOORS = (
    # pure functions and plain records: the list of steps, statistics, the console's lines, the report's HTML,
    # raw S3 access, PPO's tensor algebra
    {"rlhf.steps", "rlhf.measures", "rlhf.console", "rlhf.report", "rlhf.s3", "rlhf.ppo.core"},
    {"rlhf.storage", "rlhf.config"},
    # data, models and tracking
    {"rlhf.data.io", "rlhf.data.formats", "rlhf.data.importers", "rlhf.data.demo_task", "rlhf.data.demo"}
    | {"rlhf.tracking", "rlhf.modeling", "rlhf.chat", "rlhf.ppo.models"},
    # what scores and judges models
    {"rlhf.annotators", "rlhf.sampling", "rlhf.evaluation", "rlhf.gates", "rlhf.image"},
    {"rlhf.ppo.trainer", "rlhf.registry", "rlhf.stages.common"},
    {"rlhf.stages.pretrain", "rlhf.stages.sft", "rlhf.stages.reward", "rlhf.stages.ppo", "rlhf.stages.evaluate"},
    # what runs the steps
    {"rlhf.stages.dispatch", "rlhf.components.steps", "rlhf.components.definitions"}
    | {"rlhf.pipelines.rlhf_pipeline", "rlhf.pipelines.run", "rlhf.cli"},
)


def _floor_of() -> dict[str, int]:
    graph = import_graph()
    floor = {module: level for level, modules in enumerate(FLOORS) for module in modules}
    unplaced = sorted(module for module in graph if module not in floor and graph[module] - {"rlhf"})
    assert not unplaced, f"place these modules on a floor of FLOORS: {unplaced}"
    return {module: floor.get(module, 0) for module in graph}


def test_every_import_goes_down_or_sideways() -> None:
    floor, graph = _floor_of(), import_graph()
    upward = sorted((a, b) for a in graph for b in graph[a] if floor[b] > floor[a])
    assert not upward, f"imports that run up a floor: {upward}"


def test_no_step_imports_the_module_of_a_later_step() -> None:
    """A step's module may use what earlier steps built, never what later ones decide (evaluate once judged the
    gates and read the registry's champion for its report)."""
    from rlhf.steps import STEPS

    graph = import_graph()
    last = {candidate.module: position for position, candidate in enumerate(STEPS)}  # a module may serve two steps
    late = {
        (candidate.module, module)
        for position, candidate in enumerate(STEPS)
        for module in graph[candidate.module]
        if last.get(module, -1) > position
    }
    assert not late, f"steps importing the module of a later step: {sorted(late)}"


def test_production_code_patches_nothing() -> None:
    """`unittest.mock` belongs to tests: in src/ it hid a step's environment behind a patch."""
    graph_modules = module_files()
    patched = [name for name, path in graph_modules.items() if "unittest" in _top_level_imports(path)]
    assert not patched, patched


def _top_level_imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names
