"""The one list of steps (rlhf.steps.STEPS) agrees with what reads it: the params sections, the stage modules, the
Kubeflow components, the CLI's commands and the registry's roles."""

from __future__ import annotations

import importlib

import pytest

from rlhf import cli
from rlhf.config import Params
from rlhf.stages.dispatch import run_stage
from rlhf.steps import GATES, ROLES, STAGES, STEPS, step


def test_every_step_reads_a_params_section_and_has_a_module() -> None:
    for candidate in STEPS:
        assert candidate.section in Params.model_fields, candidate.name
        module = importlib.import_module(candidate.module)
        if candidate.kind == "stage":
            assert callable(module.run), candidate.module


@pytest.mark.parametrize("name", STAGES)
def test_a_stage_runs_the_module_its_step_names(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module(step(name).module)
    monkeypatch.setattr(module, "run", lambda config: (module.__name__, config))
    assert run_stage(name, "cfg") == (step(name).module, "cfg")


def test_only_stages_run_as_stages() -> None:
    with pytest.raises(ValueError, match="gate_reward is not a stage"):
        run_stage("gate_reward", None)


def test_every_step_is_a_kubeflow_component_of_the_same_name() -> None:
    from rlhf.components.definitions import build_components

    assert list(build_components("rlhf-pipeline:test")) == [
        *(candidate.name for candidate in STEPS),
        "close_pipeline_run",
    ]


def test_the_cli_has_a_command_per_stage_and_gate() -> None:
    parser = cli.build_parser()
    for stage in STAGES:
        assert parser.parse_args([stage]).handler is cli._cmd_stage
    for gate in GATES:
        assert parser.parse_args(["gate", gate]).gate == gate
    with pytest.raises(SystemExit):
        parser.parse_args(["gate", "nonexistent"])


def test_roles_follow_the_stages_that_train_them() -> None:
    assert ROLES == ("sft", "reward", "policy")
    assert [candidate.name for candidate in STEPS if candidate.registers] == ["sft", "reward", "ppo"]


def test_unknown_steps_name_the_known_ones() -> None:
    with pytest.raises(KeyError, match="steps are data, pretrain"):
        step("dpo")


def test_component_bodies_hand_their_artifacts_to_the_steps_by_name() -> None:
    """Adding an artifact to a step cannot shift another into its place: each component body calls
    `rlhf.components.steps` with keyword arguments only, and those functions take keyword-only arguments."""
    import ast
    import inspect

    from rlhf.components import definitions, steps

    calls = [
        node
        for node in ast.walk(ast.parse(inspect.getsource(definitions)))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "steps"
    ]
    called = {call.func.attr for call in calls}
    assert called >= {"prepare_data", "pretrain", "sft", "reward", "ppo", "evaluate", "gate", "register"}
    for call in calls:
        assert not call.args, f"definitions.py:{call.lineno}: steps.{call.func.attr} called with positional arguments"
    for name in called:
        kinds = {parameter.kind for parameter in inspect.signature(getattr(steps, name)).parameters.values()}
        assert kinds <= {inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD}, name
