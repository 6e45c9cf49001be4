"""The one way to call a stage by its name, as the CLI and the Kubeflow components do."""

from __future__ import annotations

from typing import Any


def run_stage(name: str, config: Any) -> Any:
    """Runs stage `name` (`rlhf.stages.<name>.run(config)`): `config` is its validated params section (with paths).
    Imported here, when the stage runs, so that the CLI starts without loading torch."""
    match name:
        case "pretrain":
            from rlhf.stages.pretrain import run
        case "sft":
            from rlhf.stages.sft import run
        case "reward":
            from rlhf.stages.reward import run
        case "ppo":
            from rlhf.stages.ppo import run
        case "evaluate":
            from rlhf.stages.evaluate import run
        case _:
            raise ValueError(f"{name} is not a stage")
    return run(config)
