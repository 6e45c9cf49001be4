"""dvc.yaml's deps cover each stage's code: every module the stage's own module imports, directly or through
others (read from the source), is a dep of the stage or lies in a folder that is, and no src/ dep is one the stage
does not import. So editing the code a stage runs makes `dvc status` list it."""

from __future__ import annotations

from pathlib import Path

import yaml
from code_graph import closure, import_graph, module_files

from rlhf.steps import STEPS

REPO = Path(__file__).resolve().parents[1]

# Modules that decide where files go and what is logged, not what a stage computes; following them would make every
# stage rerun after any change to logging or storage. The package markers and the list of steps hold no stage code.
NOT_STAGE_CODE = frozenset(
    {
        "rlhf",
        "rlhf.data",
        "rlhf.ppo",
        "rlhf.stages",  # package markers
        "rlhf.steps",  # the list of steps, by name
        "rlhf.tracking",  # MLflow runs, lineage tags
        "rlhf.console",  # what the console shows of progress
        "rlhf.storage",
        "rlhf.s3",  # atomic writes, caches, S3 transfers
    }
)


def code_deps(stage: str) -> dict[str, Path]:
    """The source files a DVC stage's results depend on, by module name."""
    step = next(step for step in STEPS if step.name == stage)
    files = module_files()
    return {module: files[module] for module in closure(import_graph(), step.module, NOT_STAGE_CODE)}


def src_deps(stage: dict) -> list[str]:
    return [dep for dep in stage.get("deps", []) if str(dep).startswith("src/")]


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(REPO).as_posix()
    return any(relative == dep or relative.startswith(dep.rstrip("/") + "/") for dep in deps)


def test_every_stage_depends_on_the_code_it_imports_and_on_nothing_else() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == {step.name for step in STEPS if step.kind != "data"}  # data/ is data.dvc's
    problems = []
    for name, stage in stages.items():
        needed = code_deps(name)
        deps = src_deps(stage)
        problems += [
            f"{name}: missing dep {path.relative_to(REPO)} ({module})"
            for module, path in sorted(needed.items())
            if not covered(path, deps)
        ]
        problems += [
            f"{name}: dep {dep} holds no code the stage imports"
            for dep in deps
            if not any(covered(path, [dep]) for path in needed.values())
        ]
    assert not problems, "dvc.yaml deps:\n" + "\n".join(problems)


def test_the_sampling_code_is_a_dep_of_ppo_and_evaluate_only() -> None:
    users = {
        name for name in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"] if "rlhf.sampling" in code_deps(name)
    }
    assert users == {"ppo", "evaluate"}


def test_every_stage_depends_on_the_models_its_params_name() -> None:
    """A model folder a stage's params section reads (reward.base_model: models/pretrained, ppo.reward_model, ...) is
    a dep of the stage, so retraining that model reruns it. The gates section is shared by two steps: its paths are
    checked by the gates' own stages."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    problems = []
    for step in STEPS:
        if step.name not in stages or step.section == "gates":
            continue
        read = {
            value
            for key, value in params[step.section].items()
            if key != "output_dir" and isinstance(value, str) and value.startswith("models/")
        }
        deps = {str(dep) for dep in stages[step.name].get("deps", [])}
        problems += [f"{step.name}: {path} is not a dep" for path in sorted(read - deps)]
    assert not problems, "\n".join(problems)
