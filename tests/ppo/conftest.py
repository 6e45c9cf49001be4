"""Session fixtures for the PPO tests: demo rows, two tokenizers with different vocabularies, a quickly
pretrained tiny policy (weights shared read-only; `make_policy` hands out fresh copies)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from ppo_helpers import demo_rows, quick_pretrain, random_lm, snapshot, tokenizer_for


@pytest.fixture(scope="session")
def rows() -> list[tuple[str, str]]:
    return demo_rows(400)


@pytest.fixture(scope="session")
def prompts(rows) -> list[str]:
    return [prompt for prompt, _ in rows]


@pytest.fixture(scope="session")
def tokenizer(rows):
    """The policy's tokenizer, left-padded as the PPO stage sets it (read-only: do not change padding_side)."""
    return tokenizer_for([prompt + completion for prompt, completion in rows], 512, "left")


@pytest.fixture(scope="session")
def reward_tokenizer(rows):
    """A second tokenizer with a different vocabulary (size 400), right-padded as the stage sets it."""
    return tokenizer_for([prompt + completion for prompt, completion in rows], 400, "right")


@pytest.fixture(scope="session")
def pretrained_weights(tokenizer, rows) -> dict[str, torch.Tensor]:
    return snapshot(quick_pretrain(random_lm(tokenizer), tokenizer, rows, steps=150))


@pytest.fixture
def make_policy(tokenizer, pretrained_weights) -> Callable[[], torch.nn.Module]:
    """Fresh copies of the quickly pretrained tiny policy (eval mode)."""

    def make():
        model = random_lm(tokenizer)
        model.load_state_dict(pretrained_weights)
        return model.eval()

    return make


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps process-wide singletons; the trainers here build CPU accelerators, so leave none behind
    for tests elsewhere (another test's Accelerator must not inherit `cpu=True` or a gradient-accumulation count)."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
