"""Helpers shared by the stage tests and their fixtures (a module of its own: `conftest` is not importable by name)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


def _root_conftest() -> Any:
    """tests/conftest.py as a module (its folder is not a package, so it cannot be imported by name reliably)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rlhf_tests_root_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_PARAMS: dict[str, Any] = _root_conftest().TINY_PARAMS

STAGE_PARAMS: dict[str, Any] = copy.deepcopy(TINY_PARAMS)

ISOLATED_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[pytest.MonkeyPatch]:
    """Runs the block with `folder` as the working directory (so as the project root) and an isolated environment."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "RANK"):
            mp.delenv(key, raising=False)
        for key, value in ISOLATED_ENV.items():
            mp.setenv(key, value)
        mp.chdir(folder)
        yield mp


def state_dict(path: Path | str, kind: str = "causal") -> dict[str, Any]:
    """The weights of a saved model folder, loaded the way the next stage loads them."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    loader = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    model = loader.from_pretrained(str(path))
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@dataclass
class Trained:
    """One stage's output in the session project."""

    output: Path
    result: Any  # rlhf.stages.common.StageResult
    extra: dict[str, Any] = field(default_factory=dict)
