"""The steps of the pipeline, in order: the one list that the CLI, DVC, the Kubeflow components, the pipeline
builder, the model registry and the config read.

A step names the params.yaml section it reads and the module that does its work. This module is the ground floor:
it imports nothing from the project, so everything can read it (`rlhf.stages.dispatch.run_stage` calls a stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Step:
    """One step of the DAG: a Kubeflow task, a DVC stage (except `data`, which data.dvc tracks) and a CLI command."""

    name: str
    section: str  # the params.yaml section it reads
    kind: Literal["data", "stage", "gate", "register"]
    gate: str | None = None  # gates: which one (`rlhf gate NAME`, gates/NAME.json)
    registers: str | None = None  # stages: the registry role of the model it trains (sft, reward, policy)
    # Stages: the metrics `dvc metrics show` lists (metrics/headline/NAME.json); all of them are in metrics/NAME.json.
    headline: tuple[str, ...] = ()
    # Keys of its section that people tune: typed run parameters of the Kubeflow pipeline, named NAME_KEY.
    knobs: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        """The module that does the step's work (DVC's deps on the code follow its imports)."""
        return {"data": "rlhf.data.demo", "gate": "rlhf.gates", "register": "rlhf.registry"}.get(
            self.kind, f"rlhf.stages.{self.name}"
        )


STEPS = (
    Step("data", "demo", "data"),
    Step("pretrain", "pretrain", "stage", headline=("eval_loss",), knobs=("base_model",)),
    Step("sft", "sft", "stage", registers="sft", headline=("eval_loss",), knobs=("learning_rate", "epochs")),
    Step(
        "reward", "reward", "stage", registers="reward", headline=("eval_accuracy",), knobs=("learning_rate", "epochs")
    ),
    Step("gate_reward", "gates", "gate", gate="reward"),
    Step(
        "ppo",
        "ppo",
        "stage",
        registers="policy",
        headline=("objective/scores", "objective/kl"),
        knobs=("learning_rate", "kl_coef", "total_episodes"),
    ),
    Step(
        "evaluate",
        "evaluate",
        "stage",
        headline=("win_rate/rm", "win_rate/gold", "gold_gain", "policy/kl", "rm_accuracy"),
    ),
    Step("gate_evaluation", "gates", "gate", gate="evaluation"),
    Step("register", "registry", "register"),
)
STEP_NAMES = tuple(step.name for step in STEPS)
STAGES = tuple(step.name for step in STEPS if step.kind == "stage")
GATES = tuple(step.gate for step in STEPS if step.gate)
# Registry roles, in the order their models are trained.
ROLES = tuple(step.registers for step in STEPS if step.registers)
# The params sections the pipeline takes as parameters, in DAG order.
SECTIONS = tuple(dict.fromkeys(step.section for step in STEPS))


def step(name: str) -> Step:
    for candidate in STEPS:
        if candidate.name == name:
            return candidate
    raise KeyError(f"unknown step {name!r}; steps are {', '.join(STEP_NAMES)}")


def gate_step(gate: str) -> Step:
    return next(candidate for candidate in STEPS if candidate.gate == gate)
