"""The networks of PPO: the policy and its critic as one trained module, and the frozen reference."""

from __future__ import annotations

import warnings

import torch
from torch import nn


class Critic(nn.Module):
    """Per-token values from a sequence classifier (the reward model): its backbone plus its scoring head."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.backbone = getattr(classifier, classifier.base_model_prefix)
        self.head = classifier.score

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        return self.head(hidden).squeeze(-1)


class PolicyAndValue(nn.Module):
    """Policy and critic as one module, so one optimiser, one `accelerator.prepare` and one backward cover both.

    The critic is either a separate network (initialised from the reward model) or a linear value head on the
    policy's last hidden state.
    """

    def __init__(self, policy: nn.Module, critic: nn.Module | None) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.value_head = None if critic is not None else nn.Linear(policy.config.get_text_config().hidden_size, 1)
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.value_head is not None
        output = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=shared,
            use_cache=False,
        )
        if shared:
            values = self.value_head(output.hidden_states[-1]).squeeze(-1)
        else:
            values = self.critic(input_ids, attention_mask, position_ids)
        return output.logits, values


def reference_model(policy: nn.Module) -> nn.Module:
    """A frozen copy of the policy before training (TRL's `create_reference_model`). With LoRA no copy is needed: the
    policy with its adapters disabled (PEFT's `disable_adapter`) is the reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental announces itself on import
        from trl.experimental.utils import create_reference_model
    return create_reference_model(policy)
