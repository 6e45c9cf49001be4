"""Session-scoped trained models shared by the stage tests: one pretrain, one SFT on it, one reward model on that.

Training once per session keeps the suite fast; tests must treat these folders as read-only (copy to modify).
Session fixtures run before the function-scoped autouse environment fixture, so they isolate themselves the same
way (tracking stays inside their own tmp project folder, nothing reaches the network).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from stage_helpers import STAGE_PARAMS, Trained, inside


@pytest.fixture(scope="session")
def session_project(tmp_path_factory: pytest.TempPathFactory, tiny_demo_data: Path) -> Path:
    """A tmp project (tiny params, tiny demo data) the session's trained models live in."""
    root = tmp_path_factory.mktemp("session-project")
    shutil.copytree(tiny_demo_data, root / "data")
    (root / "params.yaml").write_text(yaml.safe_dump(STAGE_PARAMS, sort_keys=False))
    return root


@pytest.fixture(scope="session")
def pretrained(session_project: Path) -> Trained:
    """`rlhf pretrain` from scratch (tokenizer + tiny GPT-2), in-process."""
    from rlhf.config import load_params
    from rlhf.stages import pretrain

    with inside(session_project):
        result = pretrain.run(load_params().pretrain)
    return Trained(session_project / "models" / "pretrained", result)


@pytest.fixture(scope="session")
def sft_trained(session_project: Path, pretrained: Trained) -> Trained:
    """SFT on the session pretrain; `extra["trainer"]` is the SFTTrainer the stage built (its processed datasets)."""
    import trl

    from rlhf.config import load_params
    from rlhf.stages import sft

    trainers: list[Any] = []

    class RecordingSFTTrainer(trl.SFTTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            trainers.append(self)

    with inside(session_project) as mp:
        mp.setattr(trl, "SFTTrainer", RecordingSFTTrainer)
        result = sft.run(load_params().sft)
    assert len(trainers) == 1
    return Trained(session_project / "models" / "sft", result, {"trainer": trainers[0]})


@pytest.fixture(scope="session")
def reward_trained(session_project: Path, sft_trained: Trained) -> Trained:
    """Reward model on the session SFT model; `extra["initial"]` holds its weights before training."""
    import rlhf.stages.reward as reward_stage
    from rlhf.config import load_params

    initial: dict[str, Any] = {}
    original = reward_stage.load_reward_model

    def recording_load(name_or_path: str, tokenizer: Any, *args: Any, **kwargs: Any) -> Any:
        model = original(name_or_path, tokenizer, *args, **kwargs)
        initial.update({name: tensor.detach().clone() for name, tensor in model.state_dict().items()})
        return model

    with inside(session_project) as mp:
        mp.setattr(reward_stage, "load_reward_model", recording_load)
        result = reward_stage.run(load_params().reward)
    assert initial, "the reward stage no longer loads its model through modeling.load_reward_model"
    return Trained(session_project / "models" / "reward", result, {"initial": initial})


@pytest.fixture
def stage_params() -> dict[str, Any]:
    """A copy of the params the session models were trained with."""
    return copy.deepcopy(STAGE_PARAMS)
