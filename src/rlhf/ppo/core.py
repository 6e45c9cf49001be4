"""The PPO math, as small pure functions on (batch, response_length) tensors with a 0/1 mask of real tokens.

Kept apart from the training loop so each piece can be checked against a hand-worked example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

KLEstimator = Literal["k1", "k3"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalises to unit variance (and zero mean unless `shift_mean` is false) over the masked entries."""
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's k1 and k3).

    k1 = log p - log q is unbiased but can be negative per token; k3 = (r - 1) - log r with r = q/p is unbiased
    and never negative, with lower variance.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -β·KL on every response token, plus the sequence's score on its last real token.

    Returns (rewards, non_score_rewards); both are zero past the end of each response.
    """
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, non_score


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response; returns (advantages, returns = advantages + values).

    δ_t = r_t + γ·V_{t+1} - V_t and A_t = δ_t + γλ·A_{t+1}, with V and A zero past the last real token.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approxkl: torch.Tensor
    ratio: torch.Tensor


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> PolicyLoss:
    """PPO's clipped surrogate objective, negated for minimisation."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return PolicyLoss(
        loss=masked_mean(torch.max(unclipped, clipped), mask),
        clipfrac=masked_mean((clipped > unclipped).float(), mask),
        approxkl=0.5 * masked_mean(log_ratio**2, mask),
        ratio=masked_mean(ratio, mask),
    )


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (the new value may move at most `clip` from the rollout's); returns (loss, clipfrac)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    return loss, masked_mean((clipped_loss > unclipped_loss).float(), mask)


class KLController:
    """β for the KL penalty: fixed, or adapted towards a target KL (Ziegler et al. 2019)."""

    def __init__(self, init_coef: float, target: float | None = None, horizon: int = 10000) -> None:
        self.value = init_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, batch_size: int) -> None:
        if self.target is None:
            return
        proportional_error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + proportional_error * batch_size / self.horizon

    def state_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], int(state["horizon"])


def first_true_indices(flags: torch.Tensor) -> torch.Tensor:
    """Index of the first True in each row, or the row length when there is none."""
    length = flags.shape[-1]
    positions = torch.arange(length, device=flags.device).expand_as(flags)
    return torch.where(flags, positions, torch.full_like(positions, length)).min(dim=-1).values


def response_mask(responses: torch.Tensor, stop_ids: int | list[int]) -> torch.Tensor:
    """1 for every response token up to and including the first stop token (EOS), 0 after it (padding or junk)."""
    stops = torch.tensor([stop_ids] if isinstance(stop_ids, int) else stop_ids, device=responses.device)
    end = first_true_indices(torch.isin(responses, stops))
    positions = torch.arange(responses.shape[1], device=responses.device).expand_as(responses)
    return (positions <= end.unsqueeze(1)).float()
